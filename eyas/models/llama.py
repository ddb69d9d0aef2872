"""Llama-family decoder: Llama 2/3, Mistral, Qwen2 (qkv bias), Qwen3 (per-head q/k norm).

Parameter names follow HF (`model.layers.N.self_attn.qkv_proj.weight`, ...), except that
q/k/v and gate/up are fused; `packed_modules_mapping` routes checkpoint names onto them.
Tokens are flat: [T] ids over all sequences of a step, attention is paged.

Tensor parallelism (a ParallelState with tp_size > 1): q/k/v and gate/up are column-parallel,
so each rank runs attention over its own Hq/tp query heads and Hkv/tp kv heads (one replicated kv
head when tp > Hkv); o_proj and down_proj are row-parallel and all-reduce, so the residual
stream [T, H] (and every aux hidden state) is whole on every rank. The embedding and the LM head
are vocab-parallel: the embedding all-reduces, compute_logits gathers. The model's num_kv_heads
is the local count: every rank's KV cache is [num_blocks, block_size, Hkv_local, D].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from eyas.distributed.state import ParallelState
from eyas.errors import ConfigError
from eyas.layers.activation import SiluAndMul
from eyas.layers.attention import AttentionBatch, paged_attention
from eyas.layers.linear import (LMHead, MergedColumnLinear, QKVLinear, RowLinear, VocabEmbedding,
                                kv_heads_per_rank)
from eyas.layers.norm import RMSNorm
from eyas.layers.rotary import RopeScaling, RotaryEmbedding, apply_rotary, rope_from_hf_config
from eyas.models.decoder import DecoderForCausalLM

KVCache = tuple[torch.Tensor, torch.Tensor]  # (k, v), each [num_blocks, block_size, Hkv, D]


@dataclass(frozen=True)
class LlamaArch:
    """What differs between family members, read once from the HF config."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    max_position: int
    rope_theta: float
    rope_scaling: RopeScaling
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool  # Qwen3: RMSNorm over each q/k head before rope
    tie_word_embeddings: bool
    sliding_window: Optional[int]  # attention is full: exact only up to this many tokens

    @classmethod
    def from_hf_config(cls, config: Any) -> "LlamaArch":
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"hidden_act {act!r} is not supported (only 'silu')")
        model_type = getattr(config, "model_type", "llama")
        attention_bias = bool(getattr(config, "attention_bias", False))
        num_heads = config.num_attention_heads
        theta, scaling = rope_from_hf_config(config)
        window = getattr(config, "sliding_window", None)
        if model_type in ("qwen2", "qwen3") and not getattr(config, "use_sliding_window", False):
            window = None
        return cls(
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // num_heads,
            vocab_size=config.vocab_size,
            rms_norm_eps=config.rms_norm_eps,
            max_position=config.max_position_embeddings,
            rope_theta=theta,
            rope_scaling=scaling,
            qkv_bias=attention_bias or model_type == "qwen2",
            o_bias=attention_bias,
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            sliding_window=window,
        )

    def check_tensor_parallel(self, tp_size: int) -> None:
        """Raise ConfigError unless the heads and the MLP split evenly over tp_size ranks."""
        for what, n in (("num_attention_heads", self.num_heads),
                        ("intermediate_size", self.intermediate_size)):
            if n % tp_size:
                raise ConfigError(f"tensor parallelism: {what}={n} is not divisible by "
                                  f"tp_size={tp_size}")
        try:
            kv_heads_per_rank(self.num_kv_heads, tp_size)
        except ConfigError as e:
            raise ConfigError(f"tensor parallelism: {e} (kv heads are split, or replicated "
                              f"when tp_size is a multiple of them)") from None


class LlamaAttention(nn.Module):
    """Attention over this rank's heads; num_heads / num_kv_heads are the local counts."""

    def __init__(self, arch: LlamaArch, dtype: torch.dtype,
                 parallel: Optional[ParallelState] = None):
        super().__init__()
        tp = parallel or ParallelState()
        self.qkv_proj = QKVLinear(arch.hidden_size, arch.head_dim, arch.num_heads,
                                  arch.num_kv_heads, bias=arch.qkv_bias, dtype=dtype,
                                  tp_size=tp.tp_size, tp_rank=tp.tp_rank)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.head_dim = arch.head_dim
        self.scale = arch.head_dim ** -0.5
        self.qk_size = (self.num_heads + self.num_kv_heads) * arch.head_dim
        self.o_proj = RowLinear(arch.num_heads * arch.head_dim, arch.hidden_size,
                                bias=arch.o_bias, dtype=dtype, tp_size=tp.tp_size,
                                tp_rank=tp.tp_rank, reduce=tp.reduce)
        self.qk_norm = arch.qk_norm
        if arch.qk_norm:
            self.q_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps, dtype)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn: AttentionBatch, kv_cache: KVCache) -> torch.Tensor:
        num_tokens, heads, dim = x.shape[0], self.num_heads, self.head_dim
        qkv = self.qkv_proj(x)  # [T, (Hq + 2 Hkv) * D], local heads
        qk = qkv[:, :self.qk_size].view(num_tokens, -1, dim)  # [T, Hq + Hkv, D] (view)
        v = qkv[:, self.qk_size:].view(num_tokens, -1, dim)  # [T, Hkv, D] (view)
        if self.qk_norm:
            qk = torch.cat([self.q_norm(qk[:, :heads]), self.k_norm(qk[:, heads:])], dim=1)
        qk = apply_rotary(qk, cos, sin)  # q and k heads rotated in one go
        q, k = qk[:, :heads], qk[:, heads:]  # [T, Hq, D], [T, Hkv, D]
        out = paged_attention(q, k, v, kv_cache[0], kv_cache[1], attn, self.scale)  # [T, Hq, D]
        return self.o_proj(out.reshape(num_tokens, heads * dim))  # [T, H] (all-reduced)


