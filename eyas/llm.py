"""LLM: the offline batch API. `LLM(model).generate(prompts, params)` -> list[RequestOutput]."""
from __future__ import annotations

import sys
import time
from typing import Iterable, Optional, Union

from tqdm import tqdm

from eyas.config import DEFAULT_MODEL, EngineConfig
from eyas.core import RequestOutput, SamplingParams
from eyas.engine import create_engine

PromptLike = Union[str, list[int], dict]


class LLM:
    """Offline generation. Extra keyword arguments are EngineConfig fields (spec_* included)."""

    def __init__(self, model: str = DEFAULT_MODEL, draft: Optional[str] = None,
                 config: Optional[EngineConfig] = None, **kwargs):
        if config is None:
            config = EngineConfig().replace(model=model, draft=draft, **kwargs)
        self.config = config
        self.engine = create_engine(self.config)
        self.tokenizer = self.engine.tokenizer
        self.last_stats: dict = {}

    def generate(self, prompts: Union[PromptLike, Iterable[PromptLike]],
                 params: Union[SamplingParams, list[SamplingParams], None] = None,
                 chat: bool = False, use_tqdm: bool = False) -> list[RequestOutput]:
        """Generate for each prompt: a string, a list of token ids, or a dict with `prompt` or
        `messages` (and optional `id`). Outputs come back in input order."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                                 and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if not isinstance(params, list):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        engine = self.engine
        ids = []
        for i, (p, sp) in enumerate(zip(prompts, params)):
            rid = f"llm-{id(self)}-{i}"
            if isinstance(p, str):
                engine.add_request(rid, p, sp, chat=chat)
            elif isinstance(p, dict):
                engine.add_request(rid, p.get("prompt"), sp, messages=p.get("messages"),
                                   chat=chat)
            else:
                engine.add_request(rid, None, sp, prompt_token_ids=list(p))
            ids.append(rid)
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), disable=not use_tqdm, file=sys.stderr, desc="generate")
        start, steps = time.perf_counter(), engine.num_steps
        try:
            while len(results) < len(ids):
                for out in engine.step():
                    if out.finished:
                        results[out.id] = out
                        bar.update(1)
        except BaseException:
            for rid in ids:
                engine.abort(rid)
            raise
        finally:
            bar.close()
        elapsed = time.perf_counter() - start
        tokens = sum(len(r.token_ids) for r in results.values())
        self.last_stats = {"elapsed_s": elapsed, "completion_tokens": tokens,
                           "tok_s": tokens / elapsed if elapsed else 0.0,
                           "engine_steps": engine.num_steps - steps}
        outs = [results[r] for r in ids]
        for i, o in enumerate(outs):  # give results the caller's position as id
            o.id = str(prompts[i].get("id", i)) if isinstance(prompts[i], dict) else str(i)
        return outs
