"""Tensor parallelism over torch.distributed: the group a process joins, and its collectives."""
from eyas.distributed.group import default_backend, destroy_parallel, free_port, init_parallel
from eyas.distributed.state import ParallelState

__all__ = ["ParallelState", "default_backend", "destroy_parallel", "free_port", "init_parallel"]
