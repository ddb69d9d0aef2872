"""run_bench: every mode over the concurrency sweep, outputs written as it goes. With one round
(the default) one engine per mode runs the whole sweep, one mode after the other; with --rounds R
>= 2 all the modes' engines stay alive and each level runs R rounds, the modes interleaved.

Prompt plan: level k (in --concurrency order) uses the next rounds x prompts_at(c) prompts of the
fixed set (round r the r-th slice), so no prompt repeats inside an engine (prefix-cache hits are only the shared template prefix);
the warm-up requests use prompts after all of those, and the pre-warm pass (every engine, every
level untimed at up to 16 output tokens: the shapes of the timed levels, and the adaptive
controller's first exploration of each batch size, as a long-running server would have done
before) the ones after those. Every mode (and the hf peer) gets exactly the same timed ids in
the same order.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

from eyas.bench.metrics import level_record
from eyas.bench.modes import engine_config_for, spec_summary
from eyas.bench.report import build_meta, default_out_dir, fill_speedups, markdown_table, write_meta, write_results
from eyas.bench.settings import BenchConfig, check_fits
from eyas.kv.cache import free_memory

log = logging.getLogger("eyas")


def _plan(bench: BenchConfig, prompt_ids: list[list[int]]
          ) -> tuple[dict[int, list[list[int]]], list[list[int]], dict[int, list[list[int]]]]:
    """(prompts per concurrency level, warm-up prompts, pre-warm prompts per level)."""
    levels, prewarm, at = {}, {}, 0
    for c in bench.concurrency:
        levels[c] = prompt_ids[at:at + bench.rounds * bench.prompts_at(c)]
        at += bench.rounds * bench.prompts_at(c)
    warmup = prompt_ids[at:at + bench.warmup]
    at += bench.warmup
    if bench.prewarm:
        for c in bench.concurrency:
            prewarm[c] = prompt_ids[at:at + bench.prompts_at(c)]
            at += bench.prompts_at(c)
    return levels, warmup, prewarm


def _start_engine(mode, config, bench, warmup, prewarm=None):
    """(engine, its config) for a mode: built, checked against the lengths, warmed up, and given
    the untimed pre-warm pass when `prewarm` holds its prompts."""
    from eyas.bench.runner import run_closed_loop, warm_up
    from eyas.engine import create_engine

    cfg = engine_config_for(mode, config, max(bench.concurrency))
    engine = create_engine(cfg)
    check_fits(engine.max_model_len, bench.input_len, bench.output_len)
    warm_up(engine, warmup, bench.output_len)
    for c, prompts in (prewarm or {}).items():  # the same shapes as the timed levels, untimed
        run_closed_loop(engine, prompts, c, min(bench.output_len, 16), tag=f"prewarm{c}-", progress=False)
    return engine, cfg


def _run_engine_mode(mode, config, bench, levels, warmup, records, out, progress, prewarm=None) -> None:
    from eyas.bench.runner import run_level

    engine, cfg = _start_engine(mode, config, bench, warmup, prewarm)
    try:
        for c, prompts in levels.items():
            level = run_level(engine, mode, prompts, c, bench.output_len, bench.temperature,
                              progress=progress, extra=spec_summary(cfg))
            _add(records, level_record(level, bench.input_len, bench.output_len), out)
    finally:
        del engine  # the next mode's engine needs the memory
        free_memory()


def _run_interleaved(config, bench, levels, warmup, records, out, progress, prewarm) -> None:
    """Every mode's engine alive at once; each level runs bench.rounds rounds, the modes in order
    in even rounds and reversed in odd ones, each round on its own slice of the level's prompts."""
    from eyas.bench.metrics import merge_rounds
    from eyas.bench.runner import run_level

    engines = {}
    try:
        for mode in bench.modes:  # each engine's own pre-warm: its adaptive controller learns there
            engines[mode] = _start_engine(mode, config, bench, warmup, prewarm)
        for c, prompts in levels.items():
            n = bench.prompts_at(c)
            done: dict[str, list] = {mode: [] for mode in bench.modes}
            for r in range(bench.rounds):
                for mode in (bench.modes if r % 2 == 0 else bench.modes[::-1]):
                    engine, cfg = engines[mode]
                    done[mode].append(run_level(engine, mode, prompts[r * n:(r + 1) * n], c, bench.output_len,
                                                bench.temperature, progress=progress,
                                                extra=spec_summary(cfg)))
                    log.info("bench %s c=%d round %d/%d: %.1f tok/s", mode, c, r + 1, bench.rounds,
                             sum(t.output_tokens for t in done[mode][-1].timings) / done[mode][-1].wall_s)
            for mode in bench.modes:  # nospec first, so the others' speedups fill in as they land
                _add(records, level_record(merge_rounds(done[mode]), bench.input_len, bench.output_len), out)
    finally:
        engines.clear()  # the hf peer needs the memory
        free_memory()


