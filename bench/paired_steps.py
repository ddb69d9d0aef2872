"""A/B of engines on one closed loop each, stepped in turn: A, B, B, A, A, B, ...

`eyas bench --rounds R` interleaves whole rounds of a level, so a minute of a slow machine lands on
one mode: on this project's shared CPU the same engine read 245 and 348 tok/s in two rounds of one
run. Here every engine runs its own closed loop (c requests in flight, the same fresh prompts,
exactly N tokens each) and the engines take one step each in turn, so a slow spell of the machine
falls on all of them alike. Totals of each engine's own step times are compared; the split by step
kind shows where a difference comes from (steps that prefill, plain decode steps, drafting steps).

Modes: those of `eyas bench` (nospec, chain, tree, adaptive) and `adaptive-plain`, the adaptive
engine with its controller held at plain steps: what carrying a drafter costs by itself. An
adaptive mode may name controller settings after a colon, `adaptive:level_steps=0` or
`adaptive:min_gain=0.05+span=0` (ControllerConfig fields, `+` between them), to A/B them.

    python bench/paired_steps.py --concurrency 64 --requests 128 --modes nospec,adaptive-plain,adaptive
    python bench/paired_steps.py --concurrency 4 --modes nospec,adaptive:level_steps=0,adaptive
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eyas.bench.controller_fields import controller_fields  # noqa: E402
from eyas.bench.modes import engine_config_for  # noqa: E402
from eyas.bench.prompts import build_prompt_ids  # noqa: E402
from eyas.bench.runner import run_closed_loop, sampling_for, traced_step, warm_up  # noqa: E402
from eyas.bench.settings import MODES  # noqa: E402
from eyas.config import EngineConfig  # noqa: E402
from eyas.engine import create_engine  # noqa: E402
from eyas.errors import ConfigError  # noqa: E402
from eyas.spec.controller import SpecController  # noqa: E402

PLAIN_ONLY = "adaptive-plain"


class PlainOnly(SpecController):
    """The adaptive controller's bookkeeping, but every step plain."""

    def choose(self, batch: int) -> int:
        self.draft_seqs = None
        self.choices[0] = self.choices.get(0, 0) + 1
        return 0


def controller_settings(mode: str) -> tuple[str, dict]:
    """('adaptive', {field: value}) for 'adaptive:a=1+b=0.5'; (mode, {}) for a mode without a colon."""
    name, _, spec = mode.partition(":")
    if not spec:
        return name, {}
    if name != "adaptive":
        raise ConfigError(f"mode {mode!r}: only adaptive takes controller settings")
    return name, controller_fields(spec.split("+"), f"mode {mode!r}")


def check_modes(modes: list[str]) -> None:
    for mode in modes:
        name, _ = controller_settings(mode)
        if name not in (*MODES, PLAIN_ONLY):
            raise ConfigError(f"unknown mode {mode!r}: expected one of {', '.join((*MODES, PLAIN_ONLY))}")
    if len(set(modes)) != len(modes):
        raise ConfigError(f"--modes: each mode once, got {','.join(modes)}")


def build(mode: str, base: EngineConfig, concurrency: int):
    name, settings = controller_settings(mode)
    engine = create_engine(engine_config_for("adaptive" if name == PLAIN_ONLY else name, base, concurrency))
    if name == PLAIN_ONLY:
        engine.spec.controller = PlainOnly(engine.spec.controller.config)
    elif settings:
        engine.spec.controller = SpecController(dataclasses.replace(engine.spec.controller.config, **settings))
    return engine


def closed_loop(engine, prompts: list[list[int]], concurrency: int, output_len: int, tag: str, log: list):
    """A generator: one engine step per next(), which yields the step's seconds; appends (kind,
    key) per step to log, kind 'prefill' or 'decode' and key the controller's choice (or None)."""
    pending = collections.deque(enumerate(prompts))
    in_flight = 0
    while pending or in_flight:
        while pending and in_flight < concurrency:
            i, ids = pending.popleft()
            engine.add_request(f"{tag}{i}", None, sampling_for(i, output_len, 0.0), prompt_token_ids=ids)
            in_flight += 1
        outs, seconds, prefill, key = traced_step(engine)
        log.append(("prefill" if prefill else "decode", key))
        in_flight -= sum(1 for o in outs if o.finished)
        yield seconds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--draft", default="smollm2-135m-instruct-eagle3")
    ap.add_argument("--modes", default="nospec,adaptive", help="comma-separated; the first is the reference")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--requests", type=int, default=None, help="per engine (default max(2c, 32))")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--num-threads", type=int, default=2)
    ap.add_argument("--history", default="", help="comma-separated concurrencies each engine first "
                    "runs untimed, --history-requests requests each (as earlier levels of a bench would)")
    ap.add_argument("--history-requests", type=int, default=8)
    ap.add_argument("--out", default=None, help="JSON file for per-step times and kinds")
    args = ap.parse_args(argv)
    modes = args.modes.split(",")
    check_modes(modes)
    c, n = args.concurrency, args.requests or max(2 * args.concurrency, 32)
    base = EngineConfig(model=args.model, num_threads=args.num_threads).replace(draft=args.draft)
    engines = {m: build(m, base, c) for m in modes}
    history = [int(x) for x in args.history.split(",") if x]
    h = args.history_requests
    prompts = build_prompt_ids(engines[modes[0]].tokenizer, 2 * n + h * len(history) + 4, args.input_len)
    for engine in engines.values():  # warm-up, the history, then an untimed pass of the level's shapes
        warm_up(engine, prompts[-4:], 16)
        for j, level in enumerate(history):
            run_closed_loop(engine, prompts[2 * n + j * h:2 * n + (j + 1) * h], level, args.output_len,
                            tag=f"history{j}-", progress=False)
        run_closed_loop(engine, prompts[n:2 * n], c, min(args.output_len, 16), tag="prewarm-", progress=False)
    logs = {m: [] for m in modes}
    times = {m: [] for m in modes}
    loops = {m: closed_loop(engines[m], prompts[:n], c, args.output_len, f"{m}-", logs[m]) for m in modes}
    live, turn = list(modes), 0
    while live:
        for m in (live if turn % 2 == 0 else live[::-1]):
            try:
                times[m].append(next(loops[m]))
            except StopIteration:
                live.remove(m)
        turn += 1
    ref = sum(times[modes[0]])
    print(f"c={c}, {n} requests of {args.input_len} in / {args.output_len} out per engine, stepped in turn")
    for m in modes:
        total = sum(times[m])
        split = collections.defaultdict(list)
        for (kind, key), t in zip(logs[m], times[m]):
            split[kind if kind == "prefill" or key in (None, 0) else f"draft {key}"].append(t)
        parts = ", ".join(f"{k} {len(v)} steps {sum(v):.2f} s (median {1e3 * statistics.median(v):.1f} ms)"
                          for k, v in sorted(split.items()))
        print(f"{m}: {n * args.output_len / total:.1f} tok/s, x{ref / total:.3f} of {modes[0]}; {parts}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "times": times, "steps": logs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