class LlamaMLP(nn.Module):
    """Gated MLP; on tp > 1 each rank holds I/tp of the intermediate width."""

    def __init__(self, arch: LlamaArch, dtype: torch.dtype,
                 parallel: Optional[ParallelState] = None):
        super().__init__()
        tp = parallel or ParallelState()
        inter = arch.intermediate_size
        self.gate_up_proj = MergedColumnLinear(arch.hidden_size, [inter, inter],
                                               bias=arch.mlp_bias, dtype=dtype,
                                               tp_size=tp.tp_size, tp_rank=tp.tp_rank)
        self.act = SiluAndMul()
        self.down_proj = RowLinear(inter, arch.hidden_size, bias=arch.mlp_bias, dtype=dtype,
                                   tp_size=tp.tp_size, tp_rank=tp.tp_rank, reduce=tp.reduce)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, H]
        return self.down_proj(self.act(self.gate_up_proj(x)))  # via [T, 2I/tp] -> [T, I/tp]


class LlamaDecoderLayer(nn.Module):
    def __init__(self, arch: LlamaArch, dtype: torch.dtype, parallel: ParallelState):
        super().__init__()
        self.self_attn = LlamaAttention(arch, dtype, parallel)
        self.mlp = LlamaMLP(arch, dtype, parallel)
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn: AttentionBatch, kv_cache: KVCache) -> torch.Tensor:  # [T, H] -> [T, H]
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, attn, kv_cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, arch: LlamaArch, dtype: torch.dtype, parallel: ParallelState):
        super().__init__()
        self.embed_tokens = VocabEmbedding(arch.vocab_size, arch.hidden_size, dtype,
                                           parallel.tp_size, parallel.tp_rank, parallel.reduce)
        self.layers = nn.ModuleList(LlamaDecoderLayer(arch, dtype, parallel)
                                    for _ in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype)


class LlamaForCausalLM(DecoderForCausalLM):
    """Embedding, layer loop with aux capture, and checkpoint loading come from
    DecoderForCausalLM; this class builds the (tensor-parallel) Llama layers."""

    expert_names = None  # dense: no expert checkpoint names
    supports_tensor_parallel = True  # takes `parallel` (see eyas.models.loader.load_model)

    def __init__(self, config: Any, dtype: torch.dtype = torch.float32,
                 parallel: Optional[ParallelState] = None):
        super().__init__()
        arch = LlamaArch.from_hf_config(config)
        parallel = parallel or ParallelState()
        arch.check_tensor_parallel(parallel.tp_size)
        self.arch, self.dtype, self.parallel = arch, dtype, parallel
        # KV layout of THIS rank's cache: local kv heads (same num_blocks / block_size everywhere)
        self.num_layers = arch.num_layers
        self.num_kv_heads = kv_heads_per_rank(arch.num_kv_heads, parallel.tp_size)
        self.head_dim, self.hidden_size = arch.head_dim, arch.hidden_size
        self.vocab_size = arch.vocab_size
        self.sliding_window = arch.sliding_window
        self.tie_word_embeddings = arch.tie_word_embeddings
        self.model = LlamaModel(arch, dtype, parallel)
        self.rotary_emb = RotaryEmbedding(arch.head_dim, arch.max_position, arch.rope_theta,
                                          arch.rope_scaling, dtype)
        self.lm_head = LMHead(arch.vocab_size, arch.hidden_size, dtype,
                              parallel.tp_size, parallel.tp_rank)
        if arch.tie_word_embeddings:
            self.lm_head.tie_to(self.model.embed_tokens)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [S, H] -> [S, V] fp32
        logits = self.lm_head(hidden)  # [S, V_local]: this rank's vocab rows
        return self.parallel.gather_vocab(logits, self.vocab_size).float()  # identity on tp=1
