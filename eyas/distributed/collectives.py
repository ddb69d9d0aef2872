"""The collectives tensor-parallel layers need, over a torch.distributed process group.

    all_reduce_sum       row-parallel outputs (o_proj, down_proj) and the vocab-parallel
                         embedding: every rank holds a partial sum of the same [T, H] tensor
    all_gather_last_dim  vocab-parallel LM head: rank r holds logits for its vocab rows
                         [S, V_local]; the gather concatenates them in rank order [S, tp * V_local]

`group=None` means the default (world) group. These are plain c10d calls: gloo on CPU,
NCCL/RCCL on GPU; the tensors must live on the device the backend serves.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


def all_reduce_sum(x: torch.Tensor, group: Optional[ProcessGroup] = None) -> torch.Tensor:
    """Sum x over the group's ranks, in place; returns x (same shape on every rank)."""
    dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


def all_gather_last_dim(x: torch.Tensor, world_size: int,
                        group: Optional[ProcessGroup] = None) -> torch.Tensor:
    """[..., n] on each rank -> [..., world_size * n], rank 0's columns first."""
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=-1)
