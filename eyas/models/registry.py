"""HF `architectures` name (or, when a config names none, its `model_type`) -> our model class."""
from __future__ import annotations

from typing import Any

from torch import nn

from eyas.errors import ConfigError
from eyas.models.deepseek_v3 import DeepseekV3ForCausalLM
from eyas.models.llama import LlamaForCausalLM
from eyas.models.mixtral import MixtralForCausalLM
from eyas.models.qwen3_moe import Qwen3MoeForCausalLM

ARCHITECTURES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "DeepseekV3ForCausalLM": DeepseekV3ForCausalLM,  # also Kimi-K2
}

# Used only when a config lists no architectures.
MODEL_TYPES: dict[str, type[nn.Module]] = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    "qwen3": LlamaForCausalLM,
    "mixtral": MixtralForCausalLM,
    "qwen3_moe": Qwen3MoeForCausalLM,
    "deepseek_v3": DeepseekV3ForCausalLM,
    "kimi_k2": DeepseekV3ForCausalLM,
}


def get_model_class(hf_config: Any) -> type[nn.Module]:
    """The class for the first supported name in hf_config.architectures; a config without
    architectures is looked up by its model_type."""
    names = list(getattr(hf_config, "architectures", None) or [])
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    model_type = getattr(hf_config, "model_type", None)
    if not names and model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type]
    given = names or f"(none given; model_type {model_type!r})"
    raise ConfigError(f"unsupported model architecture {given}; "
                      f"supported: {', '.join(sorted(ARCHITECTURES))}")
