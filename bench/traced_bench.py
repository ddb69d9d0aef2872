"""`eyas bench` with every engine step timed, and every adaptive choice logged, for tracing where a
level's time goes (which the bench's per-level records do not show).

    python bench/traced_bench.py bench --model smollm2-135m-instruct --draft smollm2-135m-instruct-eagle3 \
        --concurrency 4,16 --modes nospec,adaptive --num-threads 2 --rounds 2 --out DIR
    python bench/traced_bench.py --summary DIR c16

Arguments are those of the `eyas` CLI. Besides the bench's outputs DIR gets trace.json, one row
per step: [mode, level, start, seconds, prefilled, key chosen, running + waiting], plus a
"LEVEL" row per run of a level; and choices.json, one row per adaptive choice: [level, batch,
key, bucket's best, predicted tokens/s per key]. --summary prints per run of a level (modes in
the order they ran) the plain, prefill and drafting steps and their times.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import eyas.bench.runner as bench_runner  # noqa: E402
import eyas.engine as engine_module  # noqa: E402
import eyas.spec.controller as controller_module  # noqa: E402

STEPS: list = []
CHOICES: list = []
LEVEL = {"tag": "startup"}


def _install() -> None:
    create, run_level, choose = engine_module.create_engine, bench_runner.run_level, controller_module.SpecController._choose

    def traced_create(cfg):
        engine = create(cfg)
        inner, mode = engine.step, ("adaptive" if cfg.spec.enabled else "nospec")

        def step():
            start = time.perf_counter()
            queued = len(engine.scheduler.running) + len(engine.scheduler.waiting)
            out, seconds, prefill, key = bench_runner.traced_step(engine, inner)
            STEPS.append((mode, LEVEL["tag"], start, seconds, prefill, key, queued))
            return out

        engine.step = step
        return engine

    def traced_level(engine, mode, prompts, concurrency, *args, **kwargs):
        LEVEL["tag"], start = f"c{concurrency}", time.perf_counter()
        result = run_level(engine, mode, prompts, concurrency, *args, **kwargs)
        STEPS.append((mode, LEVEL["tag"], start, time.perf_counter() - start, "LEVEL", None, None))
        LEVEL["tag"] = "between"
        return result

    def traced_choose(self, batch):
        key = choose(self, batch)
        rates = {str(k): self.throughput(batch, k) for k in self.candidates}
        CHOICES.append((LEVEL["tag"], batch, key, self.best.get(controller_module.bucket_of(batch)), rates))
        return key

    engine_module.create_engine = traced_create
    bench_runner.run_level = traced_level
    controller_module.SpecController._choose = traced_choose


def summary(out: Path, level: str) -> None:
    steps = sorted((r for r in json.loads((out / "trace.json").read_text()) if r[1] == level and r[4] != "LEVEL"),
                   key=lambda r: r[2])
    runs: list = []
    for r in steps:  # consecutive steps of one mode: one run (rounds interleave the modes)
        if not runs or runs[-1][0] != r[0]:
            runs.append((r[0], []))
        runs[-1][1].append(r)
    for mode, rows in runs:
        plain = [r[3] for r in rows if not r[4] and not r[5]]
        prefill = [r[3] for r in rows if r[4]]
        draft = [r[3] for r in rows if not r[4] and r[5]]
        print(f"{mode:9s} {len(rows)} steps {sum(r[3] for r in rows):.2f} s: plain {len(plain)} "
              f"(median {1e3 * statistics.median(plain or [0]):.1f} ms), prefill {len(prefill)} "
              f"({sum(prefill):.2f} s), drafting {len(draft)} ({sum(draft):.2f} s)")


def main(argv: list[str]) -> int:
    if argv[:1] == ["--summary"]:
        summary(Path(argv[1]), argv[2])
        return 0
    from eyas.cli import main as cli_main

    if "--out" not in argv:
        raise SystemExit("traced_bench: give --out DIR")
    out = Path(argv[argv.index("--out") + 1])
    _install()
    try:
        return cli_main(argv)
    finally:
        out.mkdir(parents=True, exist_ok=True)
        (out / "trace.json").write_text(json.dumps(STEPS))
        (out / "choices.json").write_text(json.dumps(CHOICES))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
