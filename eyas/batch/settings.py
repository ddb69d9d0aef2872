"""BatchConfig: what a batch job reads, writes and how many replicas serve it."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from eyas.errors import ConfigError

EXECUTORS = ("auto", "local", "ray")


@dataclass(frozen=True)
class BatchConfig:
    input: str
    output: str
    replicas: int = 1
    tp: int = 1
    executor: str = "auto"  # auto: Ray when replicas > 1, ray_address or $RAY_ADDRESS; else in-process
    ray_address: Optional[str] = None
    replica_cpus: float = 1.0
    replica_gpus: Optional[float] = None  # None: tp GPUs when the cluster has GPUs and device allows
    max_inflight: Optional[int] = None  # lines in flight per replica; None: 2 x max_num_seqs
    max_attempts: int = 3  # replicas a line may take down before it is recorded as an error
    chat: bool = False
    log_interval: float = 10.0  # seconds between progress log lines when stderr is not a terminal
    progress: Optional[bool] = None  # None: a bar when stderr is a terminal
    placement_timeout: float = 300.0  # seconds to wait for the cluster to fit every replica

    def __post_init__(self):
        if not self.input:
            raise ConfigError("batch: --input is required")
        if not self.output:
            raise ConfigError("batch: --output is required")
        if Path(self.input).resolve() == Path(self.output).resolve():
            raise ConfigError("batch: --output must differ from --input")
        if self.replicas < 1:
            raise ConfigError(f"batch: replicas must be >= 1, got {self.replicas}")
        if self.tp < 1:
            raise ConfigError(f"batch: tp must be >= 1, got {self.tp}")
        if self.executor not in EXECUTORS:
            raise ConfigError(f"batch: executor must be one of {', '.join(EXECUTORS)}, got {self.executor!r}")
        if self.replica_cpus < 0 or (self.replica_gpus is not None and self.replica_gpus < 0):
            raise ConfigError("batch: replica_cpus and replica_gpus must be >= 0")
        if self.max_inflight is not None and self.max_inflight < 1:
            raise ConfigError(f"batch: max_inflight must be >= 1, got {self.max_inflight}")
        if self.max_attempts < 1:
            raise ConfigError(f"batch: max_attempts must be >= 1, got {self.max_attempts}")
        if self.log_interval <= 0 or self.placement_timeout <= 0:
            raise ConfigError("batch: log_interval and placement_timeout must be > 0")

    @property
    def summary_path(self) -> Path:
        return Path(self.output + ".summary.json")

    def use_ray(self) -> bool:
        if self.executor != "auto":
            return self.executor == "ray"
        return self.replicas > 1 or bool(self.ray_address or os.environ.get("RAY_ADDRESS"))

    def replace(self, **changes) -> "BatchConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: dict) -> "BatchConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        data = {k.replace("-", "_"): v for k, v in data.items()}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"batch: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)
