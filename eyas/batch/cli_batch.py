"""`eyas batch`: the argparse wiring (also the entrypoint of `ray job submit -- eyas batch ...`)."""
from __future__ import annotations

import argparse
import sys

from eyas.errors import ConfigError

# flag dest -> BatchConfig field; flags left unset fall back to the YAML `batch:` section
_BATCH_FLAGS = ("input", "output", "replicas", "executor", "ray_address", "replica_cpus", "replica_gpus",
                "max_inflight", "log_interval", "placement_timeout")


def add_batch_parser(sub) -> None:
    from eyas.cli import add_engine_args, add_sampling_args

    p = sub.add_parser("batch", help="generate for every line of a JSONL file, resumably, with N replicas",
                       description="Serve every line of --input into --output (JSONL, appended as lines "
                                   "finish). Rerunning the same command skips the ids already written.")
    g = p.add_argument_group("batch")
    g.add_argument("--input", help="JSONL: {id, prompt | messages, overrides...} per line")
    g.add_argument("--output", help="JSONL results (appended; its ids are skipped on a rerun)")
    g.add_argument("--chat", action="store_true", default=None, help="apply the chat template to plain prompts")
    g.add_argument("--replicas", type=int, help="engine replicas (data parallel; > 1 uses Ray)")
    g.add_argument("--executor", choices=["auto", "local", "ray"],
                   help="auto (default): Ray when --replicas > 1, --ray-address or $RAY_ADDRESS, else in-process")
    g.add_argument("--ray-address", help="Ray cluster to join (default $RAY_ADDRESS, as set by ray job submit)")
    g.add_argument("--replica-cpus", type=float, help="CPUs reserved per replica (default 1)")
    g.add_argument("--replica-gpus", type=float,
                   help="GPUs reserved per replica (default: tp when the cluster has GPUs, else 0)")
    g.add_argument("--max-inflight", type=int, help="lines in flight per replica (default 2 x max-num-seqs)")
    g.add_argument("--log-interval", type=float, help="seconds between progress lines without a terminal (10)")
    g.add_argument("--placement-timeout", type=float, help="seconds to wait for cluster resources (300)")
    add_engine_args(p, with_executor=False)
    add_sampling_args(p)
    p.set_defaults(func=cmd_batch)


def batch_config_from_args(args: argparse.Namespace):
    from eyas.batch.settings import BatchConfig

    data: dict = {}
    if args.config:
        from eyas.config import read_yaml_mapping

        raw = read_yaml_mapping(args.config)
        if not isinstance(raw.get("batch", {}), dict):
            raise ConfigError(f"{args.config}: expected a mapping with an optional `batch:` section")
        data = {k.replace("-", "_"): v for k, v in (raw.get("batch") or {}).items()}
    data.update({k: getattr(args, k) for k in _BATCH_FLAGS if getattr(args, k, None) is not None})
    if args.chat is not None:
        data["chat"] = args.chat
    data["tp"] = args.tp
    data.setdefault("input", None)
    data.setdefault("output", None)
    return BatchConfig.from_dict(data)


def cmd_batch(args: argparse.Namespace) -> int:
    from eyas.batch.runner import run_batch
    from eyas.cli import engine_config_from_args, sampling_from_args

    cfg = batch_config_from_args(args)
    engine = engine_config_from_args(args)
    try:
        run_batch(cfg, engine, sampling_from_args(args))
    except KeyboardInterrupt:
        print("eyas batch: stopped; finished lines are in the output, rerun the same command to resume",
              file=sys.stderr, flush=True)
        return 130
    return 0
