"""Paged attention in plain PyTorch.

Tokens of a step are flat: q/k/v are [T, heads, D] for T tokens over B sequences, in sequence
order (all tokens of sequence 0, then of sequence 1, ...). The KV cache of a layer is
[num_blocks, block_size, kv_heads, D]; every kernel here reads it through the block-size-1 view
[num_blocks * block_size, kv_heads, D], where slot s = block * B + offset.

An `AttentionBatch` says, per step, where new KV goes (slot_mapping), which cached slots each
sequence attends to (kv_slots), and which keys each query may see (mask: causal, or a tree).

Every layer of a step attends with the same batch, so what can be derived from it alone (the
gather index of the keys, the additive float mask) is built by the first layer and kept on the
batch for the others (`AttentionBatch.derived`). K/V are gathered once per KV head, straight into
the [B, Hkv, Kmax, D] layout SDPA reads fastest, and never repeated for the query heads that
share them (see attend).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

FOLD_MAX_QUERIES = 8  # attend(): fold query heads into rows for steps of at most this many queries


@dataclass
class AttentionBatch:
    slot_mapping: torch.Tensor  # [T] int64: cache slot that receives each new token's K/V
    q_index: torch.Tensor  # [B, Qmax] int64: flat token row of query i of seq b; T = padding row
    out_index: torch.Tensor  # [T] int64: row in the [B * Qmax] padded output of each flat token
    kv_slots: torch.Tensor  # [B, Kmax] int64: cache slot of key j of seq b (padding: slot 0)
    mask: torch.Tensor  # [B, 1, Qmax, Kmax] bool: True where query i of seq b may attend key j
    mask_is_full: bool = False  # True only if every entry of mask is True (attention skips it)
    # A step whose sequences have very different query counts (decodes next to a prefill chunk)
    # attends in parts: each part is a batch over some of the sequences, its q_index pointing
    # at flat rows of the whole step, `rows` [T_part] the flat rows of its tokens in its own order.
    # The fields above still describe the whole step (slot_mapping writes every token).
    parts: Optional[list["AttentionBatch"]] = None
    rows: Optional[torch.Tensor] = None  # set on a part only
    _derived: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def num_seqs(self) -> int:
        return self.q_index.shape[0]

    def derived(self, key: Any, build: Callable[[], Any]) -> Any:
        """build(), computed once per batch and key (every layer of a step shares them).

        Inside torch.compile the value is rebuilt instead (the compiler dedupes it), so a traced
        graph never stores into the batch."""
        if torch.compiler.is_compiling():
            return build()
        if key not in self._derived:
            self._derived[key] = build()
        return self._derived[key]


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store new K/V [T, Hkv, D] at their slots of the [N, Bs, Hkv, D] caches (in place)."""
    k_flat = k_cache.view(-1, *k_cache.shape[2:])  # [N * Bs, Hkv, D]
    v_flat = v_cache.view(-1, *v_cache.shape[2:])
    k_flat.index_copy_(0, slot_mapping, k.to(k_flat.dtype))
    v_flat.index_copy_(0, slot_mapping, v.to(v_flat.dtype))


