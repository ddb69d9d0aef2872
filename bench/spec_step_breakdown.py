"""Where a speculative step's time goes: the drafter's propose vs the target's verify, per setting.

    python bench/spec_step_breakdown.py --draft smollm2-135m-instruct-eagle3 --prompts 6 --max-tokens 96 \
        [--settings "plain;tree 5x4, 4 tokens"] [--spec-dtypes float32,bfloat16] [--batch 4]

Runs the eval prompts `--batch` at a time (chat template, batch 1 by default, greedy, EOS ignored) through a plain engine and
through fixed-policy speculative engines (chain K=2, chain K=5, trees), with wall-clock timers
around the proposer's `propose` and the target's `execute`. Prints mean milliseconds per step of
each and the output tokens per second. Eager steps on CPU unless flags say otherwise. With several
--spec-dtypes, every drafting setting runs once per drafter dtype.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SETTINGS = {  # label -> EngineConfig spec fields (None: no drafter)
    "plain": None,
    "chain K=2": dict(spec_topk=1, spec_steps=2),
    "chain K=5": dict(spec_topk=1, spec_steps=5),
    "tree 5x4, 8 tokens": dict(spec_topk=4, spec_steps=5, spec_draft_tokens=8),
    "tree 5x4, 4 tokens": dict(spec_topk=4, spec_steps=5, spec_draft_tokens=4),
    "tree 5x4, 2 tokens": dict(spec_topk=4, spec_steps=5, spec_draft_tokens=2),
    "tree 3x4, 6 tokens": dict(spec_topk=4, spec_steps=3, spec_draft_tokens=6),
}


class Timer:
    """Wraps obj.name with a timer that sums seconds and counts calls."""

    def __init__(self, obj, name: str):
        self.seconds, self.calls, inner = 0.0, 0, getattr(obj, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1
        setattr(obj, name, timed)

    def ms_per_call(self) -> float:
        return 1000 * self.seconds / max(self.calls, 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--draft", default="smollm2-135m-instruct-eagle3")
    ap.add_argument("--prompt-file", default=str(Path(__file__).resolve().parents[1] / "data/prompts/eval.jsonl"))
    ap.add_argument("--prompts", type=int, default=6, help="prompts to run (the file's first ones)")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--num-threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1, help="prompts run together (one generate call)")
    ap.add_argument("--settings", help="labels to run, split at ';' (default all)")
    ap.add_argument("--spec-dtypes", default="auto", help="drafter dtypes, comma-separated (default auto)")
    args = ap.parse_args(argv)
    labels = [x.strip() for x in args.settings.split(";")] if args.settings else list(SETTINGS)
    unknown = [x for x in labels if x not in SETTINGS]
    if unknown:
        ap.error(f"unknown settings {unknown}; known: {list(SETTINGS)}")
    dtypes = [x.strip() for x in args.spec_dtypes.split(",") if x.strip()]
    runs = [(label, None) if SETTINGS[label] is None else (label, dt) for label in labels for dt in dtypes]
    runs = list(dict.fromkeys(runs))  # plain once

    from eyas.core import SamplingParams
    from eyas.llm import LLM
    from eyas.prompts import read_prompt_file

    specs = read_prompt_file(args.prompt_file)[:args.prompts]
    requests = [s.request() for s in specs]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    print("| setting | drafter propose ms | target verify ms | steps | accept len | tok/s |")
    print("|---|---|---|---|---|---|")
    for label, dtype in runs:
        spec = SETTINGS[label]
        kw = {} if spec is None else dict(spec, spec_policy="fixed", spec_dtype=dtype)
        if dtype is not None and len(dtypes) > 1:
            label = f"{label} ({dtype})"
        llm = LLM(args.model, draft=None if spec is None else args.draft, num_threads=args.num_threads, **kw)
        llm.generate(requests[:1], SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True), chat=True)  # warm-up
        eng = llm.engine
        propose = Timer(eng.spec.proposer, "propose") if spec is not None else None
        verify = Timer(eng.spec.target, "execute") if spec is not None else None
        steps0, wall, tokens = eng.num_steps, 0.0, 0
        for i in range(0, len(requests), args.batch):  # --batch at a time
            start = time.perf_counter()
            outs = llm.generate(requests[i:i + args.batch], params, chat=True)
            wall += time.perf_counter() - start
            tokens += sum(len(out.token_ids) for out in outs)
        steps = eng.num_steps - steps0
        propose_ms = "-" if propose is None else f"{propose.ms_per_call():.1f}"
        verify_ms = f"{1000 * wall / steps:.1f} (whole step)" if verify is None else f"{verify.ms_per_call():.1f}"
        per_seq = tokens / steps / min(args.batch, len(requests))  # tokens per sequence per step
        print(f"| {label} | {propose_ms} | {verify_ms} | {steps} | {per_seq:.2f} | {tokens / wall:.1f} |",
              flush=True)
        del llm
    return 0


if __name__ == "__main__":
    sys.exit(main())
