"""`eyas eval-drafter`: measured mean accept length of a drafter on a prompt file.

accept length = completion tokens / target forward steps (the bonus token counts), summed over
all prompts, for chain K = 1..6 and a tree (depth 5, top-4, 8 draft tokens), greedy and at
temperature 0.7. Every prompt gets the chat template.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Optional, Sequence

from eyas.errors import InvalidRequestError

DEFAULT_TREES = ((5, 4, 8),)  # (depth, topk, draft tokens): DESIGN.md's bench default


def evaluate_drafter(target: str, draft: str, prompts: str, max_tokens: int = 128,
                     chains: Sequence[int] = (1, 2, 3, 4, 5, 6),
                     temperatures: Sequence[float] = (0.0, 0.7), seed: int = 0,
                     max_prompts: Optional[int] = None, device: str = "auto",
                     dtype: str = "auto", progress: bool = True,
                     trees: Sequence[tuple[int, int, int]] = DEFAULT_TREES, **engine_kwargs) -> dict:
    """Run the engine with the drafter at each chain length and temperature; returns
    {"results": [{"k", "temperature", "accept_len", "tokens", "target_steps", "tok_s"}], ...}."""
    from eyas.core import SamplingParams
    from eyas.kv.cache import free_memory
    from eyas.llm import LLM
    from eyas.train.data import load_prompts

    specs = load_prompts(prompts, max_prompts)
    if max_tokens < 1:
        raise InvalidRequestError("max_tokens", f"must be >= 1, got {max_tokens}")
    requests = [s.request() for s in specs]
    results, tree_results = [], []
    settings = [(k, 1, k, results) for k in chains] + [(*t, tree_results) for t in trees]
    for k, topk, draft_tokens, rows in settings:
        llm = LLM(model=target, draft=draft, spec_steps=k, spec_topk=topk, spec_policy="fixed",
                  spec_draft_tokens=draft_tokens, device=device, dtype=dtype, **engine_kwargs)
        for temp in temperatures:
            params = [SamplingParams(max_tokens=max_tokens, temperature=temp,
                                     seed=seed + i if temp > 0 else None)
                      for i in range(len(specs))]
            start = time.perf_counter()
            outs = llm.generate(requests, params, chat=True, use_tqdm=progress)
            elapsed = time.perf_counter() - start
            tokens = sum(len(o.token_ids) for o in outs)
            steps = sum(o.spec.target_steps for o in outs if o.spec is not None)
            row = {"k": k, "temperature": temp, "accept_len": round(tokens / max(steps, 1), 3),
                   "tokens": tokens, "target_steps": steps,
                   "tok_s": round(tokens / max(elapsed, 1e-9), 1)}
            if topk > 1:
                row.update(topk=topk, draft_tokens=draft_tokens)
            rows.append(row)
            if progress:
                print(f"K={k} topk={topk} T={temp}: accept length {row['accept_len']:.3f} "
                      f"({tokens} tokens / {steps} target steps, {row['tok_s']} tok/s)",
                      file=sys.stderr, flush=True)
        del llm
        free_memory()  # the next setting's engine sizes its KV cache from free memory
    return {"target": target, "draft": draft, "prompts": len(specs), "max_tokens": max_tokens,
            "results": results, "tree_results": tree_results}


def format_table(report: dict) -> str:
    temps = sorted({r["temperature"] for r in report["results"]})
    ks = sorted({r["k"] for r in report["results"]})
    by = {(r["k"], r["temperature"]): r for r in report["results"]}
    head = "| K | " + " | ".join(f"T={t:g}" for t in temps) + " |"
    lines = [f"mean accept length (completion tokens / target steps) on {report['prompts']} "
             f"prompts, max {report['max_tokens']} tokens; drafter {report['draft']}",
             head, "|---|" + "---|" * len(temps)]
    for k in ks:
        cells = [f"{by[(k, t)]['accept_len']:.3f}" if (k, t) in by else "-" for t in temps]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    for r in report.get("tree_results", []):
        lines.append(f"tree depth {r['k']}, topk {r['topk']}, {r['draft_tokens']} draft tokens, "
                     f"T={r['temperature']:g}: accept length {r['accept_len']:.3f}")
    return "\n".join(lines)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval-drafter", help="measure a drafter's mean accept length",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--target", required=True, help="target model: built-in name or folder")
    p.add_argument("--draft", required=True, help="drafter: built-in name or folder")
    p.add_argument("--prompts", required=True, help="JSONL prompt file")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--max-prompts", type=int)
    p.add_argument("--chains", type=_ints, default=[1, 2, 3, 4, 5, 6],
                   help="chain lengths K, comma-separated (default 1..6)")
    p.add_argument("--temperatures", type=_floats, default=[0.0, 0.7],
                   help="comma-separated (default 0,0.7)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--spec-dtype", help="the drafter's dtype (default auto: see eyas serve --help)")
    p.add_argument("--max-num-seqs", type=int, help="engine batch size")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_eval_drafter)
    return p


def cmd_eval_drafter(args: argparse.Namespace) -> int:
    extra = {"max_num_seqs": args.max_num_seqs} if args.max_num_seqs else {}
    if args.spec_dtype:
        extra["spec_dtype"] = args.spec_dtype
    report = evaluate_drafter(args.target, args.draft, args.prompts, args.max_tokens,
                              args.chains, args.temperatures, args.seed, args.max_prompts,
                              args.device, args.dtype, progress=sys.stderr.isatty(), **extra)
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0
