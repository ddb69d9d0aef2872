"""`eyas bench`: argparse wiring for eyas.bench.run_bench (eyas/cli.py calls add_bench_parser)."""
from __future__ import annotations

import argparse
import sys

from eyas.bench.settings import DEFAULT_CONCURRENCY, MODES, PEERS

_DESCRIPTION = f"""\
Closed-loop throughput of plain decoding (nospec) against EAGLE-3 speculation on the same engine.
At each concurrency c, c clients keep one request in flight each (the next is submitted as soon as
one finishes) until --num-prompts requests have finished (default max(2c, 32) per level). Prompts
come from the fixed set in data/prompts, cut or repeated to exactly --input-len tokens; every
request generates exactly --output-len tokens (EOS ignored). Modes: {', '.join(MODES)}; without
--draft only nospec runs, and naming another mode is an error. Writes results.json, results.md,
results.png and meta.json to --out (default bench/results/<timestamp>)."""


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    from eyas.cli import add_engine_args

    p = subparsers.add_parser("bench", help="throughput sweep: nospec vs EAGLE-3 modes over concurrency",
                              description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("bench")
    g.add_argument("--concurrency", default=",".join(map(str, DEFAULT_CONCURRENCY)),
                   help="comma-separated in-flight request counts (default %(default)s)")
    g.add_argument("--input-len", type=int, help="prompt tokens per request (default 128 on CPU, 1024 on GPU)")
    g.add_argument("--output-len", type=int, help="output tokens per request (default 128 on CPU, 1024 on GPU)")
    g.add_argument("--num-prompts", type=int, help="requests per concurrency level (default max(2c, 32))")
    g.add_argument("--modes", help=f"comma-separated subset of {','.join(MODES)} "
                                   "(default: all with --draft, nospec without)")
    g.add_argument("--peer", action="append", default=[], choices=PEERS,
                   help="also run a reference implementation on the same prompts (repeatable)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    g.add_argument("--warmup", type=int, default=2, help="untimed requests per engine (default 2)")
    g.add_argument("--no-prewarm", dest="prewarm", action="store_false",
                   help="skip the untimed pass over every level that each engine gets before the timed ones")
    g.add_argument("--rounds", type=int, default=1,
                   help="measure each level this many times per mode, the modes interleaved on "
                        "engines kept alive together (default 1: one mode after the other)")
    g.add_argument("--out", help="output folder (default bench/results/<timestamp>)")
    add_engine_args(p)
    p.set_defaults(func=cmd_bench)
    return p


def cmd_bench(args: argparse.Namespace) -> int:
    from eyas.bench.report import default_out_dir, markdown_table
    from eyas.bench.settings import BenchConfig, parse_int_list, parse_names
    from eyas.bench.suite import run_bench
    from eyas.cli import engine_config_from_args

    bench = BenchConfig(
        modes=parse_names(args.modes) if args.modes is not None else None,
        concurrency=parse_int_list("concurrency", args.concurrency),
        input_len=args.input_len, output_len=args.output_len, num_prompts=args.num_prompts,
        temperature=args.temperature, peers=tuple(dict.fromkeys(args.peer)), warmup=args.warmup,
        prewarm=args.prewarm, rounds=args.rounds)
    config = engine_config_from_args(args)
    out = args.out or default_out_dir()
    records = run_bench(config, bench, out_dir=out)
    print(markdown_table(records), end="")
    print(f"eyas bench: results in {out}", file=sys.stderr)
    return 0
