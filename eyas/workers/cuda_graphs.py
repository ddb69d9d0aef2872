"""Explicit CUDA-graph capture of a step function, one graph per input shape.

`CapturedSteps(fn, num_staged)` wraps fn(*staged, *fixed): the first num_staged arguments change
every step (tensors, or AttentionBatch whose tensor fields do) and are copied into static
buffers; the rest (KV caches, aux layer ids) are passed through: the caches are the same tensors
on every call, and plain-value arguments (aux layer ids) are part of the graph's key. The first
call of a shape warms fn up on a side stream (torch.compile compiles here, cuBLAS picks its
workspaces), then captures one replay; later calls copy their inputs in and
replay. All graphs share one memory pool, so callers must consume (copy) the outputs of one
replay before the next one: `BucketedGraphs.run` clones what it keeps.

Warm-up runs the step for real on the first call's own inputs: a step's KV writes are
idempotent (the same K/V land in the same slots), so running it more than once is harmless.

Capture needs a step free of host syncs (.item(), .tolist(), data-dependent shapes); decode and
verify steps over bucket-padded inputs are.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from eyas.layers.attention import AttentionBatch

_BATCH_TENSORS = ("slot_mapping", "q_index", "out_index", "kv_slots", "mask")  # AttentionBatch fields


def _shape_key(x: Any) -> tuple:
    if isinstance(x, AttentionBatch):
        return tuple(tuple(getattr(x, n).shape) for n in _BATCH_TENSORS) + (x.mask_is_full,)
    return tuple(x.shape), x.dtype


def _rebuilt(x: Any, f: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """f of a tensor, or a fresh AttentionBatch of f of its tensors (with an empty derived cache,
    so that what layers derive from it is computed inside the graph)."""
    if isinstance(x, AttentionBatch):
        return AttentionBatch(**{n: f(getattr(x, n)) for n in _BATCH_TENSORS}, mask_is_full=x.mask_is_full)
    return f(x)


def _clone(x: Any) -> Any:
    """A static copy of a staged argument (a batch that attends in parts is refused)."""
    if isinstance(x, AttentionBatch) and x.parts is not None:
        raise ValueError("a step that attends in parts cannot be captured")
    return _rebuilt(x, torch.Tensor.clone)


def _fresh(x: Any) -> Any:
    """The same static tensors (a batch: with an empty derived cache)."""
    return _rebuilt(x, lambda t: t)


def _copy_into(static: Any, new: Any) -> None:
    if isinstance(static, AttentionBatch):
        for n in _BATCH_TENSORS:
            getattr(static, n).copy_(getattr(new, n), non_blocking=True)
    else:
        static.copy_(new, non_blocking=True)


class _Graph:
    def __init__(self, fn: Callable, staged: list, fixed: tuple, pool, warmup_iters: int = 2):
        self.static = [_clone(x) for x in staged]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup_iters):
                fn(*[_fresh(x) for x in self.static], *fixed)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.out = fn(*[_fresh(x) for x in self.static], *fixed)

    def replay(self, staged: list) -> Any:
        for s, x in zip(self.static, staged):
            _copy_into(s, x)
        self.graph.replay()
        return self.out


class CapturedSteps:
    """fn(*staged, *fixed) replayed from one CUDA graph per shape of the staged arguments."""

    def __init__(self, fn: Callable, num_staged: int):
        self.fn = fn
        self.num_staged = num_staged
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple, _Graph] = {}

    def __call__(self, *args):
        staged, fixed = list(args[:self.num_staged]), args[self.num_staged:]
        # fixed arguments that are plain values (aux layer ids) select the graph too
        values = tuple(a for a in fixed if isinstance(a, tuple) and all(isinstance(v, int) for v in a))
        key = (tuple(_shape_key(x) for x in staged), values)
        graph = self.graphs.get(key)
        if graph is None:
            graph = self.graphs[key] = _Graph(self.fn, staged, fixed, self.pool)
        return graph.replay(staged)
