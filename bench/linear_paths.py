"""Time a model's linear layers on MKL (plain weight) against oneDNN (packed copy) by rows.

    python bench/linear_paths.py [--rows 1,2,3,4,8] [--dtypes float32,bfloat16] [--repeats 5]

Builds random weights of SmolLM2-135M's shapes (per layer: qkv 960x576, o 576x576, gate_up
3072x576, down 576x1536; 30 layers, plus the 49152x576 LM head), distinct per layer so that they
stream from memory as in a decode step, and times one pass over all of them per row count and
path (best of --repeats). The engine's `layers/linear.py` sends fp32 products of at most
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

from eyas.layers.linear import MKL_MAX_ROWS, can_pack_weights  # noqa: E402

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}  # [out, in]
LAYERS, LM_HEAD = 30, (49152, 576)


def one_pass(weights: list[torch.Tensor], packed: list, rows: int, use_packed: bool) -> float:
    """Seconds for one product of `rows` rows with every weight."""
    inputs = {w.shape[1]: torch.randn(rows, w.shape[1]).to(w.dtype) for w in weights}  # by in-features
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
        weights = [torch.randn(*shape).to(dtype) for shape in SHAPES.values() for _ in range(LAYERS)]
        weights.append(torch.randn(*LM_HEAD).to(dtype))
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
