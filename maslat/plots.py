"""The public plotting facade: every figure the commands, notebooks and README show.

Each figure has a builder that returns a ``matplotlib.figure.Figure`` (no pyplot state, so it renders headless
and in notebooks alike) and, where a command writes it, a ``*_plot(..., path)`` wrapper that saves it.

==============================  ======================================================  =====================
figure                          builder                                                 input
==============================  ======================================================  =====================
Pareto front (LAMaS vs MaAS)    :func:`pareto_figure` / :func:`pareto_plot`              experiment summary
learning curves                 :func:`curves_figure` / :func:`curves_plot`              experiment curves
goodput against the SLO         :func:`goodput_figure` / :func:`goodput_plot`            CMDP summary
Lagrange multiplier and cost    :func:`training_figure` / :func:`training_plot`          CMDP curves
measured vs simulated CDFs      :func:`cdf_figure` (from ``traces.plots``)               a run and its replay
measured vs simulated queues    :func:`queue_figure` (from ``traces.plots``)             a run and its replay
simulated latency CDFs, queues  :func:`latency_cdfs`, :func:`queue_timeseries`           a simulated world
==============================  ======================================================  =====================

:func:`show` displays a figure in a notebook; :func:`save_figure` writes one (atomically, PNG/PDF/SVG).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from traces.plots import cdf_figure, queue_figure

__all__ = ["cdf_figure", "curves_figure", "curves_plot", "goodput_figure", "goodput_plot", "latency_cdfs",
           "pareto_figure", "pareto_plot", "png_bytes", "queue_figure", "queue_timeseries", "save_figure",
           "show", "training_figure", "training_plot"]


def _plt():
    """pyplot on the headless Agg backend (for commands only: a notebook keeps its own backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int = 110) -> Path:
    """Write ``fig`` to ``path`` (creating its folder) and close it.

    PNGs carry no software-version metadata, so the same figure gives the same bytes after an upgrade of
    matplotlib that does not change the drawing.
    """
    import matplotlib.pyplot as plt

    from traces.atomic import atomic_open, output_path

    try:
        output_path(path, (".png", ".pdf", ".svg"), what="plot")
        fmt = Path(path).suffix[1:].lower()
        if fig.get_layout_engine() is None:
            fig.tight_layout()
        with atomic_open(path, "wb") as f:
            fig.savefig(f, dpi=dpi, format=fmt, metadata={"Software": None} if fmt == "png" else None)
    finally:
        plt.close(fig)  # a no-op for a Figure built without pyplot
    return Path(path)


