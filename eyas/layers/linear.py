"""Linear and embedding layers that know how to load their own (tensor-parallel) shard.

Every parameter carries `weight_loader(param, loaded_weight, shard_id=None)`. A loader takes
the full checkpoint tensor, narrows it to this rank's shard, and copies it in place:

    column-parallel  (ColumnLinear, MergedColumnLinear, QKVLinear): split the output dim 0
    row-parallel     (RowLinear): split the input dim 1 (bias is kept whole, added on rank 0)
    vocab-parallel   (VocabEmbedding, LMHead): split the vocab rows

The layers know no process group. On tp > 1, RowLinear and VocabEmbedding take a `reduce`
callable (the group's all-reduce, see eyas/distributed) that sums the ranks' partial outputs;
LMHead returns this rank's vocab slice and the model gathers the ranks' logits. With
reduce=None (tp=1, or a test that simulates ranks in one process) nothing extra runs.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from eyas.errors import ConfigError

ShardId = Union[int, str, None]
Reduce = Callable[[torch.Tensor], torch.Tensor]  # sums a partial output over the tp ranks


def _divide(total: int, parts: int, what: str) -> int:
    if total % parts:
        raise ConfigError(f"{what}={total} is not divisible by tp_size={parts}")
    return total // parts


def _copy_checked(dst: torch.Tensor, src: torch.Tensor) -> None:
    if dst.shape != src.shape:
        raise ConfigError(f"checkpoint shard {tuple(src.shape)} does not fit parameter "
                          f"{tuple(dst.shape)}")
    dst.copy_(src)


def _check_tp(tp_size: int, tp_rank: int) -> None:
    if tp_size < 1 or not 0 <= tp_rank < tp_size:
        raise ConfigError(f"bad tensor-parallel rank {tp_rank} of size {tp_size}")


def kv_heads_per_rank(num_kv_heads: int, tp_size: int) -> int:
    """KV heads each rank holds: num_kv_heads / tp, or 1 (replicated) when tp > num_kv_heads."""
    if num_kv_heads >= tp_size:
        return _divide(num_kv_heads, tp_size, "num_key_value_heads")
    if tp_size % num_kv_heads:
        raise ConfigError(f"tp_size={tp_size} is not a multiple of "
                          f"num_key_value_heads={num_kv_heads}")
    return 1


class LinearBase(nn.Module):
    """y = x @ W.T + b with W [out_local, in_local]; subclasses say how shards are cut."""

    def __init__(self, in_local: int, out_local: int, bias: bool, dtype: torch.dtype,
                 tp_size: int, tp_rank: int):
        super().__init__()
        _check_tp(tp_size, tp_rank)
        self.tp_size, self.tp_rank = tp_size, tp_rank
        self.weight = nn.Parameter(torch.empty(out_local, in_local, dtype=dtype),
                                   requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_local, dtype=dtype), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: ShardId = None) -> None:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out]
        return linear(x, self.weight, self.bias, self.weight_packed, self.mkl_rows)

    weight_packed = None  # optional oneDNN-packed copy of weight for CPU; see pack_linear_weights
    mkl_rows = 0  # fp32 products of at most this many rows skip the packed copy (see linear())


class ReplicatedLinear(LinearBase):
    """Every rank holds the whole weight."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, tp_size: int = 1, tp_rank: int = 0):
        super().__init__(in_features, out_features, bias, dtype, tp_size, tp_rank)

    def weight_loader(self, param, loaded_weight, shard_id=None):
        _copy_checked(param.data, loaded_weight)


