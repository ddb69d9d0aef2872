"""DeepSeek-V3 (and Kimi-K2, same architecture): MLA attention + DeepSeek MoE.

Layers [0, first_k_dense_replace) have a dense MLP (intermediate_size); later layers a MoE
block: n_routed_experts experts of moe_intermediate_size with sigmoid, group-limited routing
(e_score_correction_bias, n_group, topk_group, norm_topk_prob, routed_scaling_factor) plus
n_shared_experts folded into one always-on MLP (`shared_experts`). Attention is MLA
(eyas/layers/mla.py) over a latent KV cache, `kv_layout()` = KVLayout.mla(R, P, layers).

Matches HF transformers' DeepseekV3ForCausalLM, including its quirks:
  - q_a_layernorm / kv_a_layernorm use eps 1e-6 (HF builds them without rms_norm_eps)
  - rope_interleave=True (the default): rope dims are interleaved pairs in the checkpoint
  - YaRN: cos/sin scaled by mscale(factor, mscale) / mscale(factor, mscale_all_dim) and the
    softmax scale by mscale(factor, mscale_all_dim)^2
  - the router runs in fp32 (weight and correction bias kept fp32 in any model dtype)
  - checkpoint layers past num_hidden_layers (the MTP module, `model.layers.61` in V3) are ignored
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

import torch

from eyas.errors import ConfigError
from eyas.kv.cache import KVLayout
from eyas.layers.mla import MLAShape, MLAttention, mla_softmax_scale
from eyas.layers.moe import RoutingConfig, SparseMoE
from eyas.layers.rotary import RopeScaling, RotaryEmbedding, rope_from_hf_config
from eyas.models.decoder import (DecoderBody, DecoderForCausalLM, DecoderLayer, check_silu,
                                 reject_quantized)
from eyas.models.llama import LlamaMLP
from eyas.models.weights import GATE_UP_PACKED_MODULES

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class MLPShape:
    """What LlamaMLP reads: a dense gated MLP (DeepSeek dense layers and shared experts)."""

    hidden_size: int
    intermediate_size: int
    mlp_bias: bool = False


@dataclass(frozen=True)
class DeepseekV3Arch:
    hidden_size: int
    intermediate_size: int  # dense layers
    moe_intermediate_size: int  # each routed expert; shared experts: times n_shared_experts
    num_layers: int
    vocab_size: int
    rms_norm_eps: float
    max_position: int
    rope_theta: float
    rope_scaling: RopeScaling
    mla: MLAShape
    routing: Optional[RoutingConfig]  # None: every layer dense
    n_shared_experts: int
    first_k_dense_replace: int
    tie_word_embeddings: bool

    @classmethod
    def from_hf_config(cls, config: Any) -> "DeepseekV3Arch":
        reject_quantized(config)
        check_silu(config)
        scoring = getattr(config, "scoring_func", "sigmoid")
        method = getattr(config, "topk_method", "noaux_tc")
        if scoring != "sigmoid" or method != "noaux_tc":
            raise ConfigError(f"DeepSeek-V3 routing needs scoring_func 'sigmoid' and topk_method "
                              f"'noaux_tc', got {scoring!r} / {method!r}")
        freq = getattr(config, "moe_layer_freq", 1)
        if freq not in (None, 1):
            raise ConfigError(f"moe_layer_freq={freq} is not supported (only 1, as DeepSeek-V3)")
        theta, scaling = rope_from_hf_config(config)
        heads = config.num_attention_heads
        nope, rope = config.qk_nope_head_dim, config.qk_rope_head_dim
        mla = MLAShape(hidden_size=config.hidden_size, num_heads=heads,
                       q_lora_rank=getattr(config, "q_lora_rank", None),
                       kv_lora_rank=config.kv_lora_rank, qk_nope_head_dim=nope,
                       qk_rope_head_dim=rope, v_head_dim=config.v_head_dim,
                       scale=mla_softmax_scale(nope + rope, scaling),
                       rope_interleave=bool(getattr(config, "rope_interleave", True)),
                       bias=bool(getattr(config, "attention_bias", False)))
        experts = getattr(config, "n_routed_experts", None) or 0
        routing = None
        if experts:
            routing = RoutingConfig(
                num_experts=experts, top_k=config.num_experts_per_tok, scoring="sigmoid",
                renormalize=bool(getattr(config, "norm_topk_prob", True)),
                num_groups=getattr(config, "n_group", None) or 1,
                topk_groups=getattr(config, "topk_group", None) or 1,
                scaling_factor=float(getattr(config, "routed_scaling_factor", 1.0) or 1.0),
                correction_bias=True)
        return cls(hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                   moe_intermediate_size=config.moe_intermediate_size,
                   num_layers=config.num_hidden_layers, vocab_size=config.vocab_size,
                   rms_norm_eps=config.rms_norm_eps, max_position=config.max_position_embeddings,
                   rope_theta=theta, rope_scaling=scaling, mla=mla, routing=routing,
                   n_shared_experts=getattr(config, "n_shared_experts", None) or 0,
                   first_k_dense_replace=getattr(config, "first_k_dense_replace", None) or 0,
                   tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)))

    def is_sparse(self, layer: int) -> bool:
        return self.routing is not None and layer >= self.first_k_dense_replace


class DeepseekV3ForCausalLM(DecoderForCausalLM):
    packed_modules_mapping = GATE_UP_PACKED_MODULES

    def __init__(self, config: Any, dtype: torch.dtype = torch.float32):
        super().__init__()
        arch = DeepseekV3Arch.from_hf_config(config)
        self.arch = arch
        self.num_kv_heads, self.head_dim = 1, arch.mla.cache_dim  # one latent "head" per token
        self.sliding_window = None
        layers = []
        for i in range(arch.num_layers):
            layers.append(DecoderLayer(MLAttention(arch.mla, dtype), self._mlp(arch, i, dtype),
                                       arch.hidden_size, arch.rms_norm_eps, dtype))
        self.model = DecoderBody(arch.vocab_size, arch.hidden_size, layers, arch.rms_norm_eps, dtype)
        self.rotary_emb = RotaryEmbedding(arch.mla.qk_rope_head_dim, arch.max_position,
                                          arch.rope_theta, arch.rope_scaling, dtype)
        self._finish(arch.vocab_size, arch.hidden_size, arch.num_layers,
                     arch.tie_word_embeddings, dtype)

    @staticmethod
    def _mlp(arch: DeepseekV3Arch, layer: int, dtype: torch.dtype) -> torch.nn.Module:
        if not arch.is_sparse(layer):
            return LlamaMLP(MLPShape(arch.hidden_size, arch.intermediate_size), dtype)
        shared = None
        if arch.n_shared_experts:
            width = arch.moe_intermediate_size * arch.n_shared_experts
            shared = LlamaMLP(MLPShape(arch.hidden_size, width), dtype)
        return SparseMoE(arch.hidden_size, arch.moe_intermediate_size, arch.routing, dtype,
                         shared_experts=shared, router_dtype=torch.float32)

    def kv_layout(self) -> KVLayout:
        return KVLayout.mla(self.arch.mla.kv_lora_rank, self.arch.mla.qk_rope_head_dim,
                            self.num_layers)

    def set_mla_mode(self, mode: str = "auto", kv_view: str = "flat") -> None:
        """Force every MLA layer's path ("auto" | "plain" | "absorbed") and cache view
        ("flat": block-size-1 view | "blocked"); for tests and benchmarks."""
        for layer in self.model.layers:
            layer.self_attn.mode, layer.self_attn.kv_view = mode, kv_view

    def skip_weight(self, name: str) -> bool:
        m = _LAYER.match(name)
        if m is not None and int(m.group(1)) >= self.num_layers:
            return True  # multi-token-prediction layers (HF ignores them too)
        return super().skip_weight(name)
