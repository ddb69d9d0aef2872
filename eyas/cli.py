"""The `eyas` command."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from eyas.errors import EyasError

log = logging.getLogger("eyas")


def add_engine_args(p: argparse.ArgumentParser, with_executor: bool = True) -> None:
    """Engine flags; with_executor=False leaves out --executor and --ray-address (batch has its own)."""
    g = p.add_argument_group("engine")
    g.add_argument("--config", help="YAML file with engine keys (flags override it)")
    g.add_argument("--model", help="built-in model name or HF-style folder (default smollm2-135m-instruct)")
    g.add_argument("--draft", help="EAGLE-3 drafter: built-in name or folder")
    g.add_argument("--device", help="auto | cpu | cuda")
    g.add_argument("--dtype", help="auto | float32 | bfloat16 | float16")
    g.add_argument("--max-model-len", type=int)
    g.add_argument("--block-size", type=int)
    g.add_argument("--kv-cache-memory", help="bytes (e.g. 2GiB) or a fraction of free memory (e.g. 0.5)")
    g.add_argument("--max-num-seqs", type=int)
    g.add_argument("--max-num-batched-tokens", type=int)
    g.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false", default=None)
    g.add_argument("--eager", action="store_true", default=None, help="do not torch.compile (also EYAS_EAGER=1)")
    g.add_argument("--num-threads", type=int)
    g.add_argument("--mkl-max-rows", type=int, choices=range(4), metavar="{0..3}",
                   help="CPU fp32: products of at most this many rows take MKL's plain weight "
                        "instead of the packed copy (default: measured at start-up)")
    g.add_argument("--spec-steps", type=int, help="draft chain length K (tree depth)")
    g.add_argument("--spec-topk", type=int, help="branching per draft step (>1 drafts a tree; "
                   "with the adaptive policy the controller then picks a tree or a chain per step)")
    g.add_argument("--spec-draft-tokens", type=int, help="tree size budget")
    g.add_argument("--spec-policy", choices=["fixed", "adaptive"])
    g.add_argument("--spec-dtype", help="drafter dtype: auto (bf16 beside an fp32 target on a CPU "
                   "with native bf16, else the target's) | float32 | bfloat16 | float16")
    g.add_argument("--tp", type=int, default=1, help="tensor-parallel target shards (implies the ray executor)")
    g.add_argument("--worker-cpus", type=float, help="ray executor: CPUs per worker actor (default 1)")
    g.add_argument("--worker-gpus", type=float, help="ray executor: GPUs per target shard")
    g.add_argument("--drafter-gpus", type=float, help="ray executor: GPUs for the drafter (< 1 shares one)")
    if with_executor:
        g.add_argument("--executor", dest="engine_executor", choices=["local", "ray"],
                       help="local: this process (default); ray: target shards + drafter as Ray actors")
        g.add_argument("--ray-address", help="ray executor: cluster to join (default $RAY_ADDRESS, else start one)")


def engine_config_from_args(args: argparse.Namespace):
    from eyas.config import EngineConfig

    cfg = EngineConfig.from_yaml(args.config) if args.config else EngineConfig()
    keys = ["model", "draft", "device", "dtype", "max_model_len", "block_size", "kv_cache_memory",
            "max_num_seqs", "max_num_batched_tokens", "enable_prefix_caching", "eager", "num_threads",
            "mkl_max_rows", "spec_steps", "spec_topk", "spec_draft_tokens", "spec_policy", "spec_dtype", "worker_cpus",
            "worker_gpus", "drafter_gpus"]
    changes = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    if os.environ.get("EYAS_EAGER") == "1":
        changes["eager"] = True
    if getattr(args, "tp", 1) != 1:
        changes["tp"] = args.tp
    if getattr(args, "engine_executor", None) is not None:
        changes["executor"] = args.engine_executor
    if getattr(args, "ray_address", None) is not None and hasattr(args, "engine_executor"):
        changes["ray_address"] = args.ray_address
    return cfg.replace(**changes)


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")


def sampling_from_args(args):
    from eyas.core import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, seed=args.seed, stop=tuple(args.stop),
                          ignore_eos=args.ignore_eos)


def cmd_pull(args) -> int:
    from eyas.hub import pull

    path = pull(args.name, force=args.force, progress=lambda m: print(m, file=sys.stderr))
    print(path)
    return 0


def cmd_generate(args) -> int:
    from eyas.llm import LLM
    from eyas.prompts import PromptSpec, read_prompt_file

    if (args.prompt is None) == (args.prompts is None):
        raise EyasError("give exactly one of --prompt TEXT or --prompts FILE.jsonl")
    base = sampling_from_args(args)
    specs = read_prompt_file(args.prompts) if args.prompts else [PromptSpec("0", prompt=args.prompt)]
    cfg = engine_config_from_args(args)
    llm = LLM(config=cfg)
    requests = [s.request() for s in specs]
    params = [s.params(base) for s in specs]
    t0 = time.perf_counter()
    outputs = llm.generate(requests, params, chat=args.chat, use_tqdm=sys.stderr.isatty())
    elapsed = time.perf_counter() - t0
    for spec, out in zip(specs, outputs):
        out.id = spec.id
        if args.json:
            print(json.dumps(out.to_dict(), ensure_ascii=False), flush=True)
        else:
            print(f"--- [{spec.id}] ({len(out.token_ids)} tokens, {out.finish_reason})")
            print(out.text, flush=True)
    tokens = sum(len(o.token_ids) for o in outputs)
    summary = f"{len(outputs)} requests, {tokens} tokens in {elapsed:.2f}s: {tokens / elapsed:.1f} tok/s"
    spec_outs = [o.spec for o in outputs if o.spec is not None]
    if spec_outs:
        steps = sum(s.target_steps for s in spec_outs)
        summary += f", accept_len {tokens / max(steps, 1):.2f}"
    print(summary, file=sys.stderr if args.json else sys.stdout)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eyas", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pull", help="convert a built-in model into an HF-style folder under $EYAS_HOME")
    p.add_argument("name")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("generate", help="generate text for a prompt or a JSONL prompt file")
    p.add_argument("--prompt")
    p.add_argument("--prompts", help="JSONL file: {id, prompt | messages, overrides...} per line")
    p.add_argument("--chat", action="store_true", help="apply the chat template to plain prompts")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt")
    add_engine_args(p)
    add_sampling_args(p)
    p.set_defaults(func=cmd_generate)

    from eyas.train.cli_train import add_train_parser
    from eyas.train.evaluate import add_eval_parser

    add_train_parser(sub)
    from eyas.bench.cli_bench import add_bench_parser
    add_bench_parser(sub)
    add_eval_parser(sub)
    from eyas.serve.cli_serve import add_serve_parser
    add_serve_parser(sub)
    from eyas.quant.cli_quant import add_quantize_parser
    add_quantize_parser(sub)
    from eyas.batch.cli_batch import add_batch_parser
    add_batch_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return args.func(args) or 0
    except EyasError as e:
        print(f"eyas: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
