"""Counters for a batch run, a progress bar (terminal) or periodic log lines (logs), and the summary."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Optional, TextIO


@dataclass
class BatchStats:
    total: int = 0  # non-blank input lines
    skipped: int = 0  # already in the output from an earlier run
    ok: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    spec_tokens: int = 0  # completion tokens of lines served with speculation
    spec_steps: int = 0  # their target forward steps
    redispatched: int = 0  # lines re-sent after their replica died
    start: float = field(default_factory=time.perf_counter)

    def add(self, rec: dict) -> int:
        """Count one result record; returns its completion tokens."""
        if rec.get("error") is not None:
            self.failed += 1
            return 0
        self.ok += 1
        usage = rec.get("usage") or {}
        tokens = int(usage.get("completion_tokens", 0))
        self.prompt_tokens += int(usage.get("prompt_tokens", 0))
        self.completion_tokens += tokens
        spec = rec.get("spec")
        if spec:
            self.spec_tokens += tokens
            self.spec_steps += int(spec.get("target_steps", 0))
        return tokens

    @property
    def done(self) -> int:
        return self.ok + self.failed

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @property
    def accept_len(self) -> Optional[float]:
        return self.spec_tokens / self.spec_steps if self.spec_steps else None

    def summary(self, **extra) -> dict:
        wall = self.elapsed
        d = {"lines_total": self.total, "lines_ok": self.ok, "lines_failed": self.failed,
             "lines_skipped": self.skipped, "lines_remaining": max(self.total - self.skipped - self.done, 0),
             "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
             "wall_s": round(wall, 3), "lines_per_s": round(self.done / wall, 3) if wall else 0.0,
             "tok_s": round(self.completion_tokens / wall, 2) if wall else 0.0,
             "accept_len": round(self.accept_len, 4) if self.accept_len is not None else None,
             "redispatched": self.redispatched}
        return d | extra


def summary_line(s: dict) -> str:
    line = (f"eyas batch: {s['lines_ok']} ok, {s['lines_failed']} failed, {s['lines_skipped']} already done "
            f"of {s['lines_total']} lines; {s['completion_tokens']} tokens in {s['wall_s']:.1f}s: "
            f"{s['tok_s']:.1f} tok/s")
    if s.get("accept_len") is not None:
        line += f", accept_len {s['accept_len']:.2f}"
    if s.get("replicas"):
        line += f"; {len(s['replicas'])} replica(s) on {len({r['node_id'] for r in s['replicas']})} node(s)"
    if s.get("complete") is False:
        line += " (stopped early; rerun the same command to resume)"
    return line


class Progress:
    """A tqdm bar with lines/s and tok/s on a terminal; otherwise a log line every `interval` s."""

    def __init__(self, stats: BatchStats, bar: Optional[bool] = None, interval: float = 10.0,
                 stream: Optional[TextIO] = None):
        self.stats = stats
        self.stream = stream = stream or sys.stderr
        self.interval = interval
        self._last_log = time.perf_counter()
        use_bar = stream.isatty() if bar is None else bar
        self._bar = None
        if use_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=stats.total - stats.skipped, unit="line", desc="batch", file=stream,
                             dynamic_ncols=True)

    def update(self, lines: int) -> None:
        s = self.stats
        if self._bar is not None:
            self._bar.update(lines)
            self._bar.set_postfix_str(f"{s.completion_tokens / max(s.elapsed, 1e-9):.1f} tok/s, {s.failed} failed",
                                      refresh=False)
            return
        now = time.perf_counter()
        if now - self._last_log >= self.interval:
            self._last_log = now
            self.log()

    def log(self) -> None:
        s = self.stats
        todo = s.total - s.skipped
        wall = max(s.elapsed, 1e-9)
        print(f"eyas batch: {s.done}/{todo} lines ({s.ok} ok, {s.failed} failed), {s.completion_tokens} tokens, "
              f"{s.done / wall:.2f} lines/s, {s.completion_tokens / wall:.1f} tok/s, {wall:.0f}s elapsed",
              file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
