"""Fixed draft shapes on the bench's prompts: plain decoding against fixed chains and trees.

    python bench/fixed_shapes.py [--concurrency 1] [--num-prompts 4] [--shapes "plain;tree 4;chain 5"]

The bench's closed loop (128-token prompts from the fixed prompt set, 128 output tokens, greedy,
EOS ignored) at one concurrency, once per shape, each on its own engine with the fixed policy (no
controller). Prints per shape the output tokens per second, the mean step time, the tokens per
sequence per step, and the drafter's propose and the target's verify time per call. It answers
"which shape would the controller ideally pick here" (bench/spec_step_breakdown.py does the same
on the eval prompts with the chat template).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from spec_step_breakdown import Timer  # noqa: E402


def shape_fields(label: str) -> dict:
    """'plain' -> {}; 'chain K' -> K-token chain; 'tree N' -> N-node tree of depth 5, top-4."""
    kind, _, size = label.partition(" ")
    if kind == "plain" and not size:
        return {}
    if kind in ("chain", "tree") and size.isdigit() and int(size) >= 1:
        n = int(size)
        return dict(spec_topk=1, spec_steps=n) if kind == "chain" else \
            dict(spec_topk=4, spec_steps=5, spec_draft_tokens=n)
    raise SystemExit(f"bad shape {label!r}: expected 'plain', 'chain K' or 'tree N'")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--draft", default="smollm2-135m-instruct-eagle3")
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--num-prompts", type=int, default=4)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--shapes", default="plain;tree 8;tree 4;chain 5;chain 3")
    ap.add_argument("--num-threads", type=int, default=2)
    ap.add_argument("--dtype", default="auto", help="the target's dtype (default auto: float32 on CPU)")
    args = ap.parse_args(argv)
    shapes = [(x.strip(), shape_fields(x.strip())) for x in args.shapes.split(";") if x.strip()]

    from eyas.bench.prompts import build_prompt_ids
    from eyas.bench.runner import run_closed_loop, warm_up
    from eyas.config import EngineConfig
    from eyas.engine import LLMEngine

    base = EngineConfig(model=args.model, num_threads=args.num_threads, dtype=args.dtype,
                        max_num_seqs=max(args.concurrency, 4))
    prompts = None
    for label, fields in shapes:
        cfg = base if not fields else base.replace(draft=args.draft, spec_policy="fixed", **fields)
        engine = LLMEngine(cfg)
        prompts = prompts or build_prompt_ids(engine.tokenizer, args.num_prompts, args.input_len)
        warm_up(engine, prompts[:2], 16)
        propose = Timer(engine.spec.proposer, "propose") if fields else None
        verify = Timer(engine.spec.target, "execute") if fields else None
        steps0 = engine.num_steps
        timings, wall = run_closed_loop(engine, prompts, args.concurrency, args.output_len, progress=False)
        steps = engine.num_steps - steps0
        tokens = sum(t.output_tokens for t in timings)
        per_seq = tokens / steps / min(args.concurrency, len(prompts))
        extra = f", propose {propose.ms_per_call():.1f} ms, verify {verify.ms_per_call():.1f} ms" if fields else ""
        print(f"{label}: {tokens / wall:.1f} tok/s, {1e3 * wall / steps:.1f} ms/step, "
              f"{per_seq:.2f} tokens/seq/step{extra}", flush=True)
        del engine
    return 0


if __name__ == "__main__":
    sys.exit(main())
