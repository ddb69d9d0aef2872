"""Paged attention in plain PyTorch.

Tokens of a step are flat: q/k/v are [T, heads, D] for T tokens over B sequences. The KV
cache of a layer is [num_blocks, block_size, kv_heads, D]; every kernel here reads it through
the block-size-1 view [num_blocks * block_size, kv_heads, D], where slot s = block * B + offset.

An `AttentionBatch` says, per step, where new KV goes (slot_mapping), which cached slots each
sequence attends to (kv_slots), and which keys each query may see (mask: causal, or a tree).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionBatch:
    slot_mapping: torch.Tensor  # [T] int64: cache slot that receives each new token's K/V
    q_index: torch.Tensor  # [B, Qmax] int64: flat token row of query i of seq b; T = padding row
    out_index: torch.Tensor  # [T] int64: row in the [B * Qmax] padded output of each flat token
    kv_slots: torch.Tensor  # [B, Kmax] int64: cache slot of key j of seq b (padding: slot 0)
    mask: torch.Tensor  # [B, 1, Qmax, Kmax] bool: True where query i of seq b may attend key j

    @property
    def num_seqs(self) -> int:
        return self.q_index.shape[0]


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store new K/V [T, Hkv, D] at their slots of the [N, Bs, Hkv, D] caches (in place)."""
    k_flat = k_cache.view(-1, *k_cache.shape[2:])  # [N * Bs, Hkv, D]
    v_flat = v_cache.view(-1, *v_cache.shape[2:])
    k_flat.index_copy_(0, slot_mapping, k.to(k_flat.dtype))
    v_flat.index_copy_(0, slot_mapping, v.to(v_flat.dtype))


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor,
                    batch: AttentionBatch, scale: float) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D] -> out [T, Hq, D]. Writes k/v to the cache first."""
    write_kv(k_cache, v_cache, k, v, batch.slot_mapping)
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    keys = k_cache.view(-1, num_kv_heads, head_dim)[batch.kv_slots]  # [B, Kmax, Hkv, D]
    values = v_cache.view(-1, num_kv_heads, v_cache.shape[3])[batch.kv_slots]
    q_pad = torch.cat([q, q.new_zeros(1, *q.shape[1:])])[batch.q_index]  # [B, Qmax, Hq, D]
    num_heads = q.shape[1]
    # GQA without copying K/V: each group of Hq / Hkv query heads shares one KV head.
    out = F.scaled_dot_product_attention(
        q_pad.transpose(1, 2), keys.to(q.dtype).transpose(1, 2), values.to(q.dtype).transpose(1, 2),
        attn_mask=batch.mask, scale=scale, enable_gqa=num_heads != num_kv_heads)  # [B, Hq, Qmax, Dv]
    out = out.transpose(1, 2).reshape(-1, num_heads, out.shape[-1])  # [B * Qmax, Hq, Dv]
    return out[batch.out_index]
