"""GPU smoke check of the engine on tiny random models, before the real runs spend device time.

    python bench/device/smoke.py --tokenizer DIR --out smoke.jsonl

DIR holds SmolLM2's config.json and tokenizer files (no weights). Each case runs in its own
try block and appends one JSON line (ok, seconds, whether greedy tokens equal the eager
no-speculation reference, the error if any), so one failure does not hide the others.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

PROMPTS = ["The quick brown fox jumps over the lazy dog because", "Once upon a time", "1, 2, 3, 4, 5,",
           "def fibonacci(n):", "In the beginning the universe was created."]


def generate(cfg, params) -> tuple[list[list[int]], dict]:
    """Greedy or sampled tokens of PROMPTS, and what ran compiled."""
    from eyas.engine import LLMEngine

    from test_engine import run_all

    engine = LLMEngine(cfg)
    outs = run_all(engine, PROMPTS, params, stagger=2)  # staggered: batches of 1..5, mixed steps
    info = {"compiled": engine.compiled}
    graphs = getattr(engine.runner, "graphs", None)
    if graphs is not None:
        info["target_graphs"] = len(getattr(graphs.fn, "graphs", {}))
    return [outs[str(i)] for i in range(len(PROMPTS))], info


def main() -> int:
    from eyas import SamplingParams
    from eyas.config import EngineConfig
    from util_engine import make_random_drafter, make_tiny_llama_folder

    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    target = make_tiny_llama_folder(tmp / "tiny", Path(args.tokenizer))
    draft = make_random_drafter(target, tmp / "drafter")
    base = EngineConfig(model=str(target), device=args.device, dtype="float32", block_size=16,
                        kv_cache_memory="256MiB", max_model_len=512, max_num_seqs=8)
    greedy = SamplingParams(max_tokens=24, ignore_eos=True)
    sampled = SamplingParams(max_tokens=24, ignore_eos=True, temperature=0.8, seed=1)
    spec = dict(draft=str(draft), spec_steps=3)
    cases = [
        ("eager", dict(eager=True), greedy),
        ("graph", dict(eager=False), greedy),
        ("chain", dict(eager=False, spec_policy="fixed", **spec), greedy),
        ("tree", dict(eager=False, spec_policy="fixed", spec_topk=2, spec_draft_tokens=6, **spec), greedy),
        ("adaptive", dict(eager=False, spec_policy="adaptive", **spec), greedy),
        ("chain-sampled", dict(eager=False, spec_policy="fixed", **spec), sampled),
        ("chain-bf16", dict(eager=False, dtype="bfloat16", spec_policy="fixed", **spec), greedy),
    ]
    ref = None
    for name, overrides, params in cases:
        rec = {"case": name}
        t0 = time.perf_counter()
        try:
            tokens, info = generate(base.replace(**overrides), params)
            rec.update(ok=True, **info)
            if ref is None:
                ref = tokens
            if params is greedy:
                rec["equal_to_eager"] = sum(a == b for a, b in zip(tokens, ref))
        except Exception as e:  # noqa: BLE001 - record and go on to the next case
            rec.update(ok=False, error=f"{type(e).__name__}: {e}"[:400],
                       trace=traceback.format_exc()[-1500:])
        rec["seconds"] = round(time.perf_counter() - t0, 1)
        print(json.dumps({k: v for k, v in rec.items() if k != "trace"}), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(rec) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
