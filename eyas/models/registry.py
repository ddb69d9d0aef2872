"""HF `architectures` name -> our model class."""
from __future__ import annotations

from typing import Any

from torch import nn

from eyas.errors import ConfigError
from eyas.models.llama import LlamaForCausalLM

ARCHITECTURES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
}


def get_model_class(hf_config: Any) -> type[nn.Module]:
    """The class for the first supported name in hf_config.architectures."""
    names = list(getattr(hf_config, "architectures", None) or [])
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    raise ConfigError(f"unsupported model architecture {names or '(none given)'}; "
                      f"supported: {', '.join(sorted(ARCHITECTURES))}")
