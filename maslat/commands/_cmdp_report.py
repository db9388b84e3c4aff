"""Tables, findings and plots of the CMDP study (``maslat experiment cmdp``, ``notebooks/cmdp.ipynb``)."""

from __future__ import annotations

from pathlib import Path

from ._common import format_table

__all__ = ["findings_text", "goodput_plot", "results_table", "training_note", "training_plot"]


def training_note(summary: dict) -> str:
    t = summary["timing"]
    parts = [f"{r} {sum(v) / len(v):.0f} s" for r, v in t["train_ppo_s"].items()]
    return ("PPO-Lagrangian training time per regime (mean over seeds): " + ", ".join(parts)
            + f"; total wall {summary['wall_s']:.0f} s") if parts else f"total wall {summary['wall_s']:.0f} s"


def findings_text(summary: dict) -> str:
    lines = ["\nfindings (target: PPO-Lagrangian attains the SLO on >= 95 % of queries, highest non-oracle goodput):"]
    for reg, f in summary.get("findings", {}).items():
        lines.append(
            f"  {reg:7s} PPO-Lagrangian attainment {f['ppo_slo_attainment']:.3f} (lowest over SLOs "
            f"{f['ppo_min_attainment_over_slos']:.3f}) {'meets' if f['ppo_meets_target'] else 'MISSES'} the target; "
            f"goodput {f['ppo_goodput']:.3f} vs best other {f['best_other']} {f['best_other_goodput']:.3f} "
            f"({'highest' if f['ppo_highest_goodput'] else 'NOT highest'}; oracle {f['oracle_goodput'] or float('nan'):.3f})"
            + (f"; MasRouter attains {f['masrouter_slo_attainment']:.3f}" if f["masrouter_slo_attainment"] is not None
               else ""))
    return "\n".join(lines)


def results_table(summary: dict) -> str:
    out = []
    for reg, pols in summary["regimes"].items():
        rows = []
        for name, m in pols.items():
            sd = summary["seeds"] > 1
            def pm(k, scale=1.0, m=m, sd=sd):
                return f"{scale * m[k]:.3g}" + (f" ± {scale * m[k + '_std']:.2g}" if sd and k + "_std" in m else "")
            rows.append([name, pm("quality_pct"), pm("slo_attainment"), pm("goodput"), m["latency_p50_s"],
                         m["latency_p95_s"], m["cost_usd_per_query"], m["calls_per_query"]])
        out.append(f"\nload regime: {reg}  (SLO factors {summary['slo_factors']}, {summary['eval_queries']} test queries "
                   f"each, {summary['seeds']} seed(s))")
        out.append(format_table(rows, ["policy", "quality %", "SLO attainment", "goodput", "p50 s", "p95 s", "$/query",
                                       "calls"]))
    return "\n".join(out)


def goodput_plot(summary: dict, path: Path) -> Path:
    from maslat.plots import _plt, save_figure

    plt = _plt()
    regs = list(summary["by_slo"])
    fig, axes = plt.subplots(1, len(regs), figsize=(4.2 * len(regs), 3.6), squeeze=False)
    for ax, reg in zip(axes[0], regs, strict=True):
        for pol, per in summary["by_slo"][reg].items():
            fs = sorted(per, key=float)
            ax.plot([float(f) for f in fs], [per[f]["goodput"] for f in fs], marker="o",
                    ls="--" if pol == "oracle" else "-", label=pol, lw=2.2 if pol == "ppo_lagrangian" else 1.2)
        ax.set_title(reg)
        ax.set_xlabel("SLO (x reference latency)")
        ax.set_ylabel("goodput (correct and within SLO)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{summary['task']}: goodput against the SLO")
    return save_figure(fig, path, dpi=110)


def training_plot(curves: dict, path: Path, cost_limit: float) -> Path:
    from maslat.plots import _plt, save_figure

    plt = _plt()
    ppo = {k: v for k, v in curves.items() if k.startswith("ppo_lagrangian/")}
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8))
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
    return save_figure(fig, path, dpi=110)
