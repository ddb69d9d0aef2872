"""`eyas quantize-draft`: weight-only FP8 copy of an EAGLE-3 drafter."""
from __future__ import annotations

import argparse

from eyas.errors import ConfigError
from eyas.quant.config import DEFAULT_SKIP, QUANTIZABLE


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def add_quantize_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "quantize-draft", help="write an FP8 (weight-only, per-channel) copy of an EAGLE-3 drafter",
        description="Quantize the drafter's linear layers to FP8 e4m3 with one float32 scale per "
                    "output channel; fc and lm_head stay in original precision by default. "
                    "The output folder loads with --draft wherever a drafter is accepted.")
    p.add_argument("--draft", required=True, help="drafter: built-in name or folder")
    p.add_argument("--out", required=True, help="output folder (must be new or empty)")
    p.add_argument("--fp8", action="store_true", help="FP8 weights (the only scheme; required)")
    p.add_argument("--dtype", choices=["e4m3fn", "e4m3fnuz"], default="e4m3fn",
                   help="e4m3fn (NVIDIA sm89+, MI350, CPU) or e4m3fnuz (MI300); default e4m3fn")
    p.add_argument("--skip", type=_names, default=list(DEFAULT_SKIP),
                   help=f"comma-separated layers kept unquantized, from {','.join(QUANTIZABLE)} "
                        f"(default {','.join(DEFAULT_SKIP)}; '' quantizes all)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.set_defaults(func=cmd_quantize_draft)
    return p


def cmd_quantize_draft(args: argparse.Namespace) -> int:
    from eyas.quant.checkpoint import quantize_drafter

    if not args.fp8:
        raise ConfigError("choose a quantization scheme: --fp8 (the only one supported)")
    report = quantize_drafter(args.draft, args.out, dtype=args.dtype, skip=args.skip,
                              overwrite=args.overwrite)
    print(report.summary())
    return 0
