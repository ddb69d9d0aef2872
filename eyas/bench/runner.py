"""Closed-loop clients against one LLMEngine: keep `concurrency` requests in flight; each time one
finishes, submit the next, until every prompt of the level has finished."""
from __future__ import annotations

import time
from collections import deque
from typing import Optional, Sequence

from eyas.bench.metrics import LevelResult, RequestTiming
from eyas.core import SamplingParams
from eyas.errors import EyasError


def sampling_for(index: int, output_len: int, temperature: float) -> SamplingParams:
    """Exactly output_len tokens (EOS ignored); sampled requests get seed = their index, so every
    mode draws from the same per-request generator."""
    return SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=temperature,
                          seed=index if temperature > 0 else None)


def run_closed_loop(engine, prompts: Sequence[list[int]], concurrency: int, output_len: int,
                    temperature: float = 0.0, tag: str = "", progress: Optional[bool] = None,
                    desc: str = "") -> tuple[list[RequestTiming], float]:
    """Run `prompts` through `engine` with at most `concurrency` in flight.

    Returns (timings in prompt order, wall seconds from the first submit to the last finish).
    Raises EyasError if a request ends early or with an error: a bench must not count short
    requests.
    """
    from tqdm import tqdm

    pending = deque(enumerate(prompts))
    timings: dict[str, RequestTiming] = {}
    order: list[str] = []
    in_flight = 0
    # progress None: a bar only when stderr is a terminal
    bar = tqdm(total=len(prompts), desc=desc, unit="req", leave=False,
               disable=None if progress is None else not progress)

    def submit() -> None:
        nonlocal in_flight
        i, ids = pending.popleft()
        rid = f"{tag}{i}"
        order.append(rid)
        timings[rid] = RequestTiming(submit=time.perf_counter())
        engine.add_request(rid, None, sampling_for(i, output_len, temperature), prompt_token_ids=ids)
        in_flight += 1

    start = time.perf_counter()
    try:
        while pending and in_flight < concurrency:
            submit()
        while in_flight:
            outputs = engine.step()
            now = time.perf_counter()
            if not outputs and not engine.has_unfinished():
                raise EyasError(f"bench: the engine went idle with {in_flight} requests unfinished")
            for out in outputs:
                t = timings[out.id]
                if out.token_ids_delta and t.first_token is None:
                    t.first_token = now
                if not out.finished:
                    continue
                if out.error or out.finish_reason != "length" or len(out.token_ids) != output_len:
                    raise EyasError(f"bench: request {out.id} ended with {out.finish_reason} after "
                                    f"{len(out.token_ids)} of {output_len} tokens ({out.error or 'no error'})")
                t.finish = now
                t.output_tokens = len(out.token_ids)
                t.target_steps = out.spec.target_steps if out.spec is not None else len(out.token_ids)
                in_flight -= 1
                bar.update(1)
            while pending and in_flight < concurrency:
                submit()
        wall = time.perf_counter() - start
    finally:
        bar.close()
    return [timings[rid] for rid in order], wall


def run_level(engine, mode: str, prompts: Sequence[list[int]], concurrency: int, output_len: int,
              temperature: float = 0.0, progress: Optional[bool] = None, extra: Optional[dict] = None) -> LevelResult:
    """One (mode, concurrency) level on a built engine; adds to `extra` the preemptions it caused
    and, with an adaptive controller, `draft_choices`: {k: steps that chose it} (k is the draft
    length, or with tree flags the tree size, and -k a chain of k tokens)."""
    before = engine.scheduler.num_preemptions
    spec = getattr(engine, "spec", None)
    controller = getattr(spec, "controller", None)
    chosen = dict(controller.choices) if controller is not None else None
    timings, wall = run_closed_loop(engine, prompts, concurrency, output_len, temperature,
                                    tag=f"c{concurrency}-", progress=progress, desc=f"{mode} c={concurrency}")
    info = dict(extra or {})
    info["preemptions"] = engine.scheduler.num_preemptions - before
    if controller is not None:
        info["draft_choices"] = {str(k): n - chosen.get(k, 0) for k, n in sorted(controller.choices.items())
                                 if n > chosen.get(k, 0)}
    return LevelResult(mode, concurrency, tuple(timings), wall, info)


def traced_step(engine, step=None) -> tuple[list, float, bool, Optional[int]]:
    """engine.step() (or `step()`, the engine's own when it is wrapped) for the bench's step traces: (outputs, seconds the step took, whether it
    prefilled, the key the adaptive controller chose or None without one). A step prefills when a
    request waits (a closed loop adds one after each finish) or a running one still has more than
    one token to compute; both are known before it runs."""
    sch = engine.scheduler
    prefill = bool(sch.waiting) or any(len(s.token_ids) - s.num_computed_tokens > 1 for s in sch.running)
    controller = getattr(getattr(engine, "spec", None), "controller", None)
    chosen = dict(controller.choices) if controller is not None else {}
    start = time.perf_counter()
    outputs = (step or engine.step)()
    seconds = time.perf_counter() - start
    key = None
    if controller is not None:
        key = next((k for k, n in controller.choices.items() if n > chosen.get(k, 0)), None)
    return outputs, seconds, prefill, key


def warm_up(engine, prompts: Sequence[list[int]], output_len: int) -> None:
    """A few untimed requests (all at once, up to 16 tokens each) before the sweep."""
    if prompts:
        run_closed_loop(engine, prompts, len(prompts), min(output_len, 16), tag="warmup-", progress=False)
