"""Qwen3-MoE: Qwen3 attention (per-head q/k RMSNorm before rope) with sparse MoE layers.

Layer i is sparse when i is not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0 (and
num_experts > 0), exactly HF's rule; other layers are dense with intermediate_size. Experts
have moe_intermediate_size. Routing: softmax over E, top-k, renormalized only when
norm_topk_prob. Checkpoint names: mlp.gate.weight, mlp.experts.{e}.{gate,up,down}_proj.weight.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from eyas.layers.moe import RoutingConfig
from eyas.models.decoder import check_silu, reject_quantized
from eyas.models.llama import LlamaArch
from eyas.models.mixtral import LlamaMoEForCausalLM, MoEArch


def qwen3_moe_sparse_layers(config: Any) -> tuple[int, ...]:
    num_experts = getattr(config, "num_experts", 0) or 0
    step = getattr(config, "decoder_sparse_step", 1) or 1
    dense = set(getattr(config, "mlp_only_layers", None) or [])
    return tuple(i for i in range(config.num_hidden_layers)
                 if i not in dense and num_experts > 0 and (i + 1) % step == 0)


class Qwen3MoeForCausalLM(LlamaMoEForCausalLM):
    def __init__(self, config: Any, dtype: torch.dtype = torch.float32):
        super().__init__()
        reject_quantized(config)
        check_silu(config)
        arch = LlamaArch.from_hf_config(config)
        window = arch.sliding_window if getattr(config, "use_sliding_window", False) else None
        arch = dataclasses.replace(arch, qk_norm=True, sliding_window=window)
        sparse = qwen3_moe_sparse_layers(config)
        routing = None
        if sparse:
            routing = RoutingConfig(num_experts=config.num_experts,
                                    top_k=config.num_experts_per_tok, scoring="softmax",
                                    renormalize=bool(getattr(config, "norm_topk_prob", False)))
        moe = MoEArch(routing, config.moe_intermediate_size, sparse)
        self._build(arch, moe, dtype)