def png_bytes(fig: Figure, dpi: int = 90) -> bytes:
    """The figure as PNG bytes (for ``IPython.display.Image`` or a web page)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def show(fig: Figure, dpi: int = 90) -> None:
    """Display ``fig`` in a notebook as a PNG (works whatever the notebook's matplotlib backend)."""
    from IPython.display import Image, display

    display(Image(png_bytes(fig, dpi)))


def pareto_figure(summary: dict) -> Figure:
    """Score against CP tokens and against CP seconds, mean ± std over seeds, one point per method.

    Args:
        summary: ``agents.experiment.ExperimentResult.to_json()`` (``methods``: per-method ``score_pct``,
            ``cp_tokens_mean``, ``cp_seconds_mean`` and their ``_std``; optional ``published`` points of the
            LAMaS paper, docs/lamas.md#7-published-results, drawn as stars).
    """
    methods = summary["methods"]
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, key, label in ((axes[0], "cp_tokens_mean", "critical path (tokens, LAMaS's CP len)"),
                           (axes[1], "cp_seconds_mean", "critical path under contention (simulated s)")):
        for name, d in methods.items():
            ax.errorbar(d[key], d["score_pct"], xerr=d.get(key + "_std", 0.0),
                        yerr=d.get("score_pct_std", 0.0), fmt="o", capsize=3, label=name)
            ax.annotate(name, (d[key], d["score_pct"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel("score (%)")
        ax.grid(alpha=0.3)
    pub = summary.get("published")
    if pub:
        for name in ("lamas", "maas"):
            axes[0].scatter(pub[name]["cp_tokens_mean"], pub[name]["score_pct"], marker="*", s=120, color="k")
            axes[0].annotate(f"{name} (paper)", (pub[name]["cp_tokens_mean"], pub[name]["score_pct"]),
                             textcoords="offset points", xytext=(4, -10), fontsize=8)
    fig.suptitle(f"{summary['task']}: score vs critical path, {summary['seeds']} seed(s)")
    return fig


def curves_figure(curves: dict[str, list[list[dict]]], window: int = 16) -> Figure:
    """Training curves (moving average over batches) of score, CP tokens and CP seconds per learned method.

    Args:
        curves: ``ExperimentResult.curves``: per method, one list of per-batch metric dicts per seed.
        window: moving-average width in batches (shorter series are drawn raw).
    """
    keys = ("train/score", "train/cp_tokens", "latency/cp_seconds")
    fig = Figure(figsize=(14, 3.8), layout="constrained")
    axes = fig.subplots(1, 3)
    for name, runs in curves.items():
        runs = [r for r in runs if r]
        if not runs:
            continue
        for ax, k in zip(axes, keys, strict=True):
            y = np.mean([[m[k] for m in r] for r in runs], axis=0)
            y = np.convolve(y, np.ones(window) / window, mode="valid") if len(y) >= window else y
            ax.plot(y, label=name)
            ax.set_title(k)
            ax.set_xlabel("batch")
    axes[0].legend(fontsize=8)
    return fig


def goodput_figure(summary: dict) -> Figure:
    """Goodput (correct and within the SLO) against the SLO factor, one panel per load regime.

    Args:
        summary: the ``summary`` of ``agents.cmdp_experiment.run_cmdp_experiment`` (``by_slo``: regime ->
            policy -> SLO factor -> metrics with ``goodput``).
    """
    regs = list(summary["by_slo"])
    fig = Figure(figsize=(4.2 * len(regs) + 0.6, 3.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(regs)))
    for ax, reg in zip(axes, regs, strict=True):
        for pol, per in summary["by_slo"][reg].items():
            fs = sorted(per, key=float)
            ax.plot([float(f) for f in fs], [per[f]["goodput"] for f in fs], marker="o",
                    ls="--" if pol == "oracle" else "-", label=pol,
                    lw=2.2 if pol == "ppo_lagrangian" else 1.2)
        ax.set_title(reg)
        ax.set_xlabel("SLO (x reference latency)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("goodput (correct and within SLO)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{summary['task']}: goodput against the SLO")
    return fig


def training_figure(curves: dict, cost_limit: float) -> Figure:
    """PPO-Lagrangian's multiplier and mean episodic cost over training, with the cost limit ``d``.

    Args:
        curves: the CMDP experiment's ``curves`` (keys ``ppo_lagrangian/<regime>/<seed>``: lists of records
            with ``steps``, ``constraint/lambda``, ``constraint/episode_cost``); other keys are ignored.
        cost_limit: the limit ``d`` drawn on the cost panel.
    """
    ppo = {k: v for k, v in curves.items() if k.startswith("ppo_lagrangian/")}
    fig = Figure(figsize=(11, 3.8), layout="constrained")
    a1, a2 = fig.subplots(1, 2)
    for k, hist in ppo.items():
        label = "/".join(k.split("/")[1:])
        steps = [h["steps"] for h in hist]
        a1.plot(steps, [h["constraint/lambda"] for h in hist], label=label)
        a2.plot(steps, [h["constraint/episode_cost"] for h in hist], label=label)
    a2.axhline(cost_limit, color="k", ls=":", label="cost limit d")
    a1.set_title("Lagrange multiplier")
    a2.set_title("mean episodic cost (last rollout)")
    for a in (a1, a2):
        a.set_xlabel("environment steps")
        a.grid(alpha=0.3)
    a2.legend(fontsize=7)
    return fig


def pareto_plot(summary: dict, path: Path) -> Path:
    """Write :func:`pareto_figure` to ``path``."""
    return save_figure(pareto_figure(summary), path, dpi=120)


def curves_plot(curves: dict[str, list[list[dict]]], path: Path, window: int = 16) -> Path:
    """Write :func:`curves_figure` to ``path``."""
    return save_figure(curves_figure(curves, window), path, dpi=120)


def goodput_plot(summary: dict, path: Path) -> Path:
    """Write :func:`goodput_figure` to ``path``."""
    return save_figure(goodput_figure(summary), path)


def training_plot(curves: dict, path: Path, cost_limit: float) -> Path:
    """Write :func:`training_figure` to ``path``."""
    return save_figure(training_figure(curves, cost_limit), path)


def _cdf_axes(ax, x: np.ndarray, label: str) -> None:
    xs = np.sort(x)
    ax.plot(xs, np.arange(1, len(xs) + 1) / max(1, len(xs)))
    ax.set_xlabel(label)
    ax.set_ylabel("fraction of requests")
    ax.grid(alpha=0.3)


def latency_cdfs(records_df, out: Path, title: str = "") -> Path:
    """CDFs of engine-side TTFT, TPOT and E2E of a simulated world's finished requests, written to ``out``."""
    df = records_df[records_df.status == "FINISHED_LENGTH_CAPPED"]
    fig = Figure(figsize=(13, 3.6), layout="constrained")
    cols = (("ttft_s", "TTFT (s)"), ("tpot_s", "TPOT (s)"), ("e2e_s", "E2E (s)"))
    for ax, (col, label) in zip(fig.subplots(1, 3), cols, strict=True):
        _cdf_axes(ax, df[col].to_numpy(), label)
    fig.suptitle(title)
    return save_figure(fig, out)


def queue_timeseries(ts_df, out: Path, title: str = "") -> Path:
    """Running, waiting and KV usage per replica over simulated time, written to ``out``."""
    fig = Figure(figsize=(10, 7), layout="constrained")
    axes = fig.subplots(3, 1, sharex=True)
    for rep, g in ts_df.groupby("replica"):
        axes[0].plot(g.t_s, g.running, label=f"replica {rep}")
        axes[1].plot(g.t_s, g.waiting)
        axes[2].plot(g.t_s, 100 * g.kv_cache_usage_perc)
    for ax, lab in zip(axes, ("running", "waiting", "KV cache usage (%)"), strict=True):
        ax.set_ylabel(lab)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("simulated time (s)")
    if ts_df.replica.nunique() <= 8:
        axes[0].legend(fontsize=8, ncol=4)
    fig.suptitle(title)
    return save_figure(fig, out)
