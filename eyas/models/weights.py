"""Loading checkpoint tensors into models with fused (packed) parameters, shared by all models."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from eyas.errors import ConfigError
from eyas.layers.linear import default_weight_loader

PackedMapping = dict[str, tuple[str, object]]  # checkpoint module name -> (fused name, shard id)

# Llama-style checkpoints (targets and EAGLE-3 drafters): q/k/v -> qkv_proj, gate/up -> gate_up_proj
LLAMA_PACKED_MODULES: PackedMapping = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


def load_one(params: dict[str, nn.Parameter], name: str, tensor: torch.Tensor,
             packed: PackedMapping, what: str) -> Optional[tuple[str, object]]:
    """Copy one checkpoint tensor into its (possibly fused) parameter via its weight_loader.

    `name` is the checkpoint name after any prefix rewriting; returns (parameter, shard) loaded,
    or None when no parameter takes it.
    """
    target, shard = name, None
    for ckpt_name, (fused_name, shard_id) in packed.items():
        if f".{ckpt_name}." in name:
            target, shard = name.replace(f".{ckpt_name}.", f".{fused_name}."), shard_id
            break
    param = params.get(target)
    if param is None:
        return None
    loader = getattr(param, "weight_loader", default_weight_loader)
    try:
        loader(param, tensor, shard)
    except ConfigError as e:
        raise ConfigError(f"{what}: {e}") from e
    return target, shard


def missing_shards(params: dict[str, nn.Parameter], packed: PackedMapping,
                   loaded: set[tuple[str, object]]) -> list[str]:
    """Every (parameter, shard) a full checkpoint must fill, minus those loaded, as names."""
    fused: dict[str, list[object]] = {}
    for fused_name, shard_id in packed.values():
        fused.setdefault(fused_name, []).append(shard_id)
    missing = []
    for name in params:
        module = name.split(".")[-2]
        for s in (fused[module] if module in fused else [None]):
            if (name, s) not in loaded:
                missing.append(f"{name}[{s}]" if s is not None else name)
    return missing
