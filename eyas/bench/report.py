"""Bench outputs: results.json (list of records), results.md (table) and meta.json.

Both results files are rewritten after every finished level, atomically, so an interrupted run
leaves valid partial results.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

COLUMNS = (  # (record key, Markdown header)
    ("mode", "mode"), ("concurrency", "concurrency"), ("output_tok_s", "output tok/s"),
    ("speedup_vs_nospec", "speedup vs nospec"), ("steady_tok_s", "steady tok/s"),
    ("steady_speedup_vs_nospec", "steady speedup"), ("accept_len", "accept len"),
    ("tpot_ms", "TPOT ms"), ("ttft_ms", "TTFT ms"), ("num_prompts", "requests"), ("wall_s", "wall s"),
)


def default_out_dir() -> Path:
    """bench/results/<local timestamp> under the current directory."""
    return Path("bench") / "results" / _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def fill_speedups(records: list[dict]) -> None:
    """speedup_vs_nospec = output_tok_s / nospec's at the same concurrency, and
    steady_speedup_vs_nospec the same for steady_tok_s (None without nospec)."""
    for key, speedup in (("output_tok_s", "speedup_vs_nospec"), ("steady_tok_s", "steady_speedup_vs_nospec")):
        base = {r["concurrency"]: r.get(key) for r in records if r["mode"] == "nospec"}
        for r in records:
            b, x = base.get(r["concurrency"]), r.get(key)
            r[speedup] = round(x / b, 3) if b and x is not None else None


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def markdown_table(records: Sequence[dict]) -> str:
    """One row per record, in run order."""
    lines = ["| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in records:
        lines.append("| " + " | ".join(_fmt(r.get(k)) for k, _ in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_results(out_dir: Path, records: Sequence[dict]) -> None:
    _write_atomic(out_dir / "results.json", json.dumps(list(records), indent=2) + "\n")
    _write_atomic(out_dir / "results.md", markdown_table(records))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """Host, CPU and GPU names; imports torch."""
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    return {"host": platform.node(), "platform": platform.platform(), "cpu": _cpu_name(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpus": gpus}


def build_meta(engine_config, bench_config, command: Optional[str] = None, **extra) -> dict:
    """date, machine, versions, command line and both configurations."""
    import dataclasses

    import torch
    import transformers

    import eyas

    meta = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "versions": {"eyas": eyas.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version(),
                     "cuda": torch.version.cuda, "hip": getattr(torch.version, "hip", None)},
        "command": command if command is not None else " ".join(sys.argv),
        "engine_config": dataclasses.asdict(engine_config),
        "bench_config": dataclasses.asdict(bench_config),
    }
    meta.update(extra)
    return meta


def write_meta(out_dir: Path, meta: dict) -> None:
    _write_atomic(out_dir / "meta.json", json.dumps(meta, indent=2, default=str) + "\n")
