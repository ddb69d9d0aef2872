"""Compiled decode and verify steps on fixed shape buckets.

A decode step (q = 1 token per sequence) or a verify step (q = K + 1, chain or tree) has the same
number of query tokens for every sequence, so its flat tokens form a [B, q] grid. `GraphRunner`
pads that grid to a bucket and runs a `torch.compile`d forward whose shapes repeat:

    B      -> the next batch bucket (1, 2, 4, 8, ... max_num_seqs)
    Kmax   -> the next multiple of `kv_bucket` keys per sequence
    q      -> as given (one graph family per q)

Padding rows read and write only `pad_slot`, a cache slot past the allocator's blocks that no
sequence owns: padded tokens write their K/V there, padded keys point there and are masked, and
padded sequences attend to it alone (so their softmax stays finite). Outputs of padded rows are
dropped. On CUDA each bucket shape is captured as an explicit CUDA graph (workers/cuda_graphs.py)
of the eager step, or of the torch.compile'd one with compile_backend="inductor"; the KV caches
are the same tensors on every call, so in-place cache writes are part of the graph.

`DraftGraphRunner` does the same for the EAGLE-3 drafter's chain steps (q = 1, drafter forward +
logits): its per-row inputs (embeddings, hidden states, positions) are padded to the batch
bucket with zero rows, its AttentionBatch exactly as the target's, against the drafter cache's
own pad slot.

Prefill and mixed steps (and anything wider than max_q) stay eager: their shapes do not repeat.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Callable, Optional, Sequence as Seq

import torch

from eyas.layers.attention import AttentionBatch
from eyas.workers.input_batch import ForwardInputs, SeqSpan

log = logging.getLogger("eyas")

KVCache = tuple[torch.Tensor, torch.Tensor]  # (k, v), each [num_blocks, block_size, Hkv, D]


def batch_buckets(max_batch: int) -> list[int]:
    """Powers of two up to (and including one >=) max_batch."""
    out, b = [], 1
    while True:
        out.append(b)
        if b >= max_batch:
            return out
        b *= 2


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def uniform_q(spans: Seq[SeqSpan]) -> Optional[int]:
    """The common number of new tokens per span, or None if they differ."""
    q = len(spans[0].token_ids)
    return q if all(len(s.token_ids) == q for s in spans) else None


def pad_rows(x: torch.Tensor, rows: int, value: int = 0) -> torch.Tensor:
    """[n, ...] -> [rows, ...]: x, then rows - n rows filled with value."""
    extra = rows - x.shape[0]
    return torch.cat([x, x.new_full((extra, *x.shape[1:]), value)]) if extra else x


def pad_attention(attn: AttentionBatch, q: int, batch: int, kv_len: int, pad_slot: int) -> AttentionBatch:
    """A uniform-q batch ([B, q] queries, Kmax keys) padded to [batch, q] queries and kv_len keys.

    Padded tokens write pad_slot; padded keys of real sequences point at pad_slot and are masked;
    padded sequences see pad_slot alone (so their softmax stays finite)."""
    b, k_max = attn.kv_slots.shape
    device = attn.kv_slots.device
    kv_slots = attn.kv_slots.new_full((batch, kv_len), pad_slot)  # [batch, kv_len]
    kv_slots[:b, :k_max] = attn.kv_slots
    real_pad = torch.arange(kv_len, device=device) >= k_max  # [kv_len]
    kv_slots[:b] = torch.where(real_pad, pad_slot, kv_slots[:b])
    mask = torch.zeros(batch, 1, q, kv_len, dtype=torch.bool, device=device)  # [batch, 1, q, kv_len]
    mask[:b, :, :, :k_max] = attn.mask
    mask[b:, :, :, 0] = True  # padded sequences see the pad slot only
    rows = torch.arange(batch * q, device=device)  # [batch * q]
    return AttentionBatch(
        slot_mapping=pad_rows(attn.slot_mapping, batch * q, pad_slot),
        q_index=rows.view(batch, q),
        out_index=rows,
        kv_slots=kv_slots,
        mask=mask,
    )


def pad_inputs(inputs: ForwardInputs, q: int, batch: int, kv_len: int, pad_slot: int) -> ForwardInputs:
    """Pad a uniform-q step ([B, q] tokens, Kmax keys) to [batch, q] tokens and kv_len keys."""
    total = batch * q
    return replace(inputs, input_ids=pad_rows(inputs.input_ids, total),
                   positions=pad_rows(inputs.positions, total),
                   attn=pad_attention(inputs.attn, q, batch, kv_len, pad_slot))


def allow_recompiles(num_graphs: int) -> None:
    """Let dynamo keep num_graphs more shape-specialised graphs (per function, and in all).

    With dynamic=False every bucket is a recompile of the same function; past dynamo's limit
    (8 by default) later buckets would silently run eagerly. Our shapes are bounded by the
    buckets, so the limits grow by what one runner can ever need."""
    cfg = torch._dynamo.config
    cfg.recompile_limit += num_graphs
    cfg.accumulated_recompile_limit += num_graphs


def compile_step(forward: Callable, device: torch.device, backend: Optional[str] = None,
                 num_staged: int = 3) -> Callable:
    """The bucketed step: torch.compile'd with `backend`, or eager for backend "none".

    On GPU every bucket shape is captured as an explicit CUDA graph (workers/cuda_graphs.py; the
    first num_staged arguments are the per-step inputs). There the default (None) is "none": the
    eager step's kernels replayed from graphs, which start in seconds (as SGLang's default does);
    "inductor" compiles once with dynamic shapes and captures the compiled step. On CPU the
    default is inductor with static shapes, one graph per bucket."""
    if device.type == "cuda":
        from eyas.workers.cuda_graphs import CapturedSteps

        eager = backend in (None, "none")
        fn = forward if eager else torch.compile(forward, dynamic=True, backend=backend)
        return CapturedSteps(fn, num_staged)
    if backend == "none":
        return forward
    return torch.compile(forward, dynamic=False, backend=backend or "inductor")


class BucketedGraphs:
    """A step function compiled on bucketed shapes (batch bucket, q, key bucket); `seen` holds
    the shapes it has run."""

    kind = "step"  # for the log

    def __init__(self, forward: Callable, kv_caches: Seq[KVCache], device: torch.device, pad_slot: int,
                 max_batch: int, max_q: int = 1, kv_bucket: int = 256, backend: Optional[str] = None,
                 num_staged: int = 3):
        self.device = device
        self.max_q = max_q  # widest step that runs compiled (decode 1, verify K + 1)
        self.pad_slot = pad_slot
        self.buckets = batch_buckets(max_batch)
        self.kv_bucket = kv_bucket
        cache_slots = kv_caches[0][0].shape[0] * kv_caches[0][0].shape[1]  # bounds any sequence's keys
        allow_recompiles(len(self.buckets) * max_q * -(-cache_slots // kv_bucket))
        self.fn = compile_step(forward, device, backend, num_staged)
        self.seen: set[tuple[int, int, int]] = set()

    def bucket(self, batch: int) -> Optional[int]:
        return next((b for b in self.buckets if b >= batch), None)

    def shape_of(self, attn: AttentionBatch, q: int) -> tuple[int, int, int]:
        """(batch bucket, q, key bucket) of a uniform-q batch of [B, Kmax] keys."""
        b, k_max = attn.kv_slots.shape
        return self.bucket(b), q, round_up(k_max, self.kv_bucket)

    def warm_key_lengths(self, max_len: Optional[int] = None) -> list[int]:
        """Key buckets to prepare at start-up: on GPU every one up to max_len (a capture costs a
        few eager steps, so none is left for the first timed use), on CPU the shortest (each
        bucket is a compile there)."""
        if self.device.type != "cuda" or not max_len:
            return [self.kv_bucket]
        return list(range(self.kv_bucket, round_up(max_len, self.kv_bucket) + 1, self.kv_bucket))

    def note(self, shape: tuple[int, int, int]) -> None:
        if shape not in self.seen:
            self.seen.add(shape)
            log.info("compiling %s graph: batch %d, q %d, keys %d", self.kind, *shape)


class GraphRunner(BucketedGraphs):
    """Runs the target's uniform-q steps through compiled forwards on bucketed shapes."""

    def can_run(self, spans: Seq[SeqSpan]) -> bool:
        q = uniform_q(spans)
        return q is not None and q <= self.max_q and self.bucket(len(spans)) is not None

    def run(self, inputs: ForwardInputs, q: int, kv_caches: list, aux_layer_ids: tuple[int, ...]):
        """Forward over bucket-padded inputs; returns (hidden [T, H], aux [T, H] each), unpadded."""
        batch, q, kv_len = shape = self.shape_of(inputs.attn, q)
        self.note(shape)
        padded = pad_inputs(inputs, q, batch, kv_len, self.pad_slot)
        hidden, aux = self.fn(padded.input_ids, padded.positions, padded.attn, kv_caches, aux_layer_ids)
        t = inputs.input_ids.shape[0]
        return hidden[:t].clone(), [a[:t].clone() for a in aux]


