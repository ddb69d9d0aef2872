"""Loading checkpoint tensors into models with fused (packed) parameters, shared by all models."""
from __future__ import annotations

import re
from typing import Callable, Iterable, Optional

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
# MLA models (DeepSeek-V3): q_proj stays a plain projection, only gate/up are fused
GATE_UP_PACKED_MODULES: PackedMapping = {
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


# ---- mixture-of-experts checkpoints ----------------------------------------------------------
# Checkpoints store one tensor per expert (`...experts.{e}.{proj}.weight`); our experts are
# stacked: gate_up_proj [E, 2I, H] and down_proj [E, H, I]. A name maps to (stacked parameter,
# shard id (expert, part)); part 0/1 = gate/up rows of gate_up_proj, 0 for down_proj.
ExpertNames = dict[str, tuple[str, int]]  # checkpoint projection -> (stacked parameter, part)

HF_EXPERT_NAMES: ExpertNames = {  # Qwen2/3-MoE, DeepSeek-V2/V3, Kimi-K2
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1), "down_proj": ("down_proj", 0),
}
MIXTRAL_EXPERT_NAMES: ExpertNames = {  # Mixtral: w1 = gate, w3 = up, w2 = down
    "w1": ("gate_up_proj", 0), "w3": ("gate_up_proj", 1), "w2": ("down_proj", 0),
}
_EXPERT_NAME = re.compile(r"\.experts\.(\d+)\.([A-Za-z0-9_]+)\.weight$")


def expert_target(name: str, names: ExpertNames) -> Optional[tuple[str, tuple[int, int]]]:
    """'model.layers.3.mlp.experts.7.up_proj.weight' -> ('model.layers.3.mlp.experts.gate_up_proj',
    (7, 1)); None for names that are not per-expert weights."""
    m = _EXPERT_NAME.search(name)
    if m is None or m.group(2) not in names:
        return None
    stacked, part = names[m.group(2)]
    return f"{name[:m.start()]}.experts.{stacked}", (int(m.group(1)), part)


def load_checkpoint(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                    packed: PackedMapping, experts: Optional[ExpertNames] = None,
                    skip: Callable[[str], bool] = lambda name: False) -> None:
    """Copy HF-named tensors into a model with fused and stacked-expert parameters; raise
    ConfigError naming unexpected checkpoint tensors or parameters the checkpoint left empty.

    Stacked expert parameters carry `expert_shards`: every (expert, part) they need loaded
    (only this rank's experts under expert parallelism; others are skipped by their loader).
    """
    params = dict(model.named_parameters())  # tied weights show up once
    loaded: set[tuple[str, object]] = set()
    unexpected: list[str] = []
    for name, tensor in weights:
        if skip(name):
            continue
        hit = expert_target(name, experts) if experts else None
        if hit is not None and hit[0] in params:
            param = params[hit[0]]
            try:
                param.weight_loader(param, tensor, hit[1])
            except ConfigError as e:
                raise ConfigError(f"{name}: {e}") from e
            loaded.add(hit)
            continue
        key = load_one(params, name, tensor, packed, name)
        if key is None:
            unexpected.append(name)
        else:
            loaded.add(key)
    if unexpected:
        raise ConfigError(f"checkpoint has weights this model does not know: "
                          f"{', '.join(unexpected[:20])}")
    plain = {n: p for n, p in params.items() if not hasattr(p, "expert_shards")}
    missing = missing_shards(plain, packed, loaded)
    for n, p in params.items():
        missing += [f"{n}[expert {e}, part {part}]" for e, part in getattr(p, "expert_shards", ())
                    if (n, (e, part)) not in loaded]
    if missing:
        raise ConfigError(f"checkpoint is missing {len(missing)} parameter(s): "
                          f"{', '.join(missing[:20])}")
