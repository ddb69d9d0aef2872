"""`eyas train-drafter`: argparse wiring for eyas.train.trainer (eyas/cli.py calls
add_train_parser)."""
from __future__ import annotations

import argparse
import json
import sys

from eyas.errors import InvalidRequestError


def _aux_layers(text: str) -> tuple[int, ...]:
    try:
        ids = tuple(int(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 3 comma-separated layer ids, got {text!r}")
    if len(ids) != 3:
        raise argparse.ArgumentTypeError(f"expected 3 comma-separated layer ids, got {text!r}")
    return ids


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train-drafter", help="train an EAGLE-3 drafter for a target model",
        description="Regenerate responses with the target, capture its aux hidden states and "
                    "top-k log-probs, pick the draft vocabulary, train with training-time test "
                    "and save an EAGLE-3 checkpoint. Rerunning with the same --out resumes.")
    p.add_argument("--target", required=True, help="target model: built-in name or HF folder")
    p.add_argument("--prompts", required=True, help="JSONL prompt file ({id, prompt|messages})")
    p.add_argument("--out", required=True, help="output folder (drafter + work/ + summary)")
    g = p.add_argument_group("data")
    g.add_argument("--max-prompts", type=int, help="use only the first N prompts")
    g.add_argument("--max-new-tokens", type=int, default=256, help="response length cap")
    g.add_argument("--samples-per-prompt", type=int, default=1)
    g.add_argument("--temperature", type=float, default=0.0,
                   help="regeneration temperature (0: greedy)")
    g.add_argument("--extra-sample-temperature", type=float, default=0.8,
                   help="temperature of samples >= 1 when --temperature is 0")
    g.add_argument("--val-fraction", type=float, default=0.05,
                   help="fraction of prompts held out for validation")
    g.add_argument("--aux-layers", type=_aux_layers,
                   help="3 target layer ids, e.g. 2,15,27 (default 2, N//2, N-3)")
    g.add_argument("--topk", type=int, default=32, help="target log-probs kept per position")
    g.add_argument("--max-num-seqs", type=int, help="generation batch (default 64 CPU, 256 GPU)")
    g.add_argument("--max-model-len", type=int, help="prompt + response cap for generation")
    g.add_argument("--kv-cache-memory", help="generation KV budget, e.g. 2GiB or 0.5")
    g.add_argument("--feature-batch-tokens", type=int, default=4096,
                   help="tokens per target forward of the separate features pass (--no-capture)")
    g.add_argument("--no-capture", dest="capture", action="store_false",
                   help="capture the features in a second target pass over the regenerated "
                        "text instead of while regenerating")
    g = p.add_argument_group("training")
    g.add_argument("--draft-vocab", type=int, default=8192, help="draft vocabulary size")
    g.add_argument("--ttt-steps", type=int, default=7, help="training-time-test unroll length")
    g.add_argument("--epochs", type=int, default=4)
    g.add_argument("--lr", type=float, default=3e-4)
    g.add_argument("--min-lr-ratio", type=float, default=0.1)
    g.add_argument("--warmup-frac", type=float, default=0.03)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--grad-clip", type=float, default=0.5)
    g.add_argument("--batch-tokens", type=int, default=4096,
                   help="padded tokens per training batch")
    g.add_argument("--patience", type=int, default=2,
                   help="stop after this many epochs without val improvement (0: never)")
    g.add_argument("--step-weight", type=float, default=0.8, help="loss weight base per step")
    g.add_argument("--intermediate-size", type=int,
                   help="drafter MLP width (default: the --init-drafter's, else the target's); "
                        "wider than the --init-drafter's widens it, new units starting at zero")
    g.add_argument("--init-drafter", metavar="D",
                   help="fine-tune: start from this drafter (name or folder)")
    g.add_argument("--init-vocab", choices=["keep", "reselect"], default="keep",
                   help="with --init-drafter: keep its draft vocabulary, or re-choose the "
                        "--draft-vocab most frequent tokens of this run's data (rows of tokens "
                        "in both carried over)")
    g.add_argument("--lm-head-init", choices=["target", "random"], default="target",
                   help="lm_head from the target's head rows of the draft vocab, or random")
    g = p.add_argument_group("run")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda")
    g.add_argument("--dtype", default="auto", help="target dtype: auto | float32 | bfloat16")
    g.add_argument("--save-dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    g.add_argument("--train-dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="drafter matmul precision in training (auto: bf16 on CUDA and on CPUs "
                        "with native bf16)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--num-threads", type=int, help="CPU threads (default: torch's)")
    g.add_argument("--overwrite", action="store_true", help="discard OUT/work and start over")
    g.add_argument("--no-progress", dest="progress", action="store_false")
    g.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_train_drafter)
    return p


def config_from_args(args: argparse.Namespace):
    from eyas.train.trainer import config_from_dict

    return config_from_dict(vars(args))


def cmd_train_drafter(args: argparse.Namespace) -> int:
    from eyas.train.trainer import format_summary, train_drafter

    try:
        cfg = config_from_args(args)
    except TypeError as e:  # pragma: no cover - argparse guards the types
        raise InvalidRequestError("arguments", str(e)) from None
    summary = train_drafter(cfg)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_summary(summary))
    sys.stdout.flush()
    return 0
