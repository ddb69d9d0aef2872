"""Throughput with vs without EAGLE-3 speculation on the same engine, measured in one run.

Usage: python bench/spec_vs_plain.py --draft DIR [--model smollm2-135m-instruct]
           [--prompts data/prompts/eval.jsonl] [--num-prompts 6] [--concurrency 1,4]
           [--max-tokens 96] [--modes nospec,chain3,chain5,tree]
(`eyas bench` will supersede this script.)
"""
from __future__ import annotations

import argparse
import json
import time

import torch

MODES = {"nospec": {}, "chain3": dict(spec_steps=3), "chain5": dict(spec_steps=5),
         "tree": dict(spec_steps=5, spec_topk=4, spec_draft_tokens=8)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--draft", required=True)
    ap.add_argument("--prompts", default="data/prompts/eval.jsonl")
    ap.add_argument("--num-prompts", type=int, default=6)
    ap.add_argument("--concurrency", default="1,4")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--modes", default="nospec,chain3,chain5,tree")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from eyas import LLM, SamplingParams
    from eyas.prompts import read_prompt_file

    specs = read_prompt_file(args.prompts)[:args.num_prompts]
    reqs = [{"prompt": s.prompt} if s.prompt else {"messages": s.messages} for s in specs]
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    rows, base = [], {}
    for mode in args.modes.split(","):
        kw = MODES[mode]
        llm = LLM(args.model, draft=args.draft if kw else None, kv_cache_memory="1GiB", **kw)
        llm.generate(reqs[:1], SamplingParams(max_tokens=4))  # warm-up
        for c in [int(x) for x in args.concurrency.split(",")]:
            t0, tokens, steps = time.perf_counter(), 0, 0
            for i in range(0, len(reqs), c):
                outs = llm.generate(reqs[i:i + c], params, chat=True)
                tokens += sum(len(o.token_ids) for o in outs)
                steps += sum(o.spec.target_steps if o.spec else len(o.token_ids) for o in outs)
            tps = tokens / (time.perf_counter() - t0)
            base.setdefault(c, tps) if mode == "nospec" else None
            row = {"mode": mode, "concurrency": c, "tok_s": round(tps, 2),
                   "speedup_vs_nospec": round(tps / base[c], 3) if c in base else None,
                   "accept_len": round(tokens / steps, 3)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        del llm
    print("| mode | concurrency | tok/s | speedup | accept_len |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['concurrency']} | {r['tok_s']} | {r['speedup_vs_nospec']} | {r['accept_len']} |")


if __name__ == "__main__":
    main()
