"""Batch generation over JSONL prompt files: in-process, or as Ray replicas (`eyas batch`).

    from eyas.batch import run
    summary = run("in.jsonl", "out.jsonl", model="smollm2-135m-instruct", replicas=2, max_tokens=64)
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from eyas.batch.settings import BatchConfig
from eyas.config import EngineConfig
from eyas.core import SamplingParams

__all__ = ["BatchConfig", "run"]

_SAMPLING_KEYS = {f.name for f in dataclasses.fields(SamplingParams)}
_BATCH_KEYS = {f.name for f in dataclasses.fields(BatchConfig)} - {"input", "output"}


def run(input: str, output: str, *, config: Optional[EngineConfig] = None,
        params: Optional[SamplingParams] = None, print_summary: bool = False, **kwargs) -> dict:
    """Serve every line of `input` not yet in `output`; returns the summary dict.

    Keyword arguments are BatchConfig fields (replicas, executor, ray_address, replica_cpus, chat,
    ...), SamplingParams fields (max_tokens, temperature, ...; or pass `params`) or EngineConfig
    fields (model, draft, spec_steps, max_num_seqs, ...; or pass `config`).
    """
    from eyas.batch.runner import run_batch

    batch = {k: kwargs.pop(k) for k in list(kwargs) if k in _BATCH_KEYS}
    sampling = {k: kwargs.pop(k) for k in list(kwargs) if k in _SAMPLING_KEYS}
    if params is not None and sampling:
        raise TypeError(f"give sampling options either in params or as keywords, not both: {sorted(sampling)}")
    params = params or SamplingParams(**sampling)
    engine = (config or EngineConfig()).replace(**kwargs) if kwargs else (config or EngineConfig())
    cfg = BatchConfig(input=str(input), output=str(output), **batch)
    return run_batch(cfg, engine, params, print_summary=print_summary)
