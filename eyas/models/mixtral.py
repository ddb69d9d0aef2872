"""Mixtral: Llama attention (GQA, rope) with a sparse MoE block in every layer.

Checkpoint names: model.layers.N.block_sparse_moe.gate.weight [E, H] and
block_sparse_moe.experts.{e}.w1 / w3 / w2 (gate / up / down), stacked here into
block_sparse_moe.experts.gate_up_proj [E, 2I, H] and .down_proj [E, H, I].
Routing: softmax over the E experts, top-k, the k weights renormalized to sum 1.

`LlamaMoEForCausalLM` is the shared base of the families with Llama-style attention and
(some) sparse MLP layers; Qwen3-MoE derives from it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from eyas.layers.moe import RoutingConfig, SparseMoE
from eyas.layers.rotary import RotaryEmbedding
from eyas.models.decoder import (DecoderBody, DecoderForCausalLM, DecoderLayer, check_silu,
                                 reject_quantized)
from eyas.models.llama import LlamaArch, LlamaAttention, LlamaMLP
from eyas.models.weights import MIXTRAL_EXPERT_NAMES


@dataclass(frozen=True)
class MoEArch:
    """The sparse part of a Llama-attention MoE model."""

    routing: Optional[RoutingConfig]  # None when no layer is sparse
    expert_intermediate_size: int
    sparse_layers: tuple[int, ...]  # layers whose MLP is the MoE block (others: dense LlamaMLP)


class LlamaMoEForCausalLM(DecoderForCausalLM):
    """Llama attention (optionally q/k-normed) + dense or sparse MLP per layer."""

    mlp_name = "mlp"

    def _build(self, arch: LlamaArch, moe: MoEArch, dtype: torch.dtype) -> None:
        self.arch, self.moe = arch, moe
        self.num_kv_heads, self.head_dim = arch.num_kv_heads, arch.head_dim
        self.sliding_window = arch.sliding_window
        layers = []
        for i in range(arch.num_layers):
            if i in moe.sparse_layers:
                mlp = SparseMoE(arch.hidden_size, moe.expert_intermediate_size, moe.routing, dtype)
            else:
                mlp = LlamaMLP(arch, dtype)  # arch.intermediate_size: the dense MLP width
            layers.append(DecoderLayer(LlamaAttention(arch, dtype), mlp, arch.hidden_size,
                                       arch.rms_norm_eps, dtype, mlp_name=self.mlp_name))
        self.model = DecoderBody(arch.vocab_size, arch.hidden_size, layers, arch.rms_norm_eps, dtype)
        self.rotary_emb = RotaryEmbedding(arch.head_dim, arch.max_position, arch.rope_theta,
                                          arch.rope_scaling, dtype)
        self._finish(arch.vocab_size, arch.hidden_size, arch.num_layers,
                     arch.tie_word_embeddings, dtype)


class MixtralForCausalLM(LlamaMoEForCausalLM):
    expert_names = MIXTRAL_EXPERT_NAMES
    mlp_name = "block_sparse_moe"

    def __init__(self, config: Any, dtype: torch.dtype = torch.float32):
        super().__init__()
        reject_quantized(config)
        check_silu(config)
        arch = LlamaArch.from_hf_config(config)  # intermediate_size is each expert's width
        routing = RoutingConfig(num_experts=config.num_local_experts,
                                top_k=config.num_experts_per_tok, scoring="softmax",
                                renormalize=True)
        moe = MoEArch(routing, arch.intermediate_size, tuple(range(arch.num_layers)))
        self._build(arch, moe, dtype)
