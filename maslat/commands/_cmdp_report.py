"""Tables and findings of the CMDP study (``maslat experiment cmdp``, ``notebooks/cmdp.ipynb``; plots:
``maslat.plots``)."""

from __future__ import annotations

from ._common import format_table

__all__ = ["findings_text", "results_table", "training_note"]


def training_note(summary: dict) -> str:
    """Where the time went (training per regime, evaluation per regime) and which background each phase used."""
    t = summary["timing"]
    parts = [f"{r} {sum(v) / len(v):.0f} s" for r, v in t["train_ppo_s"].items()]
    ev = [f"{r} {sum(v) / len(v):.0f} s" for r, v in t["evaluate_s"].items()]
    bg = summary.get("background")
    lines = []
    if parts:
        lines.append("PPO-Lagrangian training time per regime (mean over seeds): " + ", ".join(parts))
    if ev:
        lines.append("evaluation time per regime (mean over seeds): " + ", ".join(ev))
    if bg:
        lines.append(f"background: training {bg['train']}, evaluation {bg['evaluate']}"
                     + (" (tape: envs.bgtape's approximation; exact: every background request simulated)"
                        if "tape" in bg.values() else ""))
        if "protocol" in bg:
            lines.append(f"warm-up {bg['warmup_s']:g} s, protocol {bg['protocol']}")
    lines.append(f"total wall {summary['wall_s']:.0f} s")
    return "\n".join(lines)


def findings_text(summary: dict) -> str:
    lines = ["\nfindings (target: PPO-Lagrangian attains the SLO on >= 95 % of queries, highest non-oracle goodput):"]
    for reg, f in summary.get("findings", {}).items():
        lines.append(
            f"  {reg:7s} PPO-Lagrangian attainment {f['ppo_slo_attainment']:.3f} (lowest over SLOs "
            f"{f['ppo_min_attainment_over_slos']:.3f}) {'meets' if f['ppo_meets_target'] else 'MISSES'} the target; "
            f"goodput {f['ppo_goodput']:.3f} vs best other "
            + (f"{f['best_other']} {f['best_other_goodput']:.3f} " if f["best_other"] is not None else "(none run) ")
            + f"({'highest' if f['ppo_highest_goodput'] else 'NOT highest'}; oracle {f['oracle_goodput'] or float('nan'):.3f})"
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
