"""KV cache tensors and their sizing. Storage is [num_blocks, block_size, kv_heads, head_dim]
per layer for K and for V; kernels view it as [num_blocks * block_size, kv_heads, head_dim].

A latent layout (MLA, DeepSeek-V3) stores K only: one "head" per token holding
[kv_lora_rank latent | rope dims]; the layer's V is a view of the latent part of the same storage.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import torch

from eyas.errors import ConfigError

_UNITS = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "T": 1e12, "TB": 1e12}


def parse_memory(value: str | float | int) -> tuple[str, float]:
    """'2GiB' -> ('bytes', 2147483648); '0.3' or 0.3 -> ('fraction', 0.3)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if 0 < value <= 1:
            return "fraction", float(value)
        if value > 1:
            return "bytes", float(value)
    text = str(value).strip()
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([A-Za-z]*)", text)
    if not m or (m.group(2).upper() not in _UNITS):
        raise ConfigError(f"kv_cache_memory: expected bytes like '2GiB' or a fraction like 0.5, got {value!r}")
    number, unit = float(m.group(1)), m.group(2).upper()
    if unit == "" and 0 < number <= 1:
        return "fraction", number
    if number <= 0:
        raise ConfigError(f"kv_cache_memory: must be positive, got {value!r}")
    return "bytes", number * _UNITS[unit]


def free_memory() -> None:
    """Collect engines dropped just now (engines hold reference cycles, so only the collector
    frees their caches) and hand cached GPU memory back: the next engine sizes its KV cache
    from what is free."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def available_memory(device: torch.device) -> int:
    """Free bytes on the device (available RAM on CPU)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


@dataclass(frozen=True)
class KVLayout:
    """Shape of one attention layer's cache, per block.

    latent_dim > 0 marks a latent (MLA) cache: K only, per slot [num_kv_heads=1, head_dim] with
    head_dim = latent_dim + rope dims; V is the view K[..., :latent_dim] (no storage of its own).
    """

    num_kv_heads: int
    head_dim: int
    num_layers: int
    latent_dim: int = 0

    def __post_init__(self):
        if min(self.num_kv_heads, self.head_dim, self.num_layers) < 1:
            raise ConfigError(f"KV layout needs positive sizes, got {self}")
        if self.latent_dim and not (self.num_kv_heads == 1 and 0 < self.latent_dim <= self.head_dim):
            raise ConfigError(f"a latent KV layout has one head and latent_dim <= head_dim, got {self}")

    @classmethod
    def mla(cls, kv_lora_rank: int, rope_dim: int, num_layers: int) -> "KVLayout":
        """Latent cache of multi-head latent attention: [latent | k_rope] per token."""
        return cls(1, kv_lora_rank + rope_dim, num_layers, latent_dim=kv_lora_rank)

    @property
    def latent(self) -> bool:
        return self.latent_dim > 0

    def bytes_per_block(self, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        tensors = 1 if self.latent else 2  # a latent cache stores no V
        return tensors * self.num_layers * block_size * self.num_kv_heads * self.head_dim * elem


def kv_layout_for(model: Any) -> KVLayout:
    """The target's cache layout: `model.kv_layout()` when the model defines it (MLA), else the
    standard one from num_kv_heads / head_dim / num_layers (Llama family)."""
    layout = getattr(model, "kv_layout", None)
    if callable(layout):
        return layout()
    return KVLayout(model.num_kv_heads, model.head_dim, model.num_layers)


def num_blocks_for(memory: str | float | int, layouts: list[KVLayout], block_size: int,
                   dtype: torch.dtype, device: torch.device, max_model_len: int,
                   lookahead: int = 0) -> int:
    """How many blocks fit the budget; raise if not even one max-length request fits."""
    kind, amount = parse_memory(memory)
    budget = amount * available_memory(device) if kind == "fraction" else amount
    per_block = sum(l.bytes_per_block(block_size, dtype) for l in layouts)
    num_blocks = int(budget // per_block)
    need = -(-(max_model_len + lookahead) // block_size)
    if num_blocks < need:
        raise ConfigError(
            f"kv_cache_memory={memory!r} gives {num_blocks} blocks of {block_size} tokens "
            f"({per_block} bytes each), but one request of max_model_len={max_model_len} "
            f"(+{lookahead} lookahead) needs {need} blocks ({need * per_block / 2**20:.1f} MiB). "
            f"Raise --kv-cache-memory or lower --max-model-len.")
    return num_blocks


def allocate_kv(layout: KVLayout, num_blocks: int, block_size: int, dtype: torch.dtype,
                device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One (K, V) pair of [num_blocks, block_size, kv_heads, head_dim] tensors per layer.

    Latent layouts: K is [num_blocks, block_size, 1, head_dim] and V = K[..., :latent_dim], a view
    of the same storage, so code that moves or copies (K, V) pairs keeps working unchanged.
    """
    shape = (num_blocks, block_size, layout.num_kv_heads, layout.head_dim)
    if layout.latent:
        caches = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layout.num_layers)]
        return [(c, c[..., :layout.latent_dim]) for c in caches]
    return [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(layout.num_layers)]


def block_size_one_view(cache: torch.Tensor) -> torch.Tensor:
    """[num_blocks, B, heads, D] -> [num_blocks * B, 1, heads, D]: the same storage as blocks of
    one token, for kernels that want block size 1. Its block table is the slot list
    (slot s = block * B + offset), so it reads exactly what the blocked view holds."""
    num_blocks, block_size = cache.shape[:2]
    return cache.view(num_blocks * block_size, 1, *cache.shape[2:])
