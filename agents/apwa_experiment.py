"""``maslat experiment apwa``: APWA against its baselines over growing tables, on the same worlds.

For every seed and N, every method runs on a fresh copy of the same warmed-up world with the same table
and failure stream (common random numbers; ``envs.apwa.APWARun``). Per method and N the summary gives the
mean over seeds of the makespan (s), tokens, structural completeness, modelled semantic utility and
failures (refused and malformed calls, lost rows), the share of runs that completed and why the others did
not; ``preemptions`` (world-wide, during the run: KV pressure) and ``kv_peak`` (highest KV-cache usage of a
pool, sampled every 0.5 s) show saturation as the simulator produces it. Per method, ``scaling_exponent`` is the least-squares slope of log makespan against log N over the N
where every seed completed (1 = linear; below 1 = sublinear), and ``breaks_at_items`` the smallest N where
a run did not complete.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from envs.apwa import METHODS, WORKLOADS, APWAConfig, APWARun

__all__ = ["PAPER", "run_apwa_experiment"]

#: the APWA paper's own figures (arXiv 2605.15132; docs/system_aware.md#10-apwa-architecture): outcomes, never inputs
PAPER = {"makespan_s_10_topics": 143.0, "semantic_utility_100_topics": 0.995,
         "structural_completeness_100_topics": 1.0, "runtime_growth": "sublinear"}

_FIGURES = ("makespan_s", "tokens", "structural_completeness", "semantic_utility", "num_calls", "retries",
            "rejected_calls", "malformed_calls", "lost_items", "width", "depth", "peak_context_tokens")


def _slope(ns: list[int], ys: list[float]) -> float | None:
    if len(ns) < 2:
        return None
    return float(np.polyfit(np.log(ns), np.log(ys), 1)[0])


def _summarise(method: str, items: Sequence[int], runs: dict[int, list[dict]]) -> dict:
    by_n, ok_n, ok_y, breaks = {}, [], [], None
    for n in items:
        rs = runs[n]
        row = {k: float(np.mean([r[k] for r in rs])) for k in _FIGURES}
        row["makespan_s_std"] = float(np.std([r["makespan_s"] for r in rs]))
        row["complete_share"] = float(np.mean([r["complete"] for r in rs]))
        row["preemptions"] = float(np.mean([r["preemptions"] for r in rs]))
        row["kv_peak"] = float(np.max([r["kv_peak"] for r in rs]))
        row["failure_reasons"] = sorted({r["failure_reason"] for r in rs if r["failure_reason"]})
        by_n[str(n)] = row
        if row["complete_share"] == 1.0:
            ok_n.append(n)
            ok_y.append(row["makespan_s"])
        elif breaks is None:
            breaks = n
    return {"by_items": by_n, "scaling_exponent": _slope(ok_n, ok_y), "breaks_at_items": breaks,
            "complete_items": ok_n}


def run_apwa_experiment(items: Sequence[int], seeds: Sequence[int], *, methods: Sequence[str] | None = None,
                        workload: str = "summarise", cfg: APWAConfig | None = None,
                        progress: Callable[[int], None] | None = None) -> dict:
    """Every method x N x seed; returns the JSON-ready summary (see the module docstring)."""
    methods = list(methods or METHODS)
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown methods {bad}; choose from {sorted(METHODS)}")
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; choose one of {sorted(WORKLOADS)}")
    items = sorted({int(n) for n in items})
    if not items or items[0] < 1:
        raise ValueError(f"--items must be row counts >= 1, got {items}")
    cfg = cfg or APWAConfig()
    runs: dict[str, dict[int, list[dict]]] = {m: {n: [] for n in items} for m in methods}
    for seed in seeds:
        for n in items:
            for m in methods:
                run = APWARun(cfg, workload, n, seed)
                res = run.run(m)
                runs[m][n].append({**res.summary(), "preemptions": run.preemptions, "kv_peak": run.kv_peak})
                if progress is not None:
                    progress(1)
    out = {m: _summarise(m, items, runs[m]) for m in methods}
    return {"experiment": "apwa", "workload": workload, "items": items, "seeds": list(seeds), "load": str(
        cfg.load if isinstance(cfg.load, str) else cfg.load.name), "methods": out, "paper": PAPER,
        "sources": {"workload": WORKLOADS[workload].source}}