class ColumnLinear(LinearBase):
    """Output features split across ranks: rank r holds rows [r*out/tp, (r+1)*out/tp)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, tp_size: int = 1, tp_rank: int = 0):
        out_local = _divide(out_features, tp_size, "out_features")
        super().__init__(in_features, out_local, bias, dtype, tp_size, tp_rank)

    def weight_loader(self, param, loaded_weight, shard_id=None):
        size = param.shape[0]
        _copy_checked(param.data, loaded_weight.narrow(0, self.tp_rank * size, size))


class MergedColumnLinear(ColumnLinear):
    """Several column-parallel outputs in one matmul, e.g. gate_up: shard ids 0, 1, ...

    Each rank's weight is [its slice of output 0; its slice of output 1; ...].
    """

    def __init__(self, in_features: int, output_sizes: Sequence[int], bias: bool = False,
                 dtype: torch.dtype = torch.float32, tp_size: int = 1, tp_rank: int = 0):
        self.output_sizes = tuple(output_sizes)
        super().__init__(in_features, sum(output_sizes), bias, dtype, tp_size, tp_rank)
        self.local_sizes = tuple(_divide(n, tp_size, "output size") for n in self.output_sizes)

    def weight_loader(self, param, loaded_weight, shard_id=None):
        if not isinstance(shard_id, int) or not 0 <= shard_id < len(self.local_sizes):
            raise ConfigError(f"MergedColumnLinear needs shard id 0..{len(self.local_sizes) - 1}, "
                              f"got {shard_id!r}")
        size = self.local_sizes[shard_id]
        offset = sum(self.local_sizes[:shard_id])
        _copy_checked(param.data.narrow(0, offset, size),
                      loaded_weight.narrow(0, self.tp_rank * size, size))


class QKVLinear(ColumnLinear):
    """Fused q/k/v projection, shard ids "q", "k", "v"; output [T, (Hq + 2 Hkv) * D] per rank.

    With fewer kv heads than ranks, kv heads are replicated: rank r holds kv head r*Hkv // tp.
    """

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, dtype: torch.dtype = torch.float32,
                 tp_size: int = 1, tp_rank: int = 0):
        _check_tp(tp_size, tp_rank)
        self.head_dim = head_dim
        self.num_heads = _divide(num_heads, tp_size, "num_attention_heads")
        self.num_kv_heads = kv_heads_per_rank(num_kv_heads, tp_size)
        # kv head (group) of this rank's q heads; ranks that share one hold a copy of it
        self.kv_shard = tp_rank if num_kv_heads >= tp_size else tp_rank * num_kv_heads // tp_size
        out_local = (self.num_heads + 2 * self.num_kv_heads) * head_dim
        super().__init__(hidden_size, out_local * tp_size, bias, dtype, tp_size, tp_rank)
        q, kv = self.num_heads * head_dim, self.num_kv_heads * head_dim
        # shard id -> (offset in the local output, size, which slice of the checkpoint)
        self.shards = {"q": (0, q, tp_rank), "k": (q, kv, self.kv_shard),
                       "v": (q + kv, kv, self.kv_shard)}

    def weight_loader(self, param, loaded_weight, shard_id=None):
        if shard_id not in self.shards:
            raise ConfigError(f"QKVLinear needs shard id 'q', 'k' or 'v', got {shard_id!r}")
        offset, size, index = self.shards[shard_id]
        _copy_checked(param.data.narrow(0, offset, size),
                      loaded_weight.narrow(0, index * size, size))


class RowLinear(LinearBase):
    """Input features split across ranks; each rank's partial sums need an all-reduce.

    The bias is added on rank 0 only, so the all-reduced sum carries it once. `reduce` (the
    group's all-reduce) makes the output whole; without it the output is this rank's partial sum.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, tp_size: int = 1, tp_rank: int = 0,
                 reduce: Optional[Reduce] = None):
        in_local = _divide(in_features, tp_size, "in_features")
        super().__init__(in_local, out_features, bias, dtype, tp_size, tp_rank)
        self.add_bias = tp_rank == 0
        self.reduce = reduce

    def weight_loader(self, param, loaded_weight, shard_id=None):
        if param.dim() == 1:  # bias: whole on every rank
            _copy_checked(param.data, loaded_weight)
            return
        size = param.shape[1]
        _copy_checked(param.data, loaded_weight.narrow(1, self.tp_rank * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, in_local] -> [T, out]
        out = linear(x, self.weight, self.bias if self.add_bias else None, self.weight_packed, self.mkl_rows)
        return out if self.reduce is None else self.reduce(out)  # partial -> summed over ranks


class VocabEmbedding(nn.Module):
    """Embedding with the vocab split in ceil(V / tp) rows per rank (the last may be padded).

    On tp > 1, ids outside this rank's rows embed to zero; `reduce` (the group's all-reduce)
    sums the ranks, so every rank ends with the whole [T, H].
    """

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype = torch.float32,
                 tp_size: int = 1, tp_rank: int = 0, reduce: Optional[Reduce] = None):
        super().__init__()
        _check_tp(tp_size, tp_rank)
        self.vocab_size, self.tp_size, self.tp_rank = vocab_size, tp_size, tp_rank
        self.reduce = reduce
        self.rows_per_rank = -(-vocab_size // tp_size)
        self.vocab_start = tp_rank * self.rows_per_rank
        self.vocab_end = min(self.vocab_start + self.rows_per_rank, vocab_size)
        self.weight = nn.Parameter(torch.zeros(self.rows_per_rank, hidden_size, dtype=dtype),
                                   requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param, loaded_weight, shard_id=None):
        if loaded_weight.shape[0] != self.vocab_size or loaded_weight.shape[1] != param.shape[1]:
            raise ConfigError(f"checkpoint embedding {tuple(loaded_weight.shape)} does not match "
                              f"vocab_size={self.vocab_size}, hidden={param.shape[1]}")
        rows = self.vocab_end - self.vocab_start
        _copy_checked(param.data.narrow(0, 0, rows),
                      loaded_weight.narrow(0, self.vocab_start, rows))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, H]
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        in_range = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)  # [T]
        local = torch.where(in_range, input_ids - self.vocab_start, 0)
        out = F.embedding(local, self.weight) * in_range.unsqueeze(-1).to(self.weight.dtype)
        return out if self.reduce is None else self.reduce(out)  # [T, H] summed over ranks


