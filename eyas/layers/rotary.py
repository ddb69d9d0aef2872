"""Rotary position embedding (neox style, as HF Llama: rotate the two halves of each head).

A table of cos/sin per position is built once; a step looks rows up by `positions` [T], so
tokens of any sequence, chunk or tree may sit anywhere in the flat batch.

Scaling variants (HF `rope_type`): default, linear, llama3, yarn. "dynamic" NTK is refused:
HF re-derives every position's frequency from the current length, which a KV cache (keys
rotated once, when written) cannot reproduce.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from eyas.errors import ConfigError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class RopeScaling:
    rope_type: str = "default"
    factor: float = 1.0  # linear / llama3 / yarn: context extension factor
    original_max_position: Optional[int] = None  # llama3 / yarn: pre-training context
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn: ramp bounds, in rotations
    beta_slow: float = 1.0  # yarn
    attention_factor: Optional[float] = None  # yarn: cos/sin scale; None derives it from factor
    mscale: Optional[float] = None  # yarn (DeepSeek-style attention_factor)
    mscale_all_dim: Optional[float] = None  # yarn
    truncate: bool = True  # yarn: round the ramp bounds to whole dims


def rope_from_hf_config(config: Any) -> tuple[float, RopeScaling]:
    """(theta, scaling) from an HF config: `rope_parameters` (transformers 5) or
    `rope_theta` + `rope_scaling` (transformers 4)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    legacy = getattr(config, "rope_scaling", None)
    if not params and legacy:
        params = dict(legacy)
    theta = params.get("rope_theta", getattr(config, "rope_theta", None) or 10000.0)
    partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
    if partial not in (None, 1, 1.0):
        raise ConfigError(f"partial_rotary_factor={partial} is not supported (only 1.0)")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"rope_type {rope_type!r} is not supported; supported: "
                          f"{', '.join(SUPPORTED_ROPE_TYPES)}")
    original = params.get("original_max_position_embeddings",
                          getattr(config, "original_max_position_embeddings", None))
    if rope_type in ("llama3", "yarn") and original is None:
        original = config.max_position_embeddings  # HF's default
    factor = params.get("factor")
    if factor is None:
        factor = config.max_position_embeddings / original if rope_type == "yarn" else 1.0
    scaling = RopeScaling(
        rope_type=rope_type, factor=float(factor), original_max_position=original,
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        attention_factor=params.get("attention_factor"),
        mscale=params.get("mscale"), mscale_all_dim=params.get("mscale_all_dim"),
        truncate=bool(params.get("truncate", True)),
    )
    return float(theta), scaling


def _default_inv_freq(dim: int, theta: float) -> torch.Tensor:  # [dim/2]
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _llama3_inv_freq(dim: int, theta: float, s: RopeScaling) -> torch.Tensor:
    """Long wavelengths slowed by `factor`, short ones kept, a smooth blend in between."""
    inv_freq = _default_inv_freq(dim, theta)
    low_wavelen = s.original_max_position / s.low_freq_factor
    high_wavelen = s.original_max_position / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, blended, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(dim: int, theta: float, s: RopeScaling) -> tuple[torch.Tensor, float]:
    """Interpolate low frequencies, extrapolate high ones, linear ramp between (YaRN)."""
    def correction_dim(rotations: float) -> float:
        return dim * math.log(s.original_max_position / (rotations * 2 * math.pi)) / (
            2 * math.log(theta))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolate = 1 - ramp  # weight of the unscaled frequency, [dim/2]
    inv_freq = (1.0 / (s.factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    if s.attention_factor is not None:
        attention_factor = float(s.attention_factor)
    elif s.mscale and s.mscale_all_dim:
        attention_factor = _yarn_mscale(s.factor, s.mscale) / _yarn_mscale(
            s.factor, s.mscale_all_dim)
    else:
        attention_factor = _yarn_mscale(s.factor)
    return inv_freq, attention_factor


def inv_freq_for(dim: int, theta: float, s: RopeScaling) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [dim/2] fp32, cos/sin scale) for a scaling variant."""
    if s.rope_type == "default":
        return _default_inv_freq(dim, theta), 1.0
    if s.rope_type == "linear":
        return _default_inv_freq(dim, theta) / s.factor, 1.0
    if s.rope_type == "llama3":
        return _llama3_inv_freq(dim, theta, s), 1.0
    if s.rope_type == "yarn":
        return _yarn_inv_freq(dim, theta, s)
    raise ConfigError(f"rope_type {s.rope_type!r} is not supported; supported: "
                      f"{', '.join(SUPPORTED_ROPE_TYPES)}")


class RotaryEmbedding(nn.Module):
    """Holds cos_sin [max_position, 2, 1, D]: row p is (cos, signed sin) at position p.

    With cos = [c, c] and signed sin = [-s, s] over the halves, rotating x = [x1, x2] is
    x * cos + [x2, x1] * sin = [x1 c - x2 s, x2 c + x1 s], the same as HF's rotate_half.
    """

    def __init__(self, head_dim: int, max_position: int, theta: float = 10000.0,
                 scaling: RopeScaling = RopeScaling(), dtype: torch.dtype = torch.float32):
        super().__init__()
        if head_dim % 2:
            raise ConfigError(f"rotary head_dim must be even, got {head_dim}")
        self.head_dim, self.max_position = head_dim, max_position
        inv_freq, attention_factor = inv_freq_for(head_dim, theta, scaling)
        freqs = torch.arange(max_position, dtype=torch.float32)[:, None] * inv_freq  # [P, D/2]
        cos = freqs.cos() * attention_factor
        sin = freqs.sin() * attention_factor
        table = torch.stack([torch.cat([cos, cos], -1), torch.cat([-sin, sin], -1)], 1)
        self.register_buffer("cos_sin", table.unsqueeze(2).to(dtype), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> (cos, sin), each [T, 1, D], broadcasting over heads."""
        rows = self.cos_sin[positions]  # [T, 2, 1, D]
        return rows[:, 0], rows[:, 1]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] rotated by cos/sin [T, 1, D] (from RotaryEmbedding) -> new [T, H, D]."""
    swapped = x.roll(x.shape[-1] // 2, dims=-1)  # [T, H, D]: halves swapped, [x2, x1]
    return torch.addcmul(x * cos, swapped, sin)