def head_major_rows(kv_slots: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[B, Kmax] slots -> [B * Hkv * Kmax] rows of the cache viewed as [N * Bs * Hkv, D].

    Gathering these rows gives the keys already in the [B, Hkv, Kmax, D] layout attention
    wants, in one contiguous copy (no transpose of the gathered K/V afterwards)."""
    heads = torch.arange(num_kv_heads, device=kv_slots.device)  # [Hkv]
    rows = kv_slots[:, None, :] * num_kv_heads + heads[None, :, None]  # [B, Hkv, Kmax]
    return rows.reshape(-1)


def gather_kv(cache: torch.Tensor, rows: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """[N, Bs, Hkv, D] cache, head-major rows -> [B, Hkv, Kmax, D] (contiguous copy)."""
    num_kv_heads, dim = cache.shape[2], cache.shape[3]
    picked = cache.view(-1, dim).index_select(0, rows)  # [B * Hkv * Kmax, D]
    return picked.view(num_seqs, num_kv_heads, -1, dim)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool mask -> the float mask SDPA would otherwise derive from it in every layer:
    0 where visible, -inf elsewhere (same shape)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def pad_queries(q: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
    """q [T, Hq, D] -> [B, Qmax, Hq, D] (padding queries are zeros; a view when dense)."""
    num_seqs, q_max = batch.q_index.shape
    if batch.rows is not None or q.shape[0] != num_seqs * q_max:  # a part, or padding: gather
        q = torch.cat([q, q.new_zeros(1, *q.shape[1:])]).index_select(0, batch.q_index.view(-1))
    return q.view(num_seqs, q_max, *q.shape[1:])


def unpad_output(out: torch.Tensor, batch: AttentionBatch, num_tokens: int) -> torch.Tensor:
    """[B, Qmax, Hq, Dv] -> [T, Hq, Dv] (padding queries dropped)."""
    out = out.reshape(-1, *out.shape[2:])  # [B * Qmax, Hq, Dv]
    return out if out.shape[0] == num_tokens else out.index_select(0, batch.out_index)


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
           bias: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """q [B, Qmax, Hq, D], keys/values [B, Hkv, Kmax, D|Dv], bias [B, 1, Qmax, Kmax] or None
    -> [B, Qmax, Hq, Dv]. Query head h reads KV head h // G (G = Hq / Hkv); K/V are not repeated.

    Short steps (decode, verify) fold the G query heads of a KV head into extra query rows of
    it, one [B, Hkv, Qmax * G] problem, which SDPA runs faster than GQA over few rows; the mask
    is then repeated G times, so long steps (prefill) use SDPA's GQA instead."""
    num_seqs, q_max, num_heads, dim = q.shape
    num_kv_heads = keys.shape[1]
    group = num_heads // num_kv_heads
    if q_max > FOLD_MAX_QUERIES or group == 1:
        if bias is not None and group > 1 and q.is_cuda:
            # CUDA's fused kernels take a mask or GQA, not both (the math fallback materialises
            # fp32 scores): repeat K/V to the query heads instead
            keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
            group = 1
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=bias,
                                             scale=scale, enable_gqa=group > 1)  # [B, Hq, Qmax, Dv]
        return out.transpose(1, 2)
    rows = q_max * group  # row i * G + g: query i, head g of the group
    q = q.view(num_seqs, q_max, num_kv_heads, group, dim).transpose(1, 2)  # [B, Hkv, Qmax, G, D]
    if bias is not None:  # a view when Qmax == 1
        k_max = bias.shape[-1]
        bias = bias.unsqueeze(3).expand(num_seqs, 1, q_max, group, k_max).reshape(num_seqs, 1, rows, k_max)
    out = F.scaled_dot_product_attention(q.reshape(num_seqs, num_kv_heads, rows, dim), keys, values,
                                         attn_mask=bias, scale=scale)  # [B, Hkv, Qmax * G, Dv]
    out = out.view(num_seqs, num_kv_heads, q_max, group, -1).transpose(1, 2)  # [B, Qmax, Hkv, G, Dv]
    return out.reshape(num_seqs, q_max, num_heads, -1)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor,
                    batch: AttentionBatch, scale: float) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D] -> out [T, Hq, D]. Writes k/v to the cache first."""
    write_kv(k_cache, v_cache, k, v, batch.slot_mapping)
    if batch.parts is None:
        return cached_attention(q, k_cache, v_cache, batch, scale)
    out = q.new_empty(q.shape[0], q.shape[1], v_cache.shape[-1])  # [T, Hq, Dv]
    for part in batch.parts:
        out.index_copy_(0, part.rows, cached_attention(q, k_cache, v_cache, part, scale))
    return out


def cached_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     batch: AttentionBatch, scale: float) -> torch.Tensor:
    """Attention of the batch's queries over cached K/V: [T, Hq, D] -> [T_batch, Hq, Dv] (for a
    part, its tokens in the order of batch.rows)."""
    num_seqs, num_kv_heads = batch.num_seqs, k_cache.shape[2]
    rows = batch.derived(("kv_rows", num_kv_heads),
                         lambda: head_major_rows(batch.kv_slots, num_kv_heads))
    keys = gather_kv(k_cache, rows, num_seqs).to(q.dtype)  # [B, Hkv, Kmax, D]
    values = gather_kv(v_cache, rows, num_seqs).to(q.dtype)  # [B, Hkv, Kmax, Dv]
    bias: Optional[torch.Tensor] = None  # [B, 1, Qmax, Kmax]
    if not batch.mask_is_full:
        bias = batch.derived(("bias", q.dtype), lambda: additive_mask(batch.mask, q.dtype))
    out = attend(pad_queries(q, batch), keys, values, bias, scale)  # [B, Qmax, Hq, Dv]
    return unpad_output(out, batch, q.shape[0] if batch.rows is None else batch.rows.shape[0])
