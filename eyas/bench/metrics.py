"""Per-request timings and the record one (mode, concurrency) level reports.

Definitions (times from time.perf_counter, per level):
- ttft_ms: mean over requests of (first output token - submit).
- tpot_ms: mean over requests of (finish - first token) / (output tokens - 1); None when N = 1.
- output_tok_s: all output tokens / wall_s, where wall_s runs from the first submit to the last finish.
- steady_tok_s: min(concurrency, requests) x mean output tokens / mean latency (finish - submit):
  by Little's law, the rate of a server that always holds exactly `concurrency` requests. The
  closed loop of a level leaves out two ends that output_tok_s counts: the last requests drain
  with fewer than `concurrency` in flight. Without speculation the requests of one wave finish
  together (the same length, the same steps), so the drain is short; with it they finish apart:
  an adaptive c=4 level of 2 rounds of 32 requests spent 2.4 s of its 50.5 s in the drain
  (1.16x nospec by wall, 1.22x by latency). The two agree once a level holds many waves.
- accept_len: all output tokens / all target forward steps (1.0 without speculation).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from statistics import mean
from typing import Optional


@dataclass
class RequestTiming:
    """One request's clock. target_steps = target forward steps that produced its tokens."""

    submit: float
    first_token: Optional[float] = None
    finish: Optional[float] = None
    output_tokens: int = 0
    target_steps: int = 0


@dataclass(frozen=True)
class LevelResult:
    """What one closed-loop level measured."""

    mode: str
    concurrency: int
    timings: tuple[RequestTiming, ...]
    wall_s: float
    extra: dict = field(default_factory=dict)  # e.g. preemptions, spec settings


def _round(x: Optional[float], digits: int) -> Optional[float]:
    return None if x is None else round(x, digits)


def level_record(level: LevelResult, input_len: int, output_len: int) -> dict:
    """The JSON record of one level; the speedups are filled in later (report.fill_speedups)."""
    ts = level.timings
    tokens = sum(t.output_tokens for t in ts)
    steps = sum(t.target_steps for t in ts)
    ttft = mean(t.first_token - t.submit for t in ts) if ts else None
    latency = mean(t.finish - t.submit for t in ts) if ts else None
    per_token = [(t.finish - t.first_token) / (t.output_tokens - 1) for t in ts if t.output_tokens > 1]
    rec = {
        "mode": level.mode,
        "concurrency": level.concurrency,
        "num_prompts": len(ts),
        "input_len": input_len,
        "output_len": output_len,
        "output_tokens": tokens,
        "wall_s": round(level.wall_s, 6),
        "output_tok_s": round(tokens / level.wall_s, 3) if level.wall_s > 0 else None,
        "speedup_vs_nospec": None,
        "steady_tok_s": round(min(level.concurrency, len(ts)) * tokens / len(ts) / latency, 3)
        if latency else None,
        "steady_speedup_vs_nospec": None,
        "accept_len": round(tokens / steps, 4) if steps else None,
        "tpot_ms": _round(mean(per_token) * 1000 if per_token else None, 3),
        "ttft_ms": _round(ttft * 1000 if ttft is not None else None, 3),
    }
    rec.update(level.extra)
    return rec


def merge_rounds(rounds: list[LevelResult]) -> LevelResult:
    """One level measured in several rounds (same mode and concurrency) as one result: all the
    requests, the rounds' wall times summed, preemptions summed; `round_tok_s` keeps each
    round's throughput so the spread stays visible."""
    first = rounds[0]
    if len(rounds) == 1:
        return first
    extra = dict(first.extra)
    if "preemptions" in extra:
        extra["preemptions"] = sum(r.extra.get("preemptions", 0) for r in rounds)
    if "draft_choices" in extra:
        merged: dict[str, int] = {}
        for r in rounds:
            for k, n in r.extra.get("draft_choices", {}).items():
                merged[k] = merged.get(k, 0) + n
        extra["draft_choices"] = dict(sorted(merged.items(), key=lambda kv: int(kv[0])))
    extra["rounds"] = len(rounds)
    extra["round_tok_s"] = [round(sum(t.output_tokens for t in r.timings) / r.wall_s, 3) if r.wall_s > 0 else None
                            for r in rounds]
    timings = tuple(t for r in rounds for t in r.timings)
    return LevelResult(first.mode, first.concurrency, timings, sum(r.wall_s for r in rounds), extra)
