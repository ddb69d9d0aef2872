"""Time one plain decode step of a random-weight model of a given shape against its memory floor.

    python bench/step_time.py --shape llama-3.1-8b --device cuda --batch 1,64 --context 1024
    python bench/step_time.py --shape tiny --device cpu --batch 1,4 --context 128   # smoke test

Builds eyas's own Llama model from a config (no checkpoint, no network), fills the weights with
small random values, and gives every sequence `context` cached tokens. Reports eager and compiled
step times next to the floor: (weight bytes + KV bytes read) / bandwidth. Modes: eager; graph (the
eager step captured as CUDA graphs, no torch.compile; GPU only); compiled (torch.compile, and on
GPU captured as CUDA graphs: the engine's default there).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {  # HF LlamaConfig fields
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                         rope_theta=500000.0, tie_word_embeddings=False),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rope_theta=100000.0, tie_word_embeddings=True),
    "tiny": dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                 tie_word_embeddings=False),
}


def build(shape: str, dtype: torch.dtype, device: torch.device):
    from transformers import LlamaConfig

    from eyas.models.llama import LlamaForCausalLM

    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape]), dtype=dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=gen) if p.dim() > 1 else p.fill_(1.0)
    return model.eval().requires_grad_(False)


def time_steps(fn, device: torch.device, iters: int) -> float:
    for _ in range(3):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def main(argv=None) -> int:
    from eyas.kv.cache import allocate_kv, kv_layout_for
    from eyas.workers.input_batch import SeqSpan
    from eyas.workers.model_runner import ModelRunner

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch", default="1,64")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--bandwidth-gbs", type=float, default=4200.0, help="memory bandwidth for the floor")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--modes", default="eager,graph,compiled", help="eager, graph (GPU), compiled")
    ap.add_argument("--out", help="append JSON records to this file")
    args = ap.parse_args(argv)

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    batches = [int(b) for b in args.batch.split(",")]
    block = 16
    model = build(args.shape, dtype, device)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    layout = kv_layout_for(model)
    per_seq = -(-(args.context + 1) // block)
    num_blocks = max(batches) * per_seq + 1  # + 1: the pad block of the compiled path
    kv = allocate_kv(layout, num_blocks, block, dtype, device)
    runner = ModelRunner(model, kv, block, device)
    modes = [m for m in args.modes.split(",") if m != "graph" or device.type == "cuda"]
    records = []
    for mode in modes:
        t_setup = time.perf_counter()
        if mode != "eager":
            runner.enable_graphs(pad_slot=(num_blocks - 1) * block, max_batch=max(batches),
                                 backend="none" if mode == "graph" else "inductor")
        for b in batches:
            spans = [SeqSpan([1], args.context, list(range(i * per_seq, (i + 1) * per_seq)))
                     for i in range(b)]
            t_first = time.perf_counter()
            runner.forward(spans)  # compiles / captures this shape
            first_s = time.perf_counter() - t_first
            t = time_steps(lambda: runner.forward(spans), device, args.iters)
            kv_bytes = layout.bytes_per_block(block, dtype) / block * b * args.context
            floor = (weight_bytes + kv_bytes) / (args.bandwidth_gbs * 1e9)
            rec = {"shape": args.shape, "device": str(device), "dtype": args.dtype, "mode": mode,
                   "batch": b, "context": args.context, "step_ms": round(t * 1e3, 3),
                   "floor_ms": round(floor * 1e3, 3), "x_floor": round(t / floor, 2),
                   "weights_gb": round(weight_bytes / 1e9, 2), "kv_gb": round(kv_bytes / 1e9, 2),
                   "first_call_s": round(first_s, 2), "since_setup_s": round(time.perf_counter() - t_setup, 1)}
            records.append(rec)
            print(json.dumps(rec), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(rec) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
