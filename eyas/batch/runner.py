"""run_batch: scan the input, resume from the output, start the replicas, dispatch, summarize."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Callable, Optional

from eyas.batch.dispatcher import Dispatcher
from eyas.batch.inputs import read_lines, scan_input
from eyas.batch.pool import LocalPool, Pool
from eyas.batch.progress import BatchStats, Progress, summary_line
from eyas.batch.results import ResultWriter
from eyas.batch.settings import BatchConfig
from eyas.config import EngineConfig
from eyas.core import SamplingParams

log = logging.getLogger("eyas.batch")


def make_pool(cfg: BatchConfig, engine: EngineConfig) -> Pool:
    if cfg.use_ray():
        from eyas.batch.ray_pool import RayPool

        return RayPool(cfg, engine)
    return LocalPool(engine, cfg.replicas)


@contextlib.contextmanager
def sigterm_as_interrupt():
    """`ray job stop` sends SIGTERM: end like Ctrl-C, so the summary is still written."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def write_summary(cfg: BatchConfig, summary: dict) -> None:
    path = cfg.summary_path
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, path)


def run_batch(cfg: BatchConfig, engine: EngineConfig, params: SamplingParams,
              pool_factory: Optional[Callable[[], Pool]] = None, print_summary: bool = True) -> dict:
    """Serve every line of cfg.input not yet in cfg.output; return the summary (also written to
    `<output>.summary.json`). Raises before any work for a missing input or duplicate ids."""
    scan = scan_input(cfg.input)  # a missing file or duplicate ids: refused before touching the output
    writer = ResultWriter(cfg.output, lock=True)
    total, skipped = scan.lines, scan.count_done(writer.done)
    del scan  # only the done set stays in memory
    stats = BatchStats(total=total, skipped=skipped)
    if writer.truncated_bytes:
        log.warning("batch: dropped a torn last line (%d bytes) from %s; it will be served again",
                    writer.truncated_bytes, cfg.output)
    if skipped:
        print(f"eyas batch: resuming, {skipped} of {total} lines already in {cfg.output}",
              file=sys.stderr, flush=True)
    executor = "ray" if cfg.use_ray() else "local"
    extra: dict = {"executor": executor, "input": str(cfg.input), "output": str(cfg.output), "replicas": []}
    pool: Optional[Pool] = None
    progress: Optional[Progress] = None
    complete = False
    try:
        with sigterm_as_interrupt():
            if skipped < total:
                t0 = time.perf_counter()
                pool = pool_factory() if pool_factory is not None else make_pool(cfg, engine)
                extra["startup_s"] = round(time.perf_counter() - t0, 3)
                cap = cfg.max_inflight or 2 * engine.max_num_seqs
                progress = Progress(stats, cfg.progress, cfg.log_interval)
                dispatcher = Dispatcher(pool, writer, stats, progress, cap, cfg.max_attempts)
                dispatcher.run(read_lines(cfg.input, params, cfg.chat))
                extra["max_inflight"] = cap
            writer.open()  # an all-done or empty run still leaves a valid (possibly truncated) file
            complete = True
    finally:
        if progress is not None:
            progress.close()
        writer.close()
        if pool is not None:
            extra["replicas"] = [r.to_dict() for r in pool.replicas]
            pool.close()
        summary = stats.summary(complete=complete, **extra)
        write_summary(cfg, summary)
        if print_summary:
            print(summary_line(summary), file=sys.stdout if complete else sys.stderr, flush=True)
    return summary
