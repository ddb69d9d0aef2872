#!/usr/bin/env python3
"""Control-plane overhead of the Ray executor: the same decode workload on the in-process engine
and on the Ray executor at TP=1 (one target worker, no drafter), interleaved in one run.

    python bench/ray_overhead.py [--model smollm2-135m-instruct] [--concurrency 16]
                                 [--input-len 128] [--output-len 64] [--rounds 3] [--num-threads 2]

Reports the mean time of a pure decode step (every sequence decoding, no prefill) for each
executor and their ratio; rounds alternate local, ray, local, ray, ... so drift on a shared
machine hits both. The Ray side pays: building the plan, one gRPC round trip to the worker,
rebuilding the step there and the result back.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def decode_steps(engine, prompts: list[list[int]], output_len: int) -> tuple[list[float], list[float]]:
    """Run one batch to completion; return the wall times of the steps that were pure decode, and
    (Ray) the worker's own time on each of them."""
    from eyas import SamplingParams

    params = SamplingParams(max_tokens=output_len, ignore_eos=True)
    for i, ids in enumerate(prompts):
        engine.add_request(f"r{time.monotonic_ns()}-{i}", params=params, prompt_token_ids=ids)
    times, inner = [], []
    target = getattr(getattr(engine, "decoder", None), "target", None)
    while engine.has_unfinished():
        decoding = all(not s.in_prefill for s in engine.scheduler.running) and not engine.scheduler.waiting
        w0 = getattr(target, "worker_seconds", 0.0)
        t0 = time.perf_counter()
        engine.step()
        if decoding and engine.scheduler.running:
            times.append(time.perf_counter() - t0)
            inner.append(getattr(target, "worker_seconds", 0.0) - w0)
    return times, inner


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--num-threads", type=int, default=2)
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()

    import torch

    from eyas.config import EngineConfig
    from eyas.engine import LLMEngine, create_engine

    torch.set_num_threads(args.num_threads)
    base = EngineConfig(model=args.model, num_threads=args.num_threads, max_num_seqs=args.concurrency,
                        max_model_len=args.input_len + args.output_len + 8, kv_cache_memory="512MiB")
    engines = {"local": LLMEngine(base), "ray": create_engine(base.replace(executor="ray"))}
    g = torch.Generator().manual_seed(0)
    vocab = engines["local"].vocab_size
    prompts = [torch.randint(100, vocab, (args.input_len,), generator=g).tolist() for _ in range(args.concurrency)]
    decode_steps(engines["local"], prompts[:2], 4)  # warm both (first-call costs)
    decode_steps(engines["ray"], prompts[:2], 4)
    steps: dict[str, list[float]] = {"local": [], "ray": []}
    worker: list[float] = []
    for r in range(args.rounds):
        for name in ("local", "ray"):
            t, inner = decode_steps(engines[name], prompts, args.output_len)
            steps[name] += t
            if name == "ray":
                worker += inner
            extra = f", worker {1e3 * statistics.median(inner):.1f} ms" if name == "ray" else ""
            print(f"round {r + 1} {name:5s}: {len(t)} decode steps, median {1e3 * statistics.median(t):.1f} ms"
                  + extra, file=sys.stderr, flush=True)
    engines["ray"].close()
    med = {k: statistics.median(v) for k, v in steps.items()}
    control = statistics.median([a - b for a, b in zip(steps["ray"], worker)])  # coordinator + gRPC
    result = {"concurrency": args.concurrency, "input_len": args.input_len, "output_len": args.output_len,
              "num_threads": args.num_threads, "rounds": args.rounds,
              "local_step_ms": round(1e3 * med["local"], 2), "ray_step_ms": round(1e3 * med["ray"], 2),
              "ray_worker_ms": round(1e3 * statistics.median(worker), 2),
              "ray_control_plane_ms": round(1e3 * control, 2),
              "overhead": round(med["ray"] / med["local"] - 1, 4),
              "control_plane_share": round(control / med["ray"], 4),
              "steps": {k: len(v) for k, v in steps.items()}}
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
