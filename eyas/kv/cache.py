"""KV cache tensors and their sizing. Storage is [num_blocks, block_size, kv_heads, head_dim]
per layer for K and for V; kernels view it as [num_blocks * block_size, kv_heads, head_dim]."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

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
    """Shape of one attention layer's cache, per block."""

    num_kv_heads: int
    head_dim: int
    num_layers: int

    def bytes_per_block(self, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * self.num_layers * block_size * self.num_kv_heads * self.head_dim * elem


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
    """One (K, V) pair of [num_blocks, block_size, kv_heads, head_dim] tensors per layer."""
    shape = (num_blocks, block_size, layout.num_kv_heads, layout.head_dim)
    return [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(layout.num_layers)]
