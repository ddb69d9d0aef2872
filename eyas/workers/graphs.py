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
dropped. On CUDA the graphs use `mode="reduce-overhead"` (CUDA graphs; the KV caches are marked
static addresses so in-place cache writes are part of the graph).

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


def pad_inputs(inputs: ForwardInputs, q: int, batch: int, kv_len: int, pad_slot: int) -> ForwardInputs:
    """Pad a uniform-q step ([B, q] tokens, Kmax keys) to [batch, q] tokens and kv_len keys."""
    attn = inputs.attn
    b, k_max = attn.kv_slots.shape
    device = inputs.input_ids.device
    extra = (batch - b) * q
    total = batch * q

    def pad_flat(x: torch.Tensor, value: int) -> torch.Tensor:  # [B*q] -> [batch*q]
        return torch.cat([x, x.new_full((extra,), value)]) if extra else x

    kv_slots = attn.kv_slots.new_full((batch, kv_len), pad_slot)  # [batch, kv_len]
    kv_slots[:b, :k_max] = attn.kv_slots
    real_pad = torch.arange(kv_len, device=device) >= k_max
    kv_slots[:b] = torch.where(real_pad, pad_slot, kv_slots[:b])
    mask = torch.zeros(batch, 1, q, kv_len, dtype=torch.bool, device=device)  # [batch, 1, q, kv_len]
    mask[:b, :, :, :k_max] = attn.mask
    mask[b:, :, :, 0] = True  # padded sequences see the pad slot only
    rows = torch.arange(total, device=device)
    padded = AttentionBatch(
        slot_mapping=pad_flat(attn.slot_mapping, pad_slot),
        q_index=rows.view(batch, q),
        out_index=rows,
        kv_slots=kv_slots,
        mask=mask,
    )
    return replace(inputs, input_ids=pad_flat(inputs.input_ids, 0),
                   positions=pad_flat(inputs.positions, 0), attn=padded)


class GraphRunner:
    """Runs uniform-q steps through compiled forwards on bucketed shapes."""

    def __init__(self, forward: Callable, kv_caches: list, device: torch.device, pad_slot: int,
                 max_batch: int, max_q: int = 1, kv_bucket: int = 256, backend: Optional[str] = None):
        self.device = device
        self.max_q = max_q  # widest step that runs compiled (decode 1, verify K + 1)
        self.pad_slot = pad_slot
        self.buckets = batch_buckets(max_batch)
        self.kv_bucket = kv_bucket
        if device.type == "cuda":
            for k, v in kv_caches:
                torch._dynamo.mark_static_address(k)
                torch._dynamo.mark_static_address(v)
            self.fn = torch.compile(forward, mode="reduce-overhead", dynamic=False)
        else:
            self.fn = torch.compile(forward, dynamic=False, backend=backend or "inductor")
        self.seen: set[tuple[int, int, int]] = set()

    def bucket(self, batch: int) -> Optional[int]:
        return next((b for b in self.buckets if b >= batch), None)

    def can_run(self, spans: Seq[SeqSpan]) -> bool:
        q = uniform_q(spans)
        return q is not None and q <= self.max_q and self.bucket(len(spans)) is not None

    def shape_of(self, inputs: ForwardInputs, q: int) -> tuple[int, int, int]:
        b, k_max = inputs.attn.kv_slots.shape
        return self.bucket(b), q, round_up(k_max, self.kv_bucket)

    def run(self, inputs: ForwardInputs, q: int, kv_caches: list, aux_layer_ids: tuple[int, ...]):
        """Forward over bucket-padded inputs; returns (hidden [T, H], aux [T, H] each), unpadded."""
        batch, q, kv_len = self.shape_of(inputs, q)
        if (batch, q, kv_len) not in self.seen:
            self.seen.add((batch, q, kv_len))
            log.info("compiling step graph: batch %d, q %d, keys %d", batch, q, kv_len)
        padded = pad_inputs(inputs, q, batch, kv_len, self.pad_slot)
        hidden, aux = self.fn(padded.input_ids, padded.positions, padded.attn, kv_caches, aux_layer_ids)
        t = inputs.input_ids.shape[0]
        return hidden[:t].clone(), [a[:t].clone() for a in aux]