class DraftGraphRunner(BucketedGraphs):
    """Runs the drafter's chain steps (one query per sequence: forward + logits) compiled.

    `step(embeds, hidden, positions, attn, kv_cache) -> (out [T, H], logits [T, Vd])` is the
    eager step; the compiled copy sees it on bucket-padded inputs."""

    kind = "draft step"

    def __init__(self, step: Callable, kv_cache: KVCache, device: torch.device, pad_slot: int,
                 max_batch: int, kv_bucket: int = 256, backend: Optional[str] = None):
        super().__init__(step, [kv_cache], device, pad_slot, max_batch, max_q=1, kv_bucket=kv_bucket,
                         backend=backend, num_staged=4)

    def can_run(self, num_seqs: int) -> bool:
        return self.bucket(num_seqs) is not None

    def run(self, embeds: torch.Tensor, hidden: torch.Tensor, inputs: ForwardInputs,
            kv_cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """embeds [S, H], hidden [S, H], a q = 1 step over S sequences -> (out [S, H],
        logits [S, Vd]), unpadded."""
        batch, _, kv_len = shape = self.shape_of(inputs.attn, 1)
        self.note(shape)
        attn = pad_attention(inputs.attn, 1, batch, kv_len, self.pad_slot)
        out, logits = self.fn(pad_rows(embeds, batch), pad_rows(hidden, batch),  # [batch, H] each
                              pad_rows(inputs.positions, batch), attn, kv_cache)
        s = embeds.shape[0]
        return out[:s].clone(), logits[:s].clone()
