"""results.png: output tok/s and speedup vs nospec against concurrency (log2 x axis), one line per
mode; the speedup panel also draws the steady-state speedup (dashed, see metrics.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence


def write_plot(path: Path, records: Sequence[dict], title: str = "") -> None:
    # The Agg canvas directly, not pyplot: no display needed and no global backend switched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    modes = list(dict.fromkeys(r["mode"] for r in records))
    fig = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(fig)
    ax_tps, ax_speed = fig.subplots(1, 2)
    for mode in modes:
        rows = sorted((r for r in records if r["mode"] == mode), key=lambda r: r["concurrency"])
        xs = [r["concurrency"] for r in rows]
        ax_tps.plot(xs, [r["output_tok_s"] for r in rows], marker="o", label=mode)
        sp = [(r["concurrency"], r["speedup_vs_nospec"]) for r in rows if r["speedup_vs_nospec"] is not None]
        if sp:
            line, = ax_speed.plot(*zip(*sp), marker="o", label=mode)
            steady = [(r["concurrency"], r.get("steady_speedup_vs_nospec")) for r in rows
                      if r.get("steady_speedup_vs_nospec") is not None]
            if steady and mode != "nospec":
                ax_speed.plot(*zip(*steady), marker="x", ls="--", color=line.get_color(),
                              label=f"{mode} (steady)")
    ax_speed.axhline(1.0, color="gray", lw=0.8, ls="--")
    for ax, ylabel in ((ax_tps, "output tok/s"), (ax_speed, "speedup vs nospec")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_lines():
            ax.legend()
    concs = sorted({r["concurrency"] for r in records})
    if concs:
        for ax in (ax_tps, ax_speed):
            ax.set_xticks(concs, [str(c) for c in concs])
    ax_tps.set_title("throughput")
    ax_speed.set_title("speedup vs nospec")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
