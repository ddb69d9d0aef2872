"""The `hf` peer: HF transformers `generate` on the same prompts, for reference.

At concurrency c the prompts run as static batches of c (the last may be smaller), greedy (or
sampled at --temperature), exactly output_len new tokens (min_new_tokens = max_new_tokens), on
the engine's device and dtype (float32 on CPU). Every prompt has exactly input_len ids, so no
padding is needed. A streamer stamps the first generated token of each batch, so for every
request in a batch: ttft = first token - batch start, tpot = (batch end - first token) / (N - 1).
accept_len is 1.0 (one token per forward step).
"""
from __future__ import annotations

import time
from typing import Optional, Sequence

from eyas.bench.metrics import LevelResult, RequestTiming


class _FirstTokenClock:
    """A generate() streamer: put() gets the prompt first, then each step's new tokens."""

    def __init__(self):
        self.calls = 0
        self.first_token: Optional[float] = None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:
            self.first_token = time.perf_counter()

    def end(self) -> None:
        pass


def load_hf_model(model: str, device, dtype):
    """AutoModelForCausalLM from the model's HF-style folder, in eval mode on `device`."""
    from transformers import AutoModelForCausalLM

    from eyas.hub import resolve_model

    folder = resolve_model(model)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()


def _generate_batch(model, batch: list[list[int]], output_len: int, temperature: float, eos: int):
    import torch
    from transformers import GenerationConfig

    ids = torch.tensor(batch, device=model.device)
    sample = temperature > 0
    gen = GenerationConfig(max_new_tokens=output_len, min_new_tokens=output_len, do_sample=sample,
                           temperature=temperature if sample else None, top_p=1.0 if sample else None,
                           top_k=0 if sample else None, pad_token_id=eos, eos_token_id=eos)
    clock = _FirstTokenClock()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen, streamer=clock)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    end = time.perf_counter()
    new = out.shape[1] - ids.shape[1]
    return [RequestTiming(submit=start, first_token=clock.first_token or end, finish=end,
                          output_tokens=new, target_steps=new) for _ in batch]


def run_hf_level(model, prompts: Sequence[list[int]], concurrency: int, output_len: int,
                 temperature: float = 0.0, eos_token_id: int = 0, progress: Optional[bool] = None) -> LevelResult:
    """All prompts in static batches of `concurrency`, one after another."""
    from tqdm import tqdm

    timings: list[RequestTiming] = []
    bar = tqdm(total=len(prompts), desc=f"hf c={concurrency}", unit="req", leave=False,
               disable=None if progress is None else not progress)
    start = time.perf_counter()
    try:
        for i in range(0, len(prompts), concurrency):
            batch = list(prompts[i:i + concurrency])
            timings += _generate_batch(model, batch, output_len, temperature, eos_token_id)
            bar.update(len(batch))
    finally:
        bar.close()
    return LevelResult("hf", concurrency, tuple(timings), time.perf_counter() - start)


def warm_up_hf(model, prompts: Sequence[list[int]], output_len: int, eos_token_id: int) -> None:
    """One small untimed batch."""
    if prompts:
        _generate_batch(model, list(prompts), min(output_len, 16), 0.0, eos_token_id)
