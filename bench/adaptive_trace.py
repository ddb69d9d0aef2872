"""Where the adaptive controller's time goes at one concurrency, against plain decoding.

    python bench/adaptive_trace.py --draft smollm2-135m-instruct-eagle3 --concurrency 4 \
        --num-prompts 16 [--spec-topk 4 --spec-draft-tokens 8] [--rounds 2]

Runs the bench's closed loop (128-token prompts, 128 output tokens, greedy, EOS ignored) with a
plain engine and an adaptive one, alternating, `--rounds` times each, and times every engine
step. Steps are grouped by kind: prefill (any prompt tokens in the step), or decode with the k the
controller chose (0 = plain). Prints per group the steps, mean ms and share of the wall time, the
tokens per second of each run, and the controller's own step-time table (its medians per batch
bucket and k) with its tokens-per-sequence estimates, so predicted and realised costs can be set
side by side.
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def traced_run(engine, prompts, concurrency: int, output_len: int) -> tuple[dict, float, int]:
    """One closed-loop level; returns ({kind: [seconds]}, wall seconds, output tokens)."""
    from eyas.bench.runner import run_closed_loop, traced_step

    groups: dict[str, list[float]] = defaultdict(list)
    inner = engine.step

    def step():
        out, seconds, prefill, key = traced_step(engine, inner)
        groups["prefill" if prefill else f"decode k={key or 0}"].append(seconds)
        return out

    engine.step = step
    try:
        timings, wall = run_closed_loop(engine, prompts, concurrency, output_len, progress=False)
    finally:
        del engine.step
    return groups, wall, sum(t.output_tokens for t in timings)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--draft", default="smollm2-135m-instruct-eagle3")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--spec-steps", type=int, default=5)
    ap.add_argument("--spec-topk", type=int, default=1)
    ap.add_argument("--spec-draft-tokens", type=int, default=8)
    ap.add_argument("--spec-dtype", default="auto")
    ap.add_argument("--num-threads", type=int, default=2)
    args = ap.parse_args(argv)

    from eyas.bench.prompts import build_prompt_ids
    from eyas.bench.runner import warm_up
    from eyas.config import EngineConfig
    from eyas.engine import LLMEngine

    base = EngineConfig(model=args.model, num_threads=args.num_threads,
                        max_num_seqs=max(args.concurrency, 4))
    engines = {"plain": LLMEngine(base),
               "adaptive": LLMEngine(base.replace(draft=args.draft, spec_steps=args.spec_steps,
                                                  spec_topk=args.spec_topk, spec_dtype=args.spec_dtype,
                                                  spec_draft_tokens=args.spec_draft_tokens))}
    prompts = build_prompt_ids(engines["plain"].tokenizer, args.num_prompts, args.input_len)
    for engine in engines.values():
        warm_up(engine, prompts[:4], args.output_len)
    tok_s: dict[str, list[float]] = defaultdict(list)
    for r in range(args.rounds):
        for name, engine in engines.items():
            groups, wall, tokens = traced_run(engine, prompts, args.concurrency, args.output_len)
            tok_s[name].append(tokens / wall)
            print(f"round {r} {name}: {tokens / wall:.1f} tok/s ({tokens} tokens in {wall:.1f} s)")
            for kind, times in sorted(groups.items()):
                print(f"  {kind:>12}: {len(times):4d} steps, {1e3 * sum(times) / len(times):7.1f} ms mean, "
                      f"{100 * sum(times) / wall:5.1f}% of wall")
    ratio = sum(tok_s["adaptive"]) / sum(tok_s["plain"])
    print(f"adaptive / plain: {ratio:.3f} (rounds: "
          f"{', '.join(f'{a / p:.2f}' for a, p in zip(tok_s['adaptive'], tok_s['plain']))})")
    c = engines["adaptive"].spec.controller
    print(f"controller step-time medians (ms, at the machine level now, {c.level:.3f}), bucket -> {{k: ms}}:")
    for bucket, known in sorted(c.times.items()):
        print(f"  {bucket}: " + ", ".join(f"{k}: {1e3 * t * c.level:.1f}" for k, t in sorted(known.items())))
    tokens = c.tree_tokens if c.config.tree else {k: round(c.expected_tokens(k), 3) for k in c.candidates}
    print("tokens per sequence by k:", {k: round(v, 3) for k, v in sorted(tokens.items())})
    return 0


if __name__ == "__main__":
    sys.exit(main())
