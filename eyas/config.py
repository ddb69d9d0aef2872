"""Engine configuration: frozen dataclasses, filled from YAML and CLI flags, validated early."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from eyas.errors import ConfigError

DEFAULT_MODEL = "smollm2-135m-instruct"


def read_yaml_mapping(path: str | Path) -> dict:
    """A deployment YAML file's top-level mapping ({} for an empty file); clear errors otherwise."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


@dataclass(frozen=True)
class SpecConfig:
    """EAGLE-3 speculation. steps = chain length K (tree depth); topk > 1 drafts a tree."""

    draft: Optional[str] = None
    steps: int = 5
    topk: int = 1
    draft_tokens: int = 8  # tree budget (topk > 1)
    # adaptive: the controller picks 0..steps per step (with topk > 1: a tree size or a chain
    # length; spec/controller.py); fixed: always `steps` (or a tree of draft_tokens)
    policy: str = "adaptive"
    # the drafter's weights and KV cache: auto = bf16 where the target is fp32 on a CPU with
    # native bf16 (half the weight bytes per draft step), else the target's dtype
    dtype: str = "auto"

    def __post_init__(self):
        if self.steps < 1:
            raise ConfigError(f"spec_steps must be >= 1, got {self.steps}")
        if self.topk < 1:
            raise ConfigError(f"spec_topk must be >= 1, got {self.topk}")
        if self.draft_tokens < 1:
            raise ConfigError(f"spec_draft_tokens must be >= 1, got {self.draft_tokens}")
        if self.policy not in ("fixed", "adaptive"):
            raise ConfigError(f"spec_policy must be 'fixed' or 'adaptive', got {self.policy!r}")
        if self.dtype not in ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"):
            raise ConfigError(f"spec_dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")

    @property
    def enabled(self) -> bool:
        return self.draft is not None

    @property
    def mixed(self) -> bool:
        """Adaptive with topk > 1: the controller picks plain steps, trees of up to draft_tokens
        nodes or chains of up to `steps` tokens, per step (spec/controller.py)."""
        return self.topk > 1 and self.policy == "adaptive"

    @property
    def num_draft_tokens(self) -> int:
        """Draft tokens verified per sequence per step (the KV lookahead is this + 1)."""
        if self.topk == 1:
            return self.steps
        return max(self.draft_tokens, self.steps) if self.mixed else self.draft_tokens


@dataclass(frozen=True)
class EngineConfig:
    model: str = DEFAULT_MODEL
    device: str = "auto"  # auto | cpu | cuda[:N]
    dtype: str = "auto"  # auto (fp32 on CPU, bf16 on GPU) | float32 | bfloat16 | float16
    max_model_len: Optional[int] = None  # default: min(model's max positions, 4096)
    block_size: int = 16
    kv_cache_memory: Any = "auto"  # bytes ('2GiB') or fraction of free memory (0.5)
    num_kv_blocks: Optional[int] = None  # exact block count; overrides kv_cache_memory
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    eager: Optional[bool] = None  # None: compile on GPU, eager on CPU
    compile_warmup: bool = True  # compile every batch bucket x step width at start-up
    # torch.compile backend of the bucketed steps; "none": no torch.compile. None: inductor on CPU;
    # on GPU "none", the eager step captured as CUDA graphs ("inductor" compiles, then captures).
    # EYAS_COMPILE_BACKEND overrides it.
    compile_backend: Optional[str] = None
    num_threads: Optional[int] = None  # CPU intra-op threads (None: torch default)
    # oneDNN-packed weight copies for CPU matmuls (None: on for CPU fp32, and bf16 where native)
    packed_weights: Optional[bool] = None
    # with packed weights, fp32 products of at most this many rows take the plain weight (MKL's
    # few-row path), 0..3; None: measured at start-up (faster on some CPUs, slower on others)
    mkl_max_rows: Optional[int] = None
    seed: int = 0
    spec: SpecConfig = field(default_factory=SpecConfig)
    # Where the model runs: local (this process) or ray (tensor-parallel shards + a drafter worker
    # as Ray actors, see eyas/executor). None: ray when tp > 1, else local.
    executor: Optional[str] = None
    tp: int = 1  # tensor-parallel target shards (ray executor)
    worker_cpus: float = 1.0  # CPUs per worker actor
    worker_gpus: Optional[float] = None  # GPUs per target shard (None: 1 on GPU clusters, else 0)
    drafter_gpus: Optional[float] = None  # GPUs for the drafter (None: 1 on GPU clusters; < 1 shares one)
    ray_address: Optional[str] = None  # join this cluster (default: $RAY_ADDRESS, else start one)
    worker_start_timeout_s: float = 180.0  # bound on placing, starting and connecting the workers

    def __post_init__(self):
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size must be a power of two, got {self.block_size}")
        if self.max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ConfigError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.executor not in (None, "local", "ray"):
            raise ConfigError(f"executor must be 'local' or 'ray', got {self.executor!r}")
        if not isinstance(self.tp, int) or self.tp < 1:
            raise ConfigError(f"tp must be an integer >= 1, got {self.tp!r}")
        if self.tp > 1 and self.executor == "local":
            raise ConfigError(f"tp={self.tp} needs the ray executor (--executor ray): the local executor "
                              "runs one process")
        if self.mkl_max_rows is not None and (not isinstance(self.mkl_max_rows, int) or not 0 <= self.mkl_max_rows <= 3):
            raise ConfigError(f"mkl_max_rows must be an integer 0..3 or unset, got {self.mkl_max_rows!r}")
        if self.worker_cpus <= 0 or self.worker_start_timeout_s <= 0:
            raise ConfigError("worker_cpus and worker_start_timeout_s must be > 0")

    @property
    def uses_ray(self) -> bool:
        return self.executor == "ray" or (self.executor is None and self.tp > 1)

    def replace(self, **changes) -> "EngineConfig":
        spec_changes = {k[5:]: changes.pop(k) for k in list(changes) if k.startswith("spec_")}
        if "draft" in changes:
            spec_changes["draft"] = changes.pop("draft")
        cfg = dataclasses.replace(self, **changes)
        if spec_changes:
            cfg = dataclasses.replace(cfg, spec=dataclasses.replace(cfg.spec, **spec_changes))
        return cfg

    @classmethod
    def from_dict(cls, data: dict) -> "EngineConfig":
        """Flat keys as on the command line with underscores: model, draft, spec_steps, ..."""
        known = {f.name for f in dataclasses.fields(cls)} - {"spec"}
        spec_known = {"spec_" + f.name for f in dataclasses.fields(SpecConfig)} | {"draft"}
        unknown = set(data) - known - spec_known
        if unknown:
            raise ConfigError(f"unknown config keys: {sorted(unknown)}")
        return cls().replace(**data)

    @classmethod
    def from_yaml(cls, path: str | Path, section: str = "engine") -> "EngineConfig":
        data = read_yaml_mapping(path)
        data = data.get(section, data)
        return cls.from_dict({k.replace("-", "_"): v for k, v in data.items()})
