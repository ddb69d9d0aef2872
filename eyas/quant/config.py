"""`quantization_config` of an FP8 drafter's config.json, close to what vLLM/SGLang read:

    {"quant_method": "fp8", "weight_granularity": "channel", "activation_scheme": "dynamic",
     "fp8_dtype": "e4m3fn", "ignored_layers": ["fc", "lm_head"]}

Layer names are the checkpoint's module names (`midlayer.self_attn.q_proj`, `fc`, `lm_head`);
a layer is matched by its last component, which is unique in a one-layer drafter.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from eyas.errors import ConfigError
from eyas.layers.fp8 import FP8_DTYPES

# The drafter's linear layers, by checkpoint leaf name.
QUANTIZABLE = ("fc", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
               "lm_head")
DEFAULT_SKIP = ("fc", "lm_head")  # kept in original precision, as in AMD's FP8 drafter
# Checkpoint layers fused into one parameter at load time: all quantized or none.
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def leaf(name: str) -> str:
    """'midlayer.self_attn.q_proj' -> 'q_proj'."""
    return name.rsplit(".", 1)[-1]


def check_skip(names: tuple[str, ...]) -> tuple[str, ...]:
    """Validate layer leaf names to keep unquantized; returns them sorted and unique."""
    bad = [n for n in names if n not in QUANTIZABLE]
    if bad:
        raise ConfigError(f"cannot skip {', '.join(bad)}: the drafter's linear layers are "
                          f"{', '.join(QUANTIZABLE)}")
    for group in FUSED_GROUPS:
        some = [n for n in group if n in names]
        if some and len(some) != len(group):
            raise ConfigError(f"{', '.join(group)} are fused into one layer when loading: "
                              f"skip all of them or none (got {', '.join(some)})")
    return tuple(sorted(set(names)))


@dataclass(frozen=True)
class Fp8QuantConfig:
    fp8_dtype: str = "e4m3fn"
    ignored_layers: tuple[str, ...] = DEFAULT_SKIP
    weight_granularity: str = "channel"
    activation_scheme: str = "dynamic"

    def __post_init__(self) -> None:
        if self.fp8_dtype not in FP8_DTYPES:
            raise ConfigError(f"quantization_config fp8_dtype {self.fp8_dtype!r} is not supported; "
                              f"choose one of {', '.join(FP8_DTYPES)}")
        if self.weight_granularity != "channel":
            raise ConfigError(f"quantization_config weight_granularity "
                              f"{self.weight_granularity!r} is not supported (only 'channel')")
        if self.activation_scheme != "dynamic":
            raise ConfigError(f"quantization_config activation_scheme "
                              f"{self.activation_scheme!r} is not supported (only 'dynamic')")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Fp8QuantConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"quantization_config must be an object, got {d!r}")
        method = d.get("quant_method")
        if method != "fp8":
            raise ConfigError(f"quantization_config quant_method {method!r} is not supported "
                              f"(only 'fp8')")
        ignored = d.get("ignored_layers") or []
        if not isinstance(ignored, list) or not all(isinstance(n, str) for n in ignored):
            raise ConfigError(f"quantization_config ignored_layers must be a list of layer "
                              f"names, got {ignored!r}")
        return cls(fp8_dtype=d.get("fp8_dtype", "e4m3fn"), ignored_layers=tuple(ignored),
                   weight_granularity=d.get("weight_granularity", "channel"),
                   activation_scheme=d.get("activation_scheme", "dynamic"))

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": "fp8", "weight_granularity": self.weight_granularity,
                "activation_scheme": self.activation_scheme, "fp8_dtype": self.fp8_dtype,
                "ignored_layers": list(self.ignored_layers)}

    def quantizes(self, checkpoint_leaf: str) -> bool:
        return checkpoint_leaf not in {leaf(n) for n in self.ignored_layers}


def quant_config_of(config: dict) -> Optional[Fp8QuantConfig]:
    """The drafter config.json's FP8 settings; None when it is not quantized."""
    raw = config.get("quantization_config")
    return None if raw is None else Fp8QuantConfig.from_dict(raw)
