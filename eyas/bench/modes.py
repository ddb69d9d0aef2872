"""How each bench mode derives its engine configuration from the one the user gave.

- nospec: the draft removed.
- chain: a chain of K = spec_steps drafts (the flags' K, default 5), fixed policy.
- tree: the flags' topk when it is > 1, else 4; spec_draft_tokens (default 8); depth spec_steps.
- adaptive: the flags' spec settings as maxima, spec_policy "adaptive" (the controller picks K).
Every mode gets max_num_seqs >= the highest concurrency, so a level is never capped by the batch.
"""
from __future__ import annotations

from typing import Callable

from eyas.config import EngineConfig

DEFAULT_TREE_TOPK = 4


def _nospec(cfg: EngineConfig) -> EngineConfig:
    return cfg.replace(draft=None)


def _chain(cfg: EngineConfig) -> EngineConfig:
    return cfg.replace(spec_topk=1, spec_policy="fixed")


def _tree(cfg: EngineConfig) -> EngineConfig:
    topk = cfg.spec.topk if cfg.spec.topk > 1 else DEFAULT_TREE_TOPK
    return cfg.replace(spec_topk=topk, spec_policy="fixed")


def _adaptive(cfg: EngineConfig) -> EngineConfig:
    return cfg.replace(spec_policy="adaptive")


_BUILDERS: dict[str, Callable[[EngineConfig], EngineConfig]] = {
    "nospec": _nospec, "chain": _chain, "tree": _tree, "adaptive": _adaptive}


def engine_config_for(mode: str, base: EngineConfig, max_concurrency: int) -> EngineConfig:
    """The engine configuration of `mode` (one of settings.MODES)."""
    cfg = _BUILDERS[mode](base)
    if cfg.max_num_seqs < max_concurrency:
        cfg = cfg.replace(max_num_seqs=max_concurrency)
    return cfg


def spec_summary(cfg: EngineConfig) -> dict:
    """The speculation settings a record reports (empty for nospec)."""
    if not cfg.spec.enabled:
        return {}
    s = cfg.spec
    return {"spec_steps": s.steps, "spec_topk": s.topk,
            "spec_draft_tokens": s.num_draft_tokens, "spec_policy": s.policy, "spec_dtype": s.dtype}
