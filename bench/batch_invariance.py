"""Does greedy output depend on what a step computes beside it? Plain decoding batched, plain one
request at a time and speculative modes, compared token by token, in one dtype.

    python bench/batch_invariance.py [--dtype float32] [--prompts 24] [--max-tokens 128]
                                     [--modes plain-alone,chain,tree,adaptive]

Runs the first --prompts eval prompts (chat template, greedy, EOS ignored) through plain decoding
with all of them batched (the reference), then through each mode, and prints per mode the
requests whose tokens differ from the reference and where each first differs. Speculation
verifies several rows per sequence in one pass and batches change with arrivals, so greedy output
equals plain decoding's only if a row's result does not depend on the other rows of its step.
A difference in plain-alone as well means the kernels are not batch-invariant in this dtype
(nothing speculative about it).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODES = {  # label -> LLM keyword arguments beside model and dtype
    "plain-alone": {"max_num_seqs": 1},
    "chain": {"spec_steps": 3, "spec_policy": "fixed"},
    "tree": {"spec_topk": 4, "spec_policy": "fixed"},
    "adaptive": {},
}


def first_differences(reference: list[list[int]], other: list[list[int]]) -> dict[int, int]:
    """{request index: first token position where `other` differs from `reference`}."""
    found = {}
    for i, (a, b) in enumerate(zip(reference, other)):
        if a != b:
            found[i] = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return found


def main(argv=None) -> int:
    from eyas.core import SamplingParams
    from eyas.llm import LLM
    from eyas.prompts import read_prompt_file

    root = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--draft", default="smollm2-135m-instruct-eagle3")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--prompt-file", default=str(root / "data/prompts/eval.jsonl"))
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--num-threads", type=int, default=2)
    ap.add_argument("--modes", default=",".join(MODES))
    args = ap.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        ap.error(f"unknown modes {unknown}; known: {list(MODES)}")
    requests = [spec.request() for spec in read_prompt_file(args.prompt_file)[:args.prompts]]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)

    def run(**kw) -> list[list[int]]:
        llm = LLM(args.model, dtype=args.dtype, num_threads=args.num_threads, **kw)
        return [o.token_ids for o in llm.generate(requests, params, chat=True)]

    reference = run()
    print(f"{args.dtype}: {len(requests)} requests x {args.max_tokens} tokens; reference: plain, all batched")
    for mode in modes:
        kw = dict(MODES[mode])
        if mode != "plain-alone":
            kw["draft"] = args.draft
        start = time.perf_counter()
        diff = first_differences(reference, run(**kw))
        where = ", ".join(str(j) for j in diff.values())
        print(f"{mode}: {len(diff)} of {len(requests)} requests differ"
              + (f" (first differences at tokens {where})" if diff else "")
              + f"; {time.perf_counter() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