def _run_hf(config, bench, levels, warmup, records, out, progress) -> None:
    from eyas.bench.hf_peer import load_hf_model, run_hf_level, warm_up_hf
    from eyas.engine import resolve_device, resolve_dtype
    from eyas.hub import eos_token_ids, resolve_model

    device = resolve_device(config.device)
    model = load_hf_model(config.model, device, resolve_dtype(config.dtype, device))
    eos = (eos_token_ids(resolve_model(config.model)) or (0,))[0]
    try:
        warm_up_hf(model, warmup, bench.output_len, eos)
        for c, prompts in levels.items():
            level = run_hf_level(model, prompts, c, bench.output_len, bench.temperature, eos, progress)
            _add(records, level_record(level, bench.input_len, bench.output_len), out)
    finally:
        del model
        free_memory()


def _add(records: list[dict], record: dict, out: Path) -> None:
    records.append(record)
    fill_speedups(records)
    write_results(out, records)
    log.info("bench %s c=%d: %.1f tok/s, accept_len %s", record["mode"], record["concurrency"],
             record["output_tok_s"] or 0.0, record["accept_len"])


def run_bench(config, bench: Optional[BenchConfig] = None, *, out_dir: Optional[str | Path] = None,
              command: Optional[str] = None, progress: Optional[bool] = None, **overrides) -> list[dict]:
    """Run the bench for an EngineConfig and return the records (also written under out_dir).

    bench: a BenchConfig (keyword `overrides` replace its fields, e.g. concurrency=(1, 4)).
    out_dir: default bench/results/<timestamp>. progress: tqdm bars (None: only on a terminal).
    Raises InvalidRequestError for bad settings before any engine is built where it can.
    """
    import dataclasses

    from eyas.bench.plot import write_plot
    from eyas.engine import resolve_device
    from eyas.hub import load_tokenizer, resolve_model

    bench = dataclasses.replace(bench or BenchConfig(), **overrides)
    on_gpu = resolve_device(config.device).type == "cuda"
    if bench.modes is None and not config.spec.enabled:
        log.warning("bench: no --draft given, so only nospec runs")
    bench = bench.resolved(has_draft=config.spec.enabled, on_gpu=on_gpu)
    if config.max_model_len is not None:
        check_fits(config.max_model_len, bench.input_len, bench.output_len)
    out = Path(out_dir) if out_dir is not None else default_out_dir()
    out.mkdir(parents=True, exist_ok=True)
    if config.num_threads:  # the engines would set it anyway; meta.json and the hf peer see it too
        import torch

        torch.set_num_threads(config.num_threads)

    from eyas.bench.prompts import build_prompt_ids

    tokenizer = load_tokenizer(resolve_model(config.model))
    total = (bench.rounds + bench.prewarm) * sum(bench.prompts_at(c) for c in bench.concurrency) + bench.warmup
    levels, warmup, prewarm = _plan(bench, build_prompt_ids(tokenizer, total, bench.input_len))
    started = time.time()
    meta = build_meta(config, bench, command, out_dir=str(out))
    write_meta(out, meta)

    records: list[dict] = []
    if bench.rounds > 1:
        _run_interleaved(config, bench, levels, warmup, records, out, progress, prewarm)
    else:
        for mode in bench.modes:
            _run_engine_mode(mode, config, bench, levels, warmup, records, out, progress,
                             prewarm=prewarm)
    if "hf" in bench.peers:
        _run_hf(config, bench, levels, warmup, records, out, progress)
    write_plot(out / "results.png", records, title=f"{Path(str(config.model)).name}, "
                                                    f"{bench.input_len} in / {bench.output_len} out")
    meta["total_s"] = round(time.time() - started, 2)
    write_meta(out, meta)
    log.info("bench results in %s\n%s", out, markdown_table(records))
    return records
