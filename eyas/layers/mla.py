"""Multi-head latent attention (MLA, DeepSeek-V2/V3, Kimi-K2) over a paged latent cache.

Per token (Hn heads, R = kv_lora_rank, P = qk_rope_head_dim, N = qk_nope_head_dim, V = v_head_dim):

    q      = q_b_proj(q_a_layernorm(q_a_proj(x)))  (or q_proj(x))  -> [Hn, N + P] = [q_nope | q_pe]
    c, kpe = kv_a_proj_with_mqa(x)                                  -> [R], [P]
    c      = kv_a_layernorm(c)                                      the compressed latent
    q_pe, kpe rotated by rope (decoupled: only these P dims carry position)
    kv_b_proj: c -> per head [k_nope (N) | v (V)], i.e. W_uk [Hn, N, R] and W_uv [Hn, V, R]

The cache keeps one "head" per token: entry = [c | kpe] of R + P values (`KVLayout.mla`).

Two ways to attend, equal in exact arithmetic:
  plain     decompress every cached entry through kv_b_proj into per-head K [N + P] and V [V],
            then ordinary attention. Cheap when queries are many (prefill).
  absorbed  fold W_uk into the query (q_lat = q_nope W_uk, [Hn, R]) and W_uv into the output:
            score = q_lat . c + q_pe . kpe, attend over the entries [R + P] themselves as one
            shared key head (values = c), then out = (attn-weighted c) W_uv^T. No per-token
            decompression: cheap when queries are few (decode, verify).

The latent cache is read through the block-size-1 view of the allocator's storage: [num_blocks,
B, 1, R + P] seen as [num_blocks * B, 1, 1, R + P], indexed by the slot list (the block table
of that view). `kv_view = "blocked"` reads the same entries through (block, offset) indexing
instead; both give identical results (tests/test_mla_*).

Tensor parallel seam: q_b_proj / kv_b_proj are column-parallel (heads split), o_proj is
row-parallel, q_a_proj / kv_a_proj_with_mqa are replicated; the latent cache is the same on
every rank.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from eyas.errors import ConfigError
from eyas.kv.cache import block_size_one_view
from eyas.layers.attention import AttentionBatch
from eyas.layers.linear import ColumnLinear, ReplicatedLinear, RowLinear
from eyas.layers.norm import RMSNorm
from eyas.layers.rotary import RopeScaling, apply_rotary

MLA_MODES = ("auto", "plain", "absorbed")
KV_VIEWS = ("flat", "blocked")


def _yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def mla_softmax_scale(qk_head_dim: int, scaling: RopeScaling) -> float:
    """(N + P)^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN as DeepSeek configures it
    (HF `yarn_apply_mscale`: any non-default rope type with a non-zero mscale_all_dim)."""
    scale = qk_head_dim ** -0.5
    if scaling.rope_type != "default" and scaling.mscale_all_dim:
        m = _yarn_mscale(scaling.factor, float(scaling.mscale_all_dim))
        scale = scale * m * m
    return scale


@dataclass(frozen=True)
class MLAShape:
    hidden_size: int
    num_heads: int
    q_lora_rank: Optional[int]  # None: one q_proj, no low-rank query
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    scale: float  # softmax scale (mla_softmax_scale)
    rope_interleave: bool  # DeepSeek checkpoints: rope dims come as interleaved pairs
    bias: bool = False  # attention_bias: q_a_proj, kv_a_proj_with_mqa, o_proj
    latent_norm_eps: float = 1e-6  # q_a_layernorm / kv_a_layernorm (HF uses its default 1e-6)

    def __post_init__(self):
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        if min(self.kv_lora_rank, self.qk_nope_head_dim, self.v_head_dim, self.num_heads) < 1:
            raise ConfigError(f"MLA sizes must be positive: {self}")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def cache_dim(self) -> int:  # per-token latent entry
        return self.kv_lora_rank + self.qk_rope_head_dim


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """[..., P] pairs (x0, x1), (x2, x3), ... -> [x0, x2, ..., x1, x3, ...].

    HF DeepSeek-V3 with rope_interleave=True rotates pair i by frequency i and returns the
    de-interleaved order; rotating the de-interleaved vector neox-style is the same numbers.
    """
    return torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)


def read_entries(cache: torch.Tensor, slots: torch.Tensor, view: str = "flat") -> torch.Tensor:
    """Latent cache [num_blocks, B, 1, R + P], slots [S, K] -> entries [S, K, R + P].

    flat: the block-size-1 view (block table = slots); blocked: (slot // B, slot % B) indexing.
    """
    if view == "flat":
        return block_size_one_view(cache)[slots][:, :, 0, 0]  # [S, K, 1, 1, R+P] -> [S, K, R+P]
    if view == "blocked":
        block_size = cache.shape[1]
        return cache[slots // block_size, slots % block_size][:, :, 0]
    raise ConfigError(f"kv_view must be one of {', '.join(KV_VIEWS)}, got {view!r}")


class MLAttention(nn.Module):
    """x [T, H] -> [T, H]; writes each token's latent entry at attn.slot_mapping."""

    def __init__(self, shape: MLAShape, dtype: torch.dtype):
        super().__init__()
        s = shape
        self.shape = s
        self.num_heads = s.num_heads  # per rank (tp_size = 1 today)
        self.mode = "auto"  # auto: the cheaper path for the step's shape (absorbed_is_cheaper)
        self.kv_view = "flat"  # flat: block-size-1 view; blocked: (block, offset) indexing
        q_out = s.num_heads * s.qk_head_dim
        if s.q_lora_rank is None:
            self.q_proj = ColumnLinear(s.hidden_size, q_out, dtype=dtype)
        else:
            self.q_a_proj = ReplicatedLinear(s.hidden_size, s.q_lora_rank, bias=s.bias, dtype=dtype)
            self.q_a_layernorm = RMSNorm(s.q_lora_rank, s.latent_norm_eps, dtype)
            self.q_b_proj = ColumnLinear(s.q_lora_rank, q_out, dtype=dtype)
        self.kv_a_proj_with_mqa = ReplicatedLinear(s.hidden_size, s.cache_dim, bias=s.bias,
                                                   dtype=dtype)
        self.kv_a_layernorm = RMSNorm(s.kv_lora_rank, s.latent_norm_eps, dtype)
        self.kv_b_proj = ColumnLinear(s.kv_lora_rank,
                                      s.num_heads * (s.qk_nope_head_dim + s.v_head_dim), dtype=dtype)
        self.o_proj = RowLinear(s.num_heads * s.v_head_dim, s.hidden_size, bias=s.bias, dtype=dtype)

    def _query(self, x: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, Hn, N + P]
        if self.shape.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        return q.view(x.shape[0], self.num_heads, self.shape.qk_head_dim)

    def _kv_b(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj weight as W_uk [Hn, N, R] and W_uv [Hn, V, R] (views)."""
        s = self.shape
        w = self.kv_b_proj.weight.view(self.num_heads, s.qk_nope_head_dim + s.v_head_dim,
                                       s.kv_lora_rank)
        return w[:, :s.qk_nope_head_dim], w[:, s.qk_nope_head_dim:]

    def absorbed_is_cheaper(self, queries: int, keys: int) -> bool:
        """Per sequence and head, with Q queries over K keys (multiply-adds):
        plain    K R (N + V)  decompression  +  Q K (N + P + V)  attention
        absorbed Q R (N + V)  q/out folding  +  Q K (2R + P)     attention
        Decode and verify steps (Q << K) take the absorbed path, prefill (Q ~ K) the plain one."""
        s = self.shape
        fold = s.kv_lora_rank * (s.qk_nope_head_dim + s.v_head_dim)
        plain = keys * fold + queries * keys * (s.qk_head_dim + s.v_head_dim)
        absorbed = queries * fold + queries * keys * (2 * s.kv_lora_rank + s.qk_rope_head_dim)
        return absorbed < plain

    def use_absorbed(self, attn: AttentionBatch) -> bool:
        if self.mode not in MLA_MODES:
            raise ConfigError(f"MLA mode must be one of {', '.join(MLA_MODES)}, got {self.mode!r}")
        if self.mode == "auto":  # shapes only: a compiled graph keeps one path per shape
            return self.absorbed_is_cheaper(attn.q_index.shape[1], attn.kv_slots.shape[1])
        return self.mode == "absorbed"

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn: AttentionBatch, kv_cache: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x [T, H], cos/sin [T, 1, P] -> [T, H]. kv_cache[0] is the latent [N, B, 1, R + P]."""
        s = self.shape
        num_tokens = x.shape[0]
        q_nope, q_pe = self._query(x).split([s.qk_nope_head_dim, s.qk_rope_head_dim], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([s.kv_lora_rank, s.qk_rope_head_dim], -1)
        latent = self.kv_a_layernorm(latent)  # [T, R]
        k_pe = k_pe.unsqueeze(1)  # [T, 1, P]
        if s.rope_interleave:
            q_pe, k_pe = deinterleave(q_pe), deinterleave(k_pe)
        q_pe = apply_rotary(q_pe, cos, sin)  # [T, Hn, P]
        k_pe = apply_rotary(k_pe, cos, sin)  # [T, 1, P]

        cache = kv_cache[0]
        entry = torch.cat([latent.unsqueeze(1), k_pe], dim=-1)  # [T, 1, R + P]
        cache.view(-1, 1, s.cache_dim).index_copy_(0, attn.slot_mapping, entry.to(cache.dtype))
        entries = read_entries(cache, attn.kv_slots, self.kv_view).to(x.dtype)  # [B, Kmax, R+P]

        if self.use_absorbed(attn):
            out = self._absorbed(q_nope, q_pe, entries, attn)
        else:
            out = self._plain(q_nope, q_pe, entries, attn)
        return self.o_proj(out.reshape(num_tokens, self.num_heads * s.v_head_dim))

    @staticmethod
    def _pad_queries(q: torch.Tensor, attn: AttentionBatch) -> torch.Tensor:
        """[T, Hn, D] -> [B, Hn, Qmax, D] (padding rows are zeros)."""
        return torch.cat([q, q.new_zeros(1, *q.shape[1:])])[attn.q_index].transpose(1, 2)

    @staticmethod
    def _unpad(out: torch.Tensor, attn: AttentionBatch) -> torch.Tensor:
        """[B, Hn, Qmax, D] -> [T, Hn, D]."""
        out = out.transpose(1, 2)
        return out.reshape(-1, *out.shape[2:])[attn.out_index]

    def _plain(self, q_nope: torch.Tensor, q_pe: torch.Tensor, entries: torch.Tensor,
               attn: AttentionBatch) -> torch.Tensor:
        """Decompress keys/values per head; returns [T, Hn, V]."""
        s = self.shape
        seqs, k_max = entries.shape[:2]
        latent, k_pe = entries.split([s.kv_lora_rank, s.qk_rope_head_dim], dim=-1)
        kv = self.kv_b_proj(latent.reshape(seqs * k_max, s.kv_lora_rank))  # [B*Kmax, Hn*(N+V)]
        kv = kv.view(seqs, k_max, self.num_heads, s.qk_nope_head_dim + s.v_head_dim)
        k_nope, v = kv.split([s.qk_nope_head_dim, s.v_head_dim], dim=-1)  # [B, Kmax, Hn, N|V]
        k_pe = k_pe.unsqueeze(2).expand(seqs, k_max, self.num_heads, s.qk_rope_head_dim)
        k = torch.cat([k_nope, k_pe], dim=-1)  # [B, Kmax, Hn, N + P]
        q = self._pad_queries(torch.cat([q_nope, q_pe], dim=-1), attn)  # [B, Hn, Qmax, N + P]
        out = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=attn.mask, scale=s.scale)  # [B, Hn, Qmax, V]
        return self._unpad(out, attn)

    def _absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, entries: torch.Tensor,
                  attn: AttentionBatch) -> torch.Tensor:
        """Attend in latent space against the entries as one shared head; returns [T, Hn, V]."""
        s = self.shape
        w_uk, w_uv = self._kv_b()  # [Hn, N, R], [Hn, V, R]
        q_latent = torch.einsum("thn,hnr->thr", q_nope, w_uk)  # [T, Hn, R]
        q = self._pad_queries(torch.cat([q_latent, q_pe], dim=-1), attn)  # [B, Hn, Qmax, R + P]
        keys = entries.unsqueeze(1)  # [B, 1, Kmax, R + P]
        values = keys[..., :s.kv_lora_rank]  # [B, 1, Kmax, R]: the latent is the value
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=attn.mask, scale=s.scale,
                                             enable_gqa=True)  # [B, Hn, Qmax, R]
        out = self._unpad(out, attn)  # [T, Hn, R]
        return torch.einsum("thr,hvr->thv", out, w_uv)  # [T, Hn, V]
