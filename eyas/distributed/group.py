"""Joining (and leaving) the tensor-parallel process group.

One call per process: `init_parallel(tp_size, tp_rank, master_port=...)`, or with no sizes to
read torchrun-style env vars (WORLD_SIZE, RANK, MASTER_ADDR, MASTER_PORT). tp_size=1 creates
no group at all. The backend follows the device: gloo on CPU, NCCL (RCCL on ROCm) on GPU.
Rendezvous is TCP on master_addr:master_port (rank 0 listens); every wait is bounded by
timeout_s, so a missing peer ends in a ConfigError, never a hang.
"""
from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Optional, Union

import torch
import torch.distributed as dist

from eyas.distributed.state import ParallelState
from eyas.errors import ConfigError

DEFAULT_ADDR = "127.0.0.1"


def default_backend(device: Union[str, torch.device]) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def free_port(host: str = DEFAULT_ADDR) -> int:
    """A TCP port that was free a moment ago (another process may still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _env_int(name: str, default: Optional[int]) -> Optional[int]:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def init_parallel(tp_size: Optional[int] = None, tp_rank: Optional[int] = None, *,
                  master_addr: Optional[str] = None, master_port: Optional[int] = None,
                  device: Union[str, torch.device] = "cpu", backend: Optional[str] = None,
                  timeout_s: float = 120.0) -> ParallelState:
    """Join a tp_size-rank group as tp_rank and return its ParallelState.

    Missing arguments come from WORLD_SIZE / RANK / MASTER_ADDR / MASTER_PORT (defaults: 1, 0,
    127.0.0.1, none). On GPU, pass this rank's device (e.g. "cuda:1"); it becomes current.
    """
    tp_size = tp_size if tp_size is not None else _env_int("WORLD_SIZE", 1)
    tp_rank = tp_rank if tp_rank is not None else _env_int("RANK", 0)
    state = ParallelState(tp_size, tp_rank)  # validates the rank
    if tp_size == 1:
        return state
    if dist.is_initialized():
        if (dist.get_world_size(), dist.get_rank()) != (tp_size, tp_rank):
            raise ConfigError(f"this process already belongs to a process group as rank "
                              f"{dist.get_rank()} of {dist.get_world_size()}, not "
                              f"{tp_rank} of {tp_size}")
        return state
    addr = master_addr or os.environ.get("MASTER_ADDR") or DEFAULT_ADDR
    port = master_port if master_port is not None else _env_int("MASTER_PORT", None)
    if port is None:
        raise ConfigError(f"tensor parallelism over {tp_size} ranks needs a rendezvous port: "
                          f"pass master_port or set MASTER_PORT")
    device = torch.device(device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    backend = backend or default_backend(device)
    try:
        dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", world_size=tp_size,
                                rank=tp_rank, timeout=timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError, OSError) as e:  # port in use, peer missing, bad backend
        raise ConfigError(f"rank {tp_rank} of {tp_size} could not join the tensor-parallel "
                          f"group at {addr}:{port} ({backend}, timeout {timeout_s:g}s): {e}") from e
    return state


def destroy_parallel() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()
