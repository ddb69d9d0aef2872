"""Time a model's linear layers on MKL (plain weight) against oneDNN (packed copy) by rows.

    python bench/linear_paths.py [--shape smollm2-135m] [--rows 1,2,3,4,8] [--dtypes float32,bfloat16]

Builds eyas's Llama model of a shape from bench/step_time.py (random weights, SmolLM2-135M by
default) and takes the weights of its linear layers and LM head, distinct per layer so that they
stream from memory as in a decode step; times one pass over all of them per row count and path
(best of --repeats). The engine's `layers/linear.py` sends fp32 products of at most
MKL_MAX_ROWS rows to MKL and the rest to the packed copy; this shows whether that split holds
on the machine at hand.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from eyas.layers.linear import MKL_MAX_ROWS, LinearBase, LMHead, can_pack_weights  # noqa: E402
from step_time import SHAPES, build  # noqa: E402


def model_weights(shape: str, dtype: torch.dtype) -> list[torch.Tensor]:
    """[out, in] weights of every linear layer and the LM head of a random-weight model."""
    model = build(shape, dtype, torch.device("cpu"))
    return [m.weight for m in model.modules() if isinstance(m, (LinearBase, LMHead))]


def one_pass(weights: list[torch.Tensor], packed: list, rows: int, use_packed: bool) -> float:
    """Seconds for one product of `rows` rows with every weight."""
    widths = {w.shape[1] for w in weights}
    inputs = {n: torch.randn(rows, n).to(weights[0].dtype) for n in widths}  # [rows, in] by in-features
    start = time.perf_counter()
    for w, p in zip(weights, packed):
        x = inputs[w.shape[1]]
        if use_packed:
            torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")
        else:
            F.linear(x, w)
    return time.perf_counter() - start


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    ap.add_argument("--rows", default="1,2,3,4,8")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--num-threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.num_threads)
    rows = [int(r) for r in args.rows.split(",")]
    print(f"MKL_MAX_ROWS = {MKL_MAX_ROWS}; ms per pass over all linears, best of {args.repeats}")
    print("| dtype | rows | MKL, plain weight | oneDNN, packed |")
    print("|---|---|---|---|")
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name.strip())
        if not can_pack_weights(torch.device("cpu"), dtype):
            print(f"| {name} | - | no oneDNN packing for {name} on this CPU | |")
            continue
        weights = model_weights(args.shape, dtype)
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, 16) for w in weights]
        for n in rows:
            times = {}
            for use_packed in (False, True):
                one_pass(weights, packed, n, use_packed)  # warm-up
                times[use_packed] = min(one_pass(weights, packed, n, use_packed) for _ in range(args.repeats))
            print(f"| {name} | {n} | {1000 * times[False]:.1f} | {1000 * times[True]:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
