"""Plot helpers for the command line (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int = 110) -> Path:
    """Write ``fig`` to ``path`` (creating its folder) and close it."""
    from traces.atomic import atomic_open, output_path

    plt = _plt()
    try:
        output_path(path, (".png", ".pdf", ".svg"), what="plot")
        fig.tight_layout()
        with atomic_open(path, "wb") as f:
            fig.savefig(f, dpi=dpi, format=Path(path).suffix[1:].lower())
    finally:
        plt.close(fig)
    return path


def latency_cdfs(records_df, out: Path, title: str = "") -> Path:
    """CDFs of engine-side TTFT, TPOT and E2E of finished requests."""
    import numpy as np

    plt = _plt()
    df = records_df[records_df.status == "FINISHED_LENGTH_CAPPED"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, col, label in zip(axes, ("ttft_s", "tpot_s", "e2e_s"), ("TTFT (s)", "TPOT (s)", "E2E (s)"), strict=True):
        x = np.sort(df[col].to_numpy())
        ax.plot(x, np.arange(1, len(x) + 1) / max(1, len(x)))
        ax.set_xlabel(label)
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return save_figure(fig, out)


def queue_timeseries(ts_df, out: Path, title: str = "") -> Path:
    """Running, waiting and KV usage per replica over simulated time."""
    plt = _plt()
    fig, axes = plt.subplots(3, 1, figsize=(10, 7), sharex=True)
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
