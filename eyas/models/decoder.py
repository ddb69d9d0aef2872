"""A pre-norm decoder whose layers plug in their own attention and MLP (dense or MoE).

Shared by the Llama family and the MoE / MLA families (Mixtral, Qwen3-MoE, DeepSeek-V3):
embedding, layer loop with EAGLE-3 aux hidden-state capture, final norm, LM head, checkpoint
loading. Parameter names
follow HF: model.embed_tokens, model.layers.N.{input_layernorm, self_attn, <mlp name>,
post_attention_layernorm}, model.norm, lm_head.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from eyas.errors import ConfigError
from eyas.kv.cache import KVLayout
from eyas.layers.attention import AttentionBatch
from eyas.layers.linear import LMHead, VocabEmbedding
from eyas.layers.norm import RMSNorm
from eyas.layers.rotary import RotaryEmbedding
from eyas.models.weights import (LLAMA_PACKED_MODULES, ExpertNames, HF_EXPERT_NAMES,
                                 load_checkpoint)

KVCache = tuple[torch.Tensor, torch.Tensor]


def reject_quantized(config: Any) -> None:
    """Quantized checkpoints (e.g. DeepSeek/Kimi FP8 with weight_scale_inv) are not loadable."""
    quant = getattr(config, "quantization_config", None)
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else type(quant).__name__
        raise ConfigError(f"quantized checkpoints are not supported (quantization_config "
                          f"quant_method={method!r}); use a bf16/fp32 checkpoint")


def check_silu(config: Any) -> None:
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"hidden_act {act!r} is not supported (only 'silu')")


class DecoderLayer(nn.Module):
    """h + attn(norm(h)); h + mlp(norm(h)). `mlp_name` is the checkpoint's module name."""

    def __init__(self, attn: nn.Module, mlp: nn.Module, hidden_size: int, eps: float,
                 dtype: torch.dtype, mlp_name: str = "mlp"):
        super().__init__()
        self.self_attn = attn
        self.mlp_name = mlp_name
        setattr(self, mlp_name, mlp)
        self.input_layernorm = RMSNorm(hidden_size, eps, dtype)
        self.post_attention_layernorm = RMSNorm(hidden_size, eps, dtype)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn: AttentionBatch, kv_cache: KVCache) -> torch.Tensor:  # [T, H] -> [T, H]
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, attn, kv_cache)
        return h + getattr(self, self.mlp_name)(self.post_attention_layernorm(h))


class DecoderBody(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, layers: list[nn.Module], eps: float,
                 dtype: torch.dtype):
        super().__init__()
        self.embed_tokens = VocabEmbedding(vocab_size, hidden_size, dtype)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(hidden_size, eps, dtype)


class DecoderForCausalLM(nn.Module):
    """Subclasses build `self.model` (DecoderBody), `self.rotary_emb`, then call _finish().

    Attributes the engine and the EAGLE-3 drafter read: arch.max_position, num_layers,
    hidden_size, vocab_size, num_kv_heads, head_dim, sliding_window, kv_layout().
    """

    packed_modules_mapping = LLAMA_PACKED_MODULES
    expert_names: ExpertNames = HF_EXPERT_NAMES
    model: DecoderBody
    rotary_emb: RotaryEmbedding

    def _finish(self, vocab_size: int, hidden_size: int, num_layers: int, tie: bool,
                dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.vocab_size, self.hidden_size, self.num_layers = vocab_size, hidden_size, num_layers
        self.tie_word_embeddings = tie
        self.lm_head = LMHead(vocab_size, hidden_size, dtype)
        if tie:
            self.lm_head.tie_to(self.model.embed_tokens)

    def kv_layout(self) -> KVLayout:
        return KVLayout(self.num_kv_heads, self.head_dim, self.num_layers)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, H]
        return self.model.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionBatch,
                kv_caches: list[KVCache], aux_layer_ids: tuple[int, ...] = (),
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """ids/positions [T] -> (final-normed hidden [T, H], aux hidden states).

        Aux layer id i is the residual stream entering layer i (HF hidden_states[i]), in the
        order of aux_layer_ids (the EAGLE-3 drafter's features).
        """
        for i in aux_layer_ids:
            if not 0 <= i < self.num_layers:
                raise ConfigError(f"aux layer id {i} out of range [0, {self.num_layers})")
        cos, sin = self.rotary_emb(positions)  # [T, 1, D_rope] each, shared by all layers
        h = self.embed(input_ids)  # [T, H]
        captured: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(self.model.layers):
            if i in aux_layer_ids:
                captured[i] = h  # layers never write h in place
            h = layer(h, cos, sin, attn, kv_caches[i])
        return self.model.norm(h), [captured[i] for i in aux_layer_ids]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [S, H] -> [S, V] fp32
        return self.lm_head(hidden).float()

    def skip_weight(self, name: str) -> bool:
        """Checkpoint tensors to ignore (subclasses add e.g. DeepSeek's MTP layers)."""
        if "rotary_emb.inv_freq" in name:
            return True
        return name == "lm_head.weight" and self.tie_word_embeddings

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named checkpoint tensors into our fused / stacked-expert parameters."""
        load_checkpoint(self, weights, self.packed_modules_mapping, self.expert_names,
                        skip=self.skip_weight)

