"""Which CPU kernel reads a few rows faster: MKL on the plain weight, or oneDNN's packed copy?

Decode at batch 1-3 and short verifies multiply 1-3 rows by every weight, so a step streams all
the weights once and the kernel that reads them faster sets the step time. The answer is the
CPU's: on a 2-core Xeon with AMX, MKL won at 1-3 rows (SmolLM2-135M's linears, fp32: 22.3 against
26.4 ms at 1 row); on a 2-core AMD EPYC (Zen 4) it lost at every row count, 2-4x (47.8 against
26.6 ms at 1 row, 116 against 29 at 3), so a fixed rule costs one machine or the other a large
share of its decode speed. `measure_mkl_rows` times one pass over the model's own weights, as a
decode step streams them, and returns how many rows MKL may take.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

MAX_ROWS = 3  # from 4 rows on the packed copy won on every CPU measured (Xeon: 29 against 41 ms)


def packed_layers(model: nn.Module) -> list[nn.Module]:
    """Every linear layer and LM head of the model that holds a packed weight copy."""
    from eyas.layers.linear import LinearBase, LMHead

    return [m for m in model.modules() if isinstance(m, (LinearBase, LMHead)) and m.weight_packed is not None]


def packed_weights(model: nn.Module) -> list[tuple[torch.Tensor, object]]:
    """(plain [out, in], packed) weights of the model's packed layers."""
    return [(m.weight, m.weight_packed) for m in packed_layers(model)]


def pass_seconds(weights, inputs: dict[int, torch.Tensor], packed: bool) -> float:
    """Seconds for one product with every weight (inputs by in-width, each [rows, in])."""
    start = time.perf_counter()
    for w, p in weights:
        x = inputs[w.shape[1]]
        if packed:
            torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")
        else:
            F.linear(x, w)
    return time.perf_counter() - start


def measure_mkl_rows(model: nn.Module, repeats: int = 3, max_rows: int = MAX_ROWS) -> int:
    """The largest r <= max_rows such that MKL beat the packed copy at every row count 1..r
    (best of `repeats` passes each, the two paths taken in turn so a slow spell of the machine
    falls on both); 0 if MKL lost at one row, or the model holds no packed fp32 weight. Costs
    2 x (repeats + 1) passes over the weights per row count tried (SmolLM2-135M on the EPYC,
    which stops after one row: 8 passes, about 0.3 s)."""
    weights = [(w, p) for w, p in packed_weights(model) if w.dtype == torch.float32]
    if not weights:
        return 0
    gen = torch.Generator().manual_seed(0)
    for rows in range(1, max_rows + 1):
        inputs = {n: torch.randn(rows, n, generator=gen) for n in {w.shape[1] for w, _ in weights}}
        best = {False: float("inf"), True: float("inf")}
        for i in range(repeats + 1):  # the first pass of each path warms it up
            for packed in (False, True):
                seconds = pass_seconds(weights, inputs, packed)
                if i:
                    best[packed] = min(best[packed], seconds)
        if best[False] >= best[True]:
            return rows - 1
    return max_rows


def set_mkl_rows(model: nn.Module, rows: int) -> None:
    """fp32 products of at most `rows` rows take the plain weight in every packed layer."""
    for m in packed_layers(model):
        m.mkl_rows = rows
