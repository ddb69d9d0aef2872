"""Time a model's linear layers on MKL (plain weight) against oneDNN (packed copy) by rows.

    python bench/linear_paths.py [--shape smollm2-135m] [--rows 1,2,3,4,8] [--dtypes float32,bfloat16]

Builds eyas's Llama model of a shape from bench/step_time.py (random weights, SmolLM2-135M by
default) and takes the weights of its linear layers and LM head, distinct per layer so that they
stream from memory as in a decode step; times one pass over all of them per row count and path
(best of --repeats). The engine measures the same at start-up (`layers/few_rows.py`) and sends
fp32 products of at most that many rows to MKL, the rest to the packed copy; this shows the
whole table, and what the engine's measurement picks, on the machine at hand.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from eyas.layers.few_rows import measure_mkl_rows, pass_seconds, packed_weights  # noqa: E402
from eyas.layers.linear import can_pack_weights, pack_linear_weights  # noqa: E402
from step_time import SHAPES, build  # noqa: E402


def model_weights(shape: str, dtype: torch.dtype) -> tuple[torch.nn.Module, list]:
    """A random-weight model with packed copies, and its (plain [out, in], packed) weights."""
    model = build(shape, dtype, torch.device("cpu"))
    pack_linear_weights(model)
    return model, packed_weights(model)


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
    print(f"ms per pass over all linears, best of {args.repeats}")
    print("| dtype | rows | MKL, plain weight | oneDNN, packed |")
    print("|---|---|---|---|")
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name.strip())
        if not can_pack_weights(torch.device("cpu"), dtype):
            print(f"| {name} | - | no oneDNN packing for {name} on this CPU | |")
            continue
        model, weights = model_weights(args.shape, dtype)
        for n in rows:
            inputs = {k: torch.randn(n, k).to(dtype) for k in {w.shape[1] for w, _ in weights}}  # [n, in]
            times = {}
            for use_packed in (False, True):
                pass_seconds(weights, inputs, use_packed)  # warm-up
                times[use_packed] = min(pass_seconds(weights, inputs, use_packed) for _ in range(args.repeats))
            print(f"| {name} | {n} | {1000 * times[False]:.1f} | {1000 * times[True]:.1f} |", flush=True)
        if dtype == torch.float32:
            print(f"the engine's measurement (layers/few_rows.py): MKL takes products of at most "
                  f"{measure_mkl_rows(model)} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
