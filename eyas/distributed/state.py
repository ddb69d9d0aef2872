"""ParallelState: where this process sits in its tensor-parallel group, and its collectives.

Models take one at construction and hand its collectives to the layers that need them. The
default, `ParallelState()`, is tp_size=1: no process group, and every collective is the identity,
so a single-process model runs exactly the code it ran before tensor parallelism existed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch.distributed import ProcessGroup

from eyas.distributed.collectives import all_gather_last_dim, all_reduce_sum
from eyas.errors import ConfigError

Reduce = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ParallelState:
    tp_size: int = 1
    tp_rank: int = 0
    # The tensor-parallel group; None means the default (world) group. Unused when tp_size == 1.
    group: Optional[ProcessGroup] = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.tp_size < 1 or not 0 <= self.tp_rank < self.tp_size:
            raise ConfigError(f"bad tensor-parallel rank {self.tp_rank} of tp_size={self.tp_size}")

    @property
    def is_parallel(self) -> bool:
        return self.tp_size > 1

    @property
    def is_first_rank(self) -> bool:
        """Rank 0 samples and reports; the others only compute their shards."""
        return self.tp_rank == 0

    @property
    def reduce(self) -> Optional[Reduce]:
        """The all-reduce a row-parallel layer applies to its partial output; None on tp=1."""
        return self.all_reduce if self.is_parallel else None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:  # [..] partial -> [..] summed
        return all_reduce_sum(x, self.group) if self.is_parallel else x

    def gather_vocab(self, logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """[S, V_local] vocab-parallel logits -> [S, vocab_size] on every rank (the padding
        rows of the last rank's shard dropped). The identity on tp=1."""
        if not self.is_parallel:
            return logits
        return all_gather_last_dim(logits, self.tp_size, self.group)[..., :vocab_size]
