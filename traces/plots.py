"""Plots of a replay: measured vs simulated latency CDFs, and the queue time series.

Figures are built with ``matplotlib.figure.Figure`` (no pyplot, no global backend), so they render headless and
in notebooks alike.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from .replay_core import METRICS, SimulatedRun
from .runs import MeasuredRun

__all__ = ["cdf_figure", "queue_figure", "save_replay_plots"]

_LABELS = {"ttft_s": "TTFT (s)", "tpot_s": "TPOT (ms)", "e2e_s": "E2E (s)"}
_SCALE = {"ttft_s": 1.0, "tpot_s": 1e3, "e2e_s": 1.0}


def cdf_figure(run: MeasuredRun, simulated: SimulatedRun, mask: np.ndarray | None = None,
               title: str = "") -> Figure:
    """Empirical CDFs of TTFT, TPOT and E2E, measured vs simulated, over the ``mask`` requests."""
    m = np.ones(len(run), bool) if mask is None else np.asarray(mask, bool)
    fig = Figure(figsize=(12, 3.6), layout="constrained")
    axes = fig.subplots(1, len(METRICS))
    for ax, metric in zip(axes, METRICS, strict=True):
        sel = m & (run.output_tokens > 1) if metric == "tpot_s" else m
        for label, x, style in (("measured", run.requests[metric].to_numpy()[sel], "-"),
                                ("simulated", simulated.records[metric].to_numpy()[sel], "--")):
            xs = np.sort(x) * _SCALE[metric]
            ax.plot(xs, np.arange(1, len(xs) + 1) / len(xs), style, label=label)
        ax.set_xlabel(_LABELS[metric])
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title or f"{run.name}: measured vs simulated ({int(m.sum())} requests)")
    return fig


def queue_figure(run: MeasuredRun, simulated: SimulatedRun, title: str = "") -> Figure:
    """Running, waiting and KV usage per tick, measured vs simulated (KV only when the run recorded it)."""
    ts, g = run.timeseries, simulated.gauges
    panels = [("running", "running requests"), ("waiting", "waiting requests")]
    if run.kv_cache_recorded:
        panels.append(("kv_cache_usage_perc", "KV-cache usage (fraction)"))
    fig = Figure(figsize=(12, 3.6), layout="constrained")
    axes = fig.subplots(1, len(panels))
    for ax, (col, label) in zip(axes, panels, strict=True):
        if ts is not None:
            ax.plot(ts["t"] * run.meta.tick_seconds, ts[col], "-", label="measured")
        if g is not None and len(g):
            ax.plot(g["t"] * run.meta.tick_seconds, g[col], "--", label="simulated")
        ax.set_xlabel("time since the run started (s)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    note = "" if run.kv_cache_recorded else " (kv_cache_pct not recorded: not plotted)"
    fig.suptitle(title or f"{run.name}: queues per tick{note}")
    return fig


def save_replay_plots(run: MeasuredRun, simulated: SimulatedRun, out_dir: str | Path,
                      mask: np.ndarray | None = None) -> dict[str, str]:
    """Write ``<run>_cdf.png`` and ``<run>_queues.png`` into ``out_dir``; return their paths."""
    from .atomic import atomic_open, output_dir

    d = output_dir(out_dir, what="plots folder")
    paths = {"cdf": d / f"{run.name}_cdf.png", "queues": d / f"{run.name}_queues.png"}
    import matplotlib.pyplot as plt

    for key, fig in (("cdf", cdf_figure(run, simulated, mask)), ("queues", queue_figure(run, simulated))):
        try:
            with atomic_open(paths[key], "wb") as f:
                fig.savefig(f, dpi=110, format="png")
        finally:
            plt.close(fig)  # written, not shown: free it
    return {k: str(v) for k, v in paths.items()}