class LMHead(VocabEmbedding):
    """Output projection over this rank's vocab rows: [S, H] -> [S, rows_per_rank].

    The caller gathers ranks along the vocab dim and drops padding past vocab_size
    (ParallelState.gather_vocab). Padding rows are zero, so their logits are 0 before the drop.
    """

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype = torch.float32,
                 tp_size: int = 1, tp_rank: int = 0):
        super().__init__(vocab_size, hidden_size, dtype, tp_size, tp_rank)

    def tie_to(self, embedding: VocabEmbedding) -> None:
        """Share the embedding's weight (tie_word_embeddings)."""
        self.weight = embedding.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [S, H] -> [S, V_local]
        return linear(hidden, self.weight, None, self.weight_packed, self.mkl_rows)

    weight_packed = None
    mkl_rows = 0


def linear(x: torch.Tensor, weight: torch.Tensor, bias, weight_packed, mkl_rows: int = 0) -> torch.Tensor:
    """x [..., in] @ W.T (+ b), through the oneDNN-packed copy of W when there is one, except for
    fp32 products of at most `mkl_rows` rows, which take the plain weight (MKL's few-row path).
    Which path reads few rows faster depends on the CPU, so the engine measures it
    (layers/few_rows.py): on a 2-core Xeon with AMX MKL won at 1-3 rows (SmolLM2's linears at
    1 row: 22.3 against 26.4 ms), on a 2-core AMD EPYC it lost at every row count (47.8 against
    26.6 ms at 1 row). bf16 always takes the packed copy."""
    if weight_packed is not None and not (x.dtype == torch.float32 and x.numel() <= mkl_rows * x.shape[-1]):
        return torch.ops.mkldnn._linear_pointwise(x, weight_packed, bias, "none", [], "")
    return F.linear(x, weight, bias)


def can_pack_weights(device: torch.device, dtype: torch.dtype) -> bool:
    """oneDNN packing on this CPU: fp32, and bf16 where oneDNN runs it natively (AVX512-BF16/AMX;
    on this project's EPYC, bf16 SmolLM2 generation at batch 32 went from 436 to 616 tok/s with
    packed weights, same tokens)."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available() \
            or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return dtype == torch.float32


def pack_linear_weights(model: nn.Module, batch_hint: int = 16) -> int:
    """Give every linear layer and LM head a oneDNN-packed weight copy; returns bytes added.
    (Which few-row products still take the plain weight: layers/few_rows.py.)

    On x86 CPUs oneDNN's blocked layout runs the products of 4 and more rows (verifying, larger
    batches) 2-3x faster than MKL on the plain [out, in] weight: at M=6 rows, 78 vs 31 GFLOP/s
    for the 576x3072 gate_up of SmolLM2, and a 49k-row LM head in 6 ms instead of 21 ms
    (measured on this project's 2-core EPYC). Inference only: the packed copy has no autograd and does
    not follow later in-place changes to `weight`, so call it once all weights are final.
    """
    added = 0
    for module in model.modules():
        if isinstance(module, (LinearBase, LMHead)):
            w = module.weight.detach()
            module.weight_packed = torch.ops.mkldnn._reorder_linear_weight(w, batch_hint)
            added += w.numel() * w.element_size()
    return added


def default_weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor,
                          shard_id: ShardId = None) -> None:
    """Whole-tensor copy, for parameters without their own loader (norm weights)."""
    _copy_checked(param.data, loaded_weight)
