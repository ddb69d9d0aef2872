"""Turn a model's linear layers into FP8 ones before loading an FP8 checkpoint into it."""
from __future__ import annotations

from typing import Optional

from torch import nn

from eyas.errors import ConfigError
from eyas.layers.fp8 import Fp8Linear, fp8_dtype
from eyas.layers.linear import LinearBase, LMHead
from eyas.quant.config import Fp8QuantConfig


def checkpoint_leaves(module_leaf: str, packed: dict[str, tuple[str, object]]) -> list[str]:
    """Checkpoint layer names fused into a module: 'qkv_proj' -> [q_proj, k_proj, v_proj]."""
    fused = [ckpt for ckpt, (name, _) in packed.items() if name == module_leaf]
    return fused or [module_leaf]


def use_fp8_linears(model: nn.Module, qconfig: Fp8QuantConfig) -> list[str]:
    """Replace every linear layer (and LM head) the config quantizes by an Fp8Linear, in place;
    returns the replaced module names. Call before load_weights."""
    packed = getattr(model, "packed_modules_mapping", {})
    dtype = fp8_dtype(qconfig.fp8_dtype)
    replaced = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, (LinearBase, LMHead)):
            continue
        parent, _, attr = name.rpartition(".")
        leaves = checkpoint_leaves(attr, packed)
        quantized = [qconfig.quantizes(n) for n in leaves]
        if not any(quantized):
            continue
        if not all(quantized):
            raise ConfigError(f"quantization_config ignores only some of {', '.join(leaves)}, "
                              f"which are fused into one layer: ignore all of them or none")
        setattr(model.get_submodule(parent) if parent else model, attr, Fp8Linear(module, dtype))
        replaced.append(name)
    return replaced


def prepare_fp8_linears(model: nn.Module, path: Optional[str] = None) -> dict[str, str]:
    """After loading: pick each FP8 layer's matmul for its device; returns name -> path."""
    return {name: m.prepare(path) for name, m in model.named_modules() if isinstance(m, Fp8Linear)}
