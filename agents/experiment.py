"""The LAMaS paper's experiment in simulation: every method, trained and tested with the same seeds.

For each seed and method: train on the train split (4 epochs, or more to reach ``lamas.MIN_UPDATES`` Adam
steps on a small split, under ``lamas.PROTOCOLS[protocol]``; batches of 4, 4 in flight; with
``restarts`` > 1, that many controllers, one kept on a validation run of the train split by
``agents.selection``), then run the test split ``test_repeats`` times at concurrency 30 (avg@K,
``lamas.TEST_REPEATS``), each run in its own world with its own LLM outcomes (``lamas.repeat_seed``), and report
the means. In test run r every method sees the same world (same background arrivals) and the same per-query
LLM outcomes for the same operator at the same place (common random numbers), so differences between methods
are paired, run by run. Optionally the trained controllers are re-tested at other background loads
(``load_factors``) to see how much of a token saving survives as seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial

import numpy as np

from envs import ClusterConfig, make_task

from .lamas import (
    METHODS,
    PROTOCOLS,
    TEST_REPEATS,
    Args,
    evaluate_repeats,
    summarize_repeats,
    train,
    train_epochs,
)

__all__ = ["PUBLISHED", "ExperimentResult", "aggregate", "lamas_trial", "per_seed", "run_experiment", "savings"]

#: docs/lamas.md#7-published-results: (LAMaS score, LAMaS CP len, MaAS score, MaAS CP len)
PUBLISHED = {"gsm8k": (93.37, 913.5, 93.13, 1474.6), "humaneval": (92.11, 1042.7, 93.00, 1810.8),
             "math": (52.26, 1195.8, 51.23, 2218.5)}

COLUMNS = ("score_pct", "cp_tokens_mean", "cp_tokens_p90", "cp_seconds_mean", "cp_seconds_p90", "cost_usd_per_query",
           "calls_per_query")


@dataclass(slots=True)
class ExperimentResult:
    task: str
    seeds: list[int]
    methods: list[str]
    protocol: str = "robust"
    runs: dict[str, list[dict]] = field(default_factory=dict)            # method -> per-seed summaries
    curves: dict[str, list[list[dict]]] = field(default_factory=dict)    # method -> per-seed training metrics
    loads: dict[float, dict[str, list[dict]]] = field(default_factory=dict)  # load factor -> method -> summaries
    test_infos: dict[str, list[list[list[dict]]]] = field(default_factory=dict)  # method -> seed -> test run -> infos
    selection: dict[str, list[list[dict]]] = field(default_factory=dict)  # method -> per-seed restart figures
    repeats: dict[str, list[list[dict]]] = field(default_factory=dict)  # method -> per-seed per-test-run summaries
    test_repeats: int = 1
    cpu_s: dict[str, float] = field(default_factory=dict)   # CPU seconds of training and of the test runs (not in to_json)

    def to_json(self) -> dict:
        out = {"task": self.task, "seeds": len(self.seeds), "protocol": self.protocol,
               "test_repeats": self.test_repeats, "methods": aggregate(self.runs)}
        out["savings"] = savings(self.runs, repeats=self.repeats)
        out["per_seed"] = per_seed(self.seeds, self.runs, self.repeats)
        for i, entry in enumerate(out["per_seed"]):   # which restart each learned method kept, and why
            entry["selection"] = {m: rows[i] for m, rows in self.selection.items() if len(rows) > i and rows[i]}
        if self.task in PUBLISHED:
            ls, lc, ms, mc = PUBLISHED[self.task]
            out["published"] = {"lamas": {"score_pct": ls, "cp_tokens_mean": lc},
                                "maas": {"score_pct": ms, "cp_tokens_mean": mc},
                                "cp_reduction_pct": 100.0 * (1 - lc / mc)}
        if self.loads:
            out["loads"] = {str(f): {"methods": aggregate(r), "savings": savings(r), "per_seed": per_seed(self.seeds, r)}
                            for f, r in self.loads.items()}
        return out


def per_seed(seeds: Sequence[int], runs: dict[str, list[dict]],
             repeats: dict[str, list[list[dict]]] | None = None) -> list[dict]:
    """One entry per seed with the same keys as the means (``methods``, ``savings``), each over that seed
    alone (so every ``*_std`` is 0, every ``*_repeat_std`` that seed's spread over its test runs): a mean
    hides a seed that fails. With LAMaS and MaAS, ``repeats`` lists their score gap and CP-token cut in each
    paired test run (run r of avg@K is run r of avg@K' for any K' > r, so a prefix is avg@r)."""
    out = []
    for i, s in enumerate(seeds):
        one = {m: rows[i:i + 1] for m, rows in runs.items() if len(rows) > i}
        rep = {m: rows[i:i + 1] for m, rows in (repeats or {}).items() if len(rows) > i}
        entry = {"seed": int(s), "methods": aggregate(one), "savings": savings(one, repeats=rep)}
        if "lamas" in rep and "maas" in rep:
            pairs = list(zip(rep["lamas"][0], rep["maas"][0], strict=True))
            entry["repeats"] = {"score_gap_points": [a["score_pct"] - b["score_pct"] for a, b in pairs],
                                "cp_tokens_reduction_pct": [100.0 * (1 - a["cp_tokens_mean"] / b["cp_tokens_mean"])
                                                            for a, b in pairs]}
        out.append(entry)
    return out


def aggregate(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Mean over seeds of every column, plus ``<column>_std`` (population std over seeds) except for the
    ``*_repeat_std`` columns (already a spread: their mean over seeds only)."""
    out = {}
    for m, rows in runs.items():
        d = {}
        for k in rows[0]:
            v = np.array([r[k] for r in rows], dtype=np.float64)
            d[k] = float(v.mean())
            if not k.endswith("_repeat_std"):
                d[f"{k}_std"] = float(v.std())
        out[m] = d
    return out


def savings(runs: dict[str, list[dict]], ours: str = "lamas", base: str = "maas",
            repeats: dict[str, list[list[dict]]] | None = None) -> dict:
    """LAMaS against MaAS, per seed then averaged: CP-token and CP-second reductions and the score gap; with the
    per-test-run summaries (``repeats``), ``score_gap_points_repeat_std``: the gap's population std over one
    seed's paired test runs (the test run's own noise), averaged over seeds."""
    if ours not in runs or base not in runs:
        return {}
    tok, sec, gap = [], [], []
    for a, b in zip(runs[ours], runs[base], strict=True):
        tok.append(100.0 * (1 - a["cp_tokens_mean"] / b["cp_tokens_mean"]))
        sec.append(100.0 * (1 - a["cp_seconds_mean"] / b["cp_seconds_mean"]))
        gap.append(a["score_pct"] - b["score_pct"])
    t, s = float(np.mean(tok)), float(np.mean(sec))
    return {"cp_tokens_reduction_pct": t, "cp_tokens_reduction_pct_std": float(np.std(tok)),
            "cp_seconds_reduction_pct": s, "cp_seconds_reduction_pct_std": float(np.std(sec)),
            "score_gap_points": float(np.mean(gap)), "score_gap_points_std": float(np.std(gap)),
            "seconds_over_tokens": s / t if t else float("nan"),
            "score_gap_points_repeat_std": _gap_repeat_std(repeats or {}, ours, base)}


def _gap_repeat_std(repeats: dict[str, list[list[dict]]], ours: str, base: str) -> float:
    if ours not in repeats or base not in repeats:
        return 0.0
    return float(np.mean([np.std([a["score_pct"] - b["score_pct"] for a, b in zip(ra, rb, strict=True)])
                          for ra, rb in zip(repeats[ours], repeats[base], strict=True)]))


def episodes_per_seed(task: str, methods: Sequence[str], epochs: int | None = None,
                      load_factors: Sequence[float] = (), protocol: str = "robust", restarts: int | None = None,
                      test_repeats: int = TEST_REPEATS) -> int:
    """Episodes the progress bar counts per seed: training (every restart) and test runs; validation is not
    counted."""
    spec = make_task(task)
    a = Args(task=task, epochs=epochs, protocol=protocol, restarts=restarts)
    n_restarts = a.restarts or PROTOCOLS[protocol].restarts
    n_train = sum(spec.num_train * train_epochs(a) * n_restarts for m in methods if METHODS[m].learned)
    return n_train + spec.num_test * len(methods) * (1 + len(load_factors)) * test_repeats


def run_experiment(task: str, seeds: Sequence[int], methods: Sequence[str] | None = None, *,
                   cluster: ClusterConfig | None = None, load_factors: Sequence[float] = (), epochs: int | None = None,
                   keep_infos: bool = False, progress: Callable[[int], None] | None = None,
                   map_fn: Callable | None = None, protocol: str = "robust",
                   restarts: int | None = None, test_repeats: int = TEST_REPEATS) -> ExperimentResult:
    """Train and test every method for every seed (``test_repeats`` test runs each, the figures their means);
    ``progress(n)`` is told of every finished episode.

    Each (seed, method) is an independent trial (``lamas_trial``); ``map_fn(fn, trials) -> results`` runs
    them (default: one after the other, in this process; ``maslat.ray_runner.RayMap``: as Ray tasks, where
    ``progress`` is not called: the runner counts trials instead). Results are the same either way."""
    methods = list(methods or METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {sorted(METHODS)}")
    cluster = cluster or ClusterConfig()
    res = ExperimentResult(task, list(seeds), methods, protocol, test_repeats=test_repeats)
    trials = [(seed, m) for seed in seeds for m in methods]
    fn = partial(lamas_trial, task=task, cluster=cluster, load_factors=tuple(load_factors), epochs=epochs,
                 keep_infos=keep_infos, progress=progress if map_fn is None else None, protocol=protocol,
                 restarts=restarts, test_repeats=test_repeats)
    outs = (map_fn or (lambda f, xs: [f(x) for x in xs]))(fn, trials)
    for (_seed, m), out in zip(trials, outs, strict=True):
        res.runs.setdefault(m, []).append(out["summary"])
        res.repeats.setdefault(m, []).append(out["repeats"])
        for k, v in out["cpu_s"].items():
            res.cpu_s[k] = res.cpu_s.get(k, 0.0) + v
        res.curves.setdefault(m, []).append(out["curve"])
        res.selection.setdefault(m, []).append(out.get("selection", []))
        if keep_infos:
            res.test_infos.setdefault(m, []).append(out["infos"])
        for f, s in zip(load_factors, out["loads"], strict=True):
            res.loads.setdefault(f, {}).setdefault(m, []).append(s)
    return res


def lamas_trial(trial: tuple[int, str], *, task: str, cluster: ClusterConfig, load_factors: Sequence[float] = (),
                epochs: int | None = None, keep_infos: bool = False,
                progress: Callable[[int], None] | None = None, protocol: str = "robust",
                restarts: int | None = None, test_repeats: int = TEST_REPEATS) -> dict:
    """One (seed, method): train, test (avg@K), re-test at each load factor (avg@K). A pure function of its
    arguments, except ``cpu_s`` (process CPU seconds of training and of the test runs)."""
    seed, m = trial
    tick = (lambda _info: progress(1)) if progress else None
    args = Args(method=m, task=task, seed=seed, epochs=epochs, cluster=cluster, protocol=protocol, restarts=restarts,
                test_repeats=test_repeats)
    t0 = time.process_time()
    tr = train(args, progress=progress)
    t1 = time.process_time()
    runs = evaluate_repeats(args, tr.controller, on_done=tick)
    loads = []
    for f in load_factors:
        c = replace(cluster, background_rate_per_s=(cluster.background_rate_per_s or 0.0) * f)
        loads.append(summarize_repeats(evaluate_repeats(args, tr.controller, cluster=c, on_done=tick))[0])
    summary, rows = summarize_repeats(runs)
    return {"summary": summary, "repeats": rows, "curve": tr.metrics, "infos": runs if keep_infos else None,
            "loads": loads, "selection": tr.selection,
            "cpu_s": {"train": t1 - t0, "test": time.process_time() - t1}}
