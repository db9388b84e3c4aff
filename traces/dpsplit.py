"""Data-parallel runs: which engine served each request, and one sub-run per engine for the step-time fit.

A run of ``vllm serve --data-parallel-size N`` holds the requests of N independent engines in one file, without
saying which engine served which (the API server chose, ``sim.dplb``). The reconstruction (``traces.reconstruct``)
and the NNLS rows (``traces.stepfit``) are per engine, so calibration splits the run:

1. **assign**: replay the whole DP world at the current profile (``traces.replay.simulate_run``: N engines behind
   vLLM's DP load balancing of the run's release); the simulator's records say which engine served each request.
   An engine-side run also says it itself, in part: vLLM stamps every output batch of an engine with one
   ``EngineCoreOutputs.timestamp`` (the ``first_token_ts``/``last_token_ts`` of every request in that batch) and
   every ``schedule()`` call's events with one time (``scheduled_ts``; a different clock reading), so requests
   sharing a scheduled time, or sharing an output time, ran on the same engine (the measured single-engine runs
   show it: 300 requests with 181 distinct first-token times). Requests linked by shared timestamps (``step_groups``, union-find) form groups that must
   sit on one engine; each group goes to the engine the replay gives most of its requests. Client-side runs
   (times of the client's own clock) carry no such links;
2. **split**: one ``MeasuredRun`` per engine with its requests (times, offsets and fit mask unchanged), its KV
   capacity (per engine when recorded) and its gauges when the run recorded per-engine columns
   (``running_engine<i>``, ``waiting_engine<i>``, ``kv_cache_pct_engine<i>``; ``traces.runs``), else none;
3. **fit** the sub-runs together as separate runs of one engine (``fit_step_model``), re-assign at the fitted
   profile and repeat while the assignment changes (at most ``MAX_ROUNDS`` fits).

The refinement and the final check replay the whole DP world (``traces.calibrate``).

What this cannot know: the true assignment. Under 0.19-0.26 (dense models) it is round robin with 5 s resets:
the replay recovers it exactly when the reset phase is right (no run records it; 0 assumed). Under vLLM >= 0.27
it depends on the engines' published load and thus on the step times: measured on a simulated 2-engine run, a
1 % change of every coefficient changes 30-45 % of the replay's choices, so the split is right in aggregate
(per-engine load over time) but not request by request. Neither the per-engine gauges nor shared timestamps pin
it down (a gauge-matching assignment, local search on running + waiting + KV per engine and tick, was as wrong as
a coin on those runs: the gauges count requests, they do not name them). What follows for the fit:

* one request's NNLS row on the wrong engine carries that engine's load: errors in the regressors, which
  flattened the fitted model (context cost 0.45x, per-request cost 3.3x the truth, held-out TPOT +4 %). The
  sub-runs are therefore fitted on rows summed over ``ROW_BIN_S`` seconds across engines
  (``traces.stepfit._binned``), where what one engine over-counts the other under-counts: context cost 0.90-0.96x,
  held-out TPOT within 0.5 % on the same runs;
* the TTFT mean and tail of such a run depend on the DP coordinator's timer (``routing_envelope``): the
  refinement leaves them out (``routing_dominated``) and the replay's bar holds them to the envelope.

The engine cores' own prefill and decode sums (``traces.enginelatency``; a client-side run's collector records
them per engine, vLLM's ``engine`` label being the DP rank) keep the fit on the engines' clock as they do for one
engine (``traces.steprows.engine_sum_rows``): per engine, against the requests the split gives it, when the
split's requests per engine agree with the engines' own histogram counts (``split_agrees``); otherwise the
total over the engines against the run's whole reconstruction (``FitRun.engine_sums_pool``), which holds whatever
the split. ``engine_sums`` in the report says which, per run and round.

``assignment_changes`` in the report says how much the split moved between rounds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
import pandas as pd
from scipy.stats import t as student_t

import sim
from sim.dplb import DP_RULES

from .enginelatency import engine_phase_sums_per_engine
from .kvcapacity import KVCapacity
from .replay_core import (
    SimulatedRun,
    dp_router,
    latency_errors,
    per_engine_blocks,
    simulate_run,
)
from .runs import TIMESERIES_COLUMNS, MeasuredRun
from .stepfit import FitFamily, FitRun, StepFit, fit_step_model

__all__ = ["ENVELOPE_PHASES", "MAX_ROUNDS", "SPLIT_COUNT_TOLERANCE", "dp_engine_sums", "split_agrees", "assign_engines", "dp_capacity", "dp_final_errors", "engine_timeseries",
           "fit_data_parallel", "routing_envelope", "split_by_engine", "step_groups"]

MAX_ROUNDS = 3  # fits at most (assignment at the prior, then at each fit while it changes)
#: the NNLS of the sub-runs sums its rows over this many seconds (``traces.stepfit._binned``): on simulated 2-engine
#: runs at 7.5 req/s the per-request rows of the split biased held-out TPOT by +3 to +4 %; 5 s sums, about 0 %
ROW_BIN_S = 5.0
ENVELOPE_PHASES = 8  # timer phases of the routing envelope (the run's own replay is the first)
#: an engine's requests in the split may differ from the requests its own histograms counted by this fraction
#: before its own sums are set aside for the total over the engines (``split_agrees``)
SPLIT_COUNT_TOLERANCE = 0.02


def dp_engine_sums(run: MeasuredRun, total: dict[str, float] | None) -> dict | None:
    """A DP run's engine-core sums for the fit: the ``total`` over its engines (``enginelatency.engine_phase_sums``)
    and, where recorded, ``"per_engine"`` (``engine_phase_sums_per_engine``); ``None`` without a total."""
    if total is None:
        return None
    per = engine_phase_sums_per_engine(run.meta.extra.get("collector"), num_requests=len(run),
                                       num_engines=run.engine.data_parallel_size)
    return {**total, "per_engine": per}


def split_agrees(per_engine: Sequence[dict] | None, engines: np.ndarray) -> bool:
    """Whether a split (the engine of each request) gives every engine as many requests as its own histograms
    counted, within ``SPLIT_COUNT_TOLERANCE``: then each engine's sums are fitted against its own sub-run."""
    if not per_engine:
        return False
    got = np.bincount(np.asarray(engines, np.int64), minlength=len(per_engine))
    return bool(len(got) == len(per_engine) and all(abs(g - e["count"]) <= SPLIT_COUNT_TOLERANCE * e["count"]
                                                    for g, e in zip(got, per_engine, strict=True)))


def step_groups(run: MeasuredRun) -> np.ndarray | None:
    """Per request, the label of its group of requests linked by identical engine timestamps (``scheduled_ts``,
    ``first_token_ts``, ``last_token_ts``): one engine's steps stamp all of their requests alike. ``None`` for a
    client-side run."""
    if run.client_side:
        return None
    n = len(run)
    parent = np.arange(n)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for cols in (("scheduled_ts",), ("first_token_ts", "last_token_ts")):  # one schedule() call; one output batch
        _link(run.requests, cols, parent, find)
    return np.array([find(i) for i in range(n)], dtype=np.int64)


def _link(requests: pd.DataFrame, cols: tuple[str, ...], parent: np.ndarray, find) -> None:
    seen: dict[float, int] = {}
    for col in cols:
        for i, v in enumerate(requests[col].to_numpy()):
            if v != v:  # nan: not recorded
                continue
            j = seen.setdefault(float(v), i)
            if j != i:
                a, b = find(i), find(j)
                if a != b:
                    parent[max(a, b)] = min(a, b)


def dp_capacity(cap: KVCapacity, runs: Sequence[MeasuredRun]) -> KVCapacity:
    """One engine's capacity from an estimate on a whole DP run: the KV-usage gauge estimate
    (``traces.kvcapacity``) divides the blocks held by every request in flight by the usage *averaged* over the
    engines, which gives all N engines' usable blocks; measured and memory-rule capacities are per engine already."""
    n = runs[0].engine.data_parallel_size
    if cap.method != "kv_usage_gauge" or n == 1:
        return cap
    blocks = int(round((cap.num_gpu_blocks - 1) / n)) + 1
    return replace(cap, num_gpu_blocks=blocks, detail={**cap.detail, "all_engines_usable_blocks": cap.num_gpu_blocks - 1},
                   source=cap.source + f"; the usage is the mean over {n} DP engines: usable blocks / {n} per engine")


def assign_engines(run: MeasuredRun, profile: sim.Profile, *, seed: int = 0) -> np.ndarray:
    """The engine (0..N-1) of each request (run order): the replay's choice, whole step groups kept together
    (``step_groups``: the majority of the group's requests decides, ties to the lower engine index)."""
    rec = simulate_run(run, profile, seed=seed).records
    engines = rec["replica"].reindex(range(len(run))).to_numpy(np.int64)
    groups = step_groups(run)
    if groups is None:
        return engines
    n = run.engine.data_parallel_size
    votes = np.zeros((len(run), n), np.int64)
    np.add.at(votes, (groups, engines), 1)
    return votes.argmax(axis=1)[groups]


def engine_timeseries(run: MeasuredRun, engine: int) -> pd.DataFrame | None:
    """The run's gauges of one engine in the run format's columns, or ``None`` when it recorded no per-engine
    columns (the throughputs are not per engine: ``nan``)."""
    ts = run.timeseries
    cols = [f"{k}_engine{engine}" for k in ("running", "waiting", "kv_cache_pct")]
    if ts is None or not all(c in ts.columns for c in cols):
        return None
    out = pd.DataFrame({"t": ts["t"], "prompt_throughput": np.nan, "gen_throughput": np.nan,
                        "running": ts[cols[0]], "waiting": ts[cols[1]], "kv_cache_pct": ts[cols[2]]})
    out = out[list(TIMESERIES_COLUMNS)].reset_index(drop=True)
    out["kv_cache_usage_perc"] = out["kv_cache_pct"] / 100.0
    return out


def split_by_engine(run: MeasuredRun, engines: np.ndarray) -> list[tuple[MeasuredRun, np.ndarray]]:
    """One sub-run per engine (a run of one engine: DP 1, that engine's capacity) and the indices of its
    requests in ``run``. Request offsets keep the whole run's origin, so every sub-run shares one clock."""
    n = run.engine.data_parallel_size
    per = per_engine_blocks(run)
    out = []
    for i in range(n):
        idx = np.flatnonzero(engines == i)
        if len(idx) == 0:
            raise ValueError(f"run {run.name}: the replay of its {n} DP engines sends no request to engine {i}; "
                             "too few requests to calibrate a data-parallel run")
        blocks = per[i] if per is not None else run.engine.num_gpu_blocks
        kv = {**(run.meta.kv_cache or {}), "num_gpu_blocks": blocks}
        kv.pop("num_gpu_blocks_per_engine", None)
        meta = replace(run.meta, kv_cache=kv if blocks is not None or run.meta.kv_cache else None,
                       engine_kwargs={**run.meta.engine_kwargs, "data_parallel_size": 1})
        settings = replace(run.engine, data_parallel_size=1, num_gpu_blocks=blocks, num_gpu_blocks_per_engine=None,
                           sources={**run.engine.sources, "data_parallel_size": f"engine {i} of run {run.name}"})
        sub = MeasuredRun(path=run.path, name=f"{run.name}[engine {i}]",
                          requests=run.requests.iloc[idx].reset_index(drop=True),
                          timeseries=engine_timeseries(run, i), meta=meta, engine=settings,
                          file_sha256=run.file_sha256, skipped=run.skipped)
        out.append((sub, idx))
    return out


def fit_data_parallel(runs: Sequence[MeasuredRun], masks: Sequence[np.ndarray], engine: sim.EngineConfig,
                      family: FitFamily, make_profile: Callable[[dict[str, float], float | None], sim.Profile],
                      *, seed: int = 0, engine_sums: Sequence[dict | None] | None = None,
                      ) -> tuple[list[MeasuredRun], list[np.ndarray], StepFit, dict]:
    """Assign, split and fit until the assignment settles (see the module docstring).

    Args:
        runs, masks: the runs (DP or not) and their fit masks.
        engine: the limits the reconstructions use (engine 0's capacity when the engines' capacities differ).
        family: the step-time family to fit (``traces.stepfit.FitFamily``; its ``start`` is the first guess).
        make_profile: ``(coefficients, client-side offset or None) -> Profile`` to replay the DP world with.
        seed: world seed of the replays.
        engine_sums: per run, its engine cores' sums (``dp_engine_sums``; a run without DP: its
            ``engine_phase_sums``), or ``None``.

    Returns:
        The sub-runs (a run without DP stays whole), their masks, the fit, and a report section.
    """
    coef = dict(family.start)
    offset, assigned, info = None, None, {"rounds": []}
    sums = list(engine_sums) if engine_sums is not None else [None] * len(runs)
    for rnd in range(MAX_ROUNDS):
        prof = make_profile(coef, offset)
        new = [assign_engines(r, prof, seed=seed) if r.engine.data_parallel_size > 1 else None for r in runs]
        changes = None if assigned is None else int(sum(int((a != b).sum()) for a, b in zip(assigned, new, strict=True)
                                                        if a is not None))
        if changes == 0:
            break
        assigned = new
        subs, sub_masks, origins = _split_all(runs, masks, assigned)
        fit_runs, modes = _fit_runs(runs, assigned, subs, sub_masks, origins, sums)
        fit = fit_step_model(fit_runs, engine, family, row_bin_s=ROW_BIN_S)
        coef = dict(fit.coefficients)
        offset = fit.offset_s
        info["rounds"].append({"round": rnd, "assignment_changes": changes,
                               "requests_per_engine": {r.name: [int((a == i).sum()) for i in range(r.engine.data_parallel_size)]
                                                       for r, a in zip(runs, assigned, strict=True) if a is not None},
                               "engine_sums": modes})
    info["method"] = ("each DP run split into one run per engine by replaying the whole DP world (vLLM's DP load "
                      "balancing, sim.dplb) at the current profile; the sub-runs fitted together on rows summed "
                      f"over {ROW_BIN_S:g} s; repeated while the assignment changed (at most {MAX_ROUNDS} fits)")
    info["sub_runs"] = [r.name for r in subs]
    info["engine_sums"] = modes
    return subs, sub_masks, fit, info


def _split_all(runs, masks, assigned) -> tuple[list[MeasuredRun], list[np.ndarray], list[tuple[int, int | None]]]:
    """The fit runs, their masks, and each one's (run index, engine or ``None`` for a run without DP)."""
    subs, sub_masks, origins = [], [], []
    for k, (run, mask, a) in enumerate(zip(runs, masks, assigned, strict=True)):
        if a is None:
            subs.append(run)
            sub_masks.append(mask)
            origins.append((k, None))
            continue
        for i, (sub, idx) in enumerate(split_by_engine(run, a)):
            subs.append(sub)
            sub_masks.append(np.asarray(mask, bool)[idx])
            origins.append((k, i))
    return subs, sub_masks, origins


def _fit_runs(runs, assigned, subs, sub_masks, origins, sums) -> tuple[list[FitRun], dict[str, str]]:
    """``FitRun``s of the sub-runs with their engine-core sums (module docstring): per engine when the split
    agrees with the engines' counts, else pooled over the run's engines; and, per run with sums, which."""
    out, modes = [], {}
    for sub, m, (k, i) in zip(subs, sub_masks, origins, strict=True):
        s, run = sums[k], runs[k]
        if s is None or i is None:
            out.append(FitRun.of(sub, m, engine_sums=s))
            continue
        per = s.get("per_engine")
        if split_agrees(per, assigned[k]):
            modes[run.name] = "per engine"
            mine = {"prefill_s": per[i]["prefill_s"], "decode_s": per[i]["decode_s"], "count": per[i]["count"]}
            out.append(FitRun.of(sub, m, engine_sums=mine))
        else:
            modes[run.name] = "total over engines" + ("" if per else " (no per-engine sums recorded)")
            whole = {"prefill_s": s["prefill_s"], "decode_s": s["decode_s"], "count": float(len(run))}
            out.append(FitRun.of(sub, m, engine_sums=whole, engine_sums_pool=run.name))
    return out, modes


def dp_final_errors(runs: Sequence[MeasuredRun], masks: Sequence[np.ndarray], replays: Sequence[SimulatedRun],
                    fit_runs: Sequence[MeasuredRun]) -> list[dict]:
    """Per fit run (a sub-run per engine, or a whole run without DP): the errors of its requests in the replay of
    its whole run (``latency_errors``), for the calibration report."""
    out = []
    for sub in fit_runs:
        k = next(j for j, r in enumerate(runs) if sub.name == r.name or sub.name.startswith(f"{r.name}[engine "))
        run, rec = runs[k], replays[k].records
        if sub is run:
            out.append(latency_errors(run, replays[k], masks[k]))
            continue
        pos = pd.Index(run.requests["request_id"]).get_indexer(sub.requests["request_id"])
        part = SimulatedRun(records=rec.iloc[pos].reset_index(drop=True), gauges=None, preemptions=0,
                            engine_steps=0, rejected=0)
        out.append(latency_errors(sub, part, np.asarray(masks[k], bool)[pos]))
    return out


#: statistics of a DP run under load-dependent routing that depend on the coordinator's timer phase more than on
#: the step times (``routing_envelope``): the TTFT mean and tail. The refinement of a calibration leaves them out;
#: the replay's bar holds them to the envelope.
ROUTING_DOMINATED = frozenset({("ttft_s", "mean"), ("ttft_s", "p90"), ("ttft_s", "p99")})


def routing_dominated(run: MeasuredRun) -> frozenset:
    """``ROUTING_DOMINATED`` for a DP run whose balancer reads the engines' published load (vLLM >= 0.27, MoE
    models before), else empty (one engine; the dense round robin of older releases does not depend on timing)."""
    if run.engine.data_parallel_size == 1:
        return frozenset()
    return ROUTING_DOMINATED if DP_RULES[dp_router(run)].engines_report else frozenset()


def routing_envelope(run: MeasuredRun, profile: sim.Profile, mask: np.ndarray, base: dict, *, seed: int = 0,
                     phases: int = ENVELOPE_PHASES) -> dict | None:
    """Where a routing-dominated statistic of a DP replay may fall, given that no run records where vLLM's DP
    coordinator timer falls: a 95 % prediction interval from ``phases`` replays with the timer shifted.

    Under vLLM >= 0.27 (and MoE models before) the balancer reads load snapshots the coordinator publishes every
    0.1 s, so which engine gets a request depends on sub-step timing. Replayed at the *true* profile of simulated
    2-engine runs near saturation (7.5 req/s, KV-bound), shifting only the coordinator's first poll by 10-90 ms
    moved held-out TTFT by -13 % to +48 % (mean) and -53 % to +101 % (p90), TPOT and E2E by less than 6 %; at
    the truth x 1.002 the measured TTFT p90 of one run was 6 % above every one of 12 shifted replays. A run is
    one draw of these realisations, so its TTFT mean and tail (``routing_dominated``) cannot be predicted closer
    than their spread by any profile. The interval: mean +- t(0.975, K-1) x sd x sqrt(1 + 1/K) of the K
    statistics in log space (a new draw falls in it 95 % of the time when they are log-normal), widened to the
    range of the K. The knob is ``poll_offset_s`` of ``sim.dplb.VllmDPRouter`` for rules whose engines report
    (a shift within the 0.1 s poll period), else ``publish_phase_s`` (the 5 s zero-snapshot grid of dense
    models before 0.27, which the replay assumes at 0).

    Args:
        run, profile: the DP run and the profile replayed (``base`` is that replay's ``latency_errors``).
        mask: the requests the statistics are taken over.
        base: ``latency_errors(run, replay at phase 0, mask)`` (the replay already made).

    Returns:
        ``None`` without data parallelism or when the routing does not depend on the engines' load; else the
        knob, the phases, and per routing-dominated statistic the measured value, the K simulated ones and the
        interval (``lo``, ``hi``).
    """
    dominated = routing_dominated(run)
    if not dominated:
        return None
    rule = DP_RULES[dp_router(run)]
    knob, period = "poll_offset_s", rule.stats_interval_s
    values = [period * k / phases for k in range(phases)]
    sims = [base] + [latency_errors(run, simulate_run(run, profile, seed=seed, router_options=((knob, v),)), mask)
                     for v in values[1:]]
    t = float(student_t.ppf(0.975, phases - 1))
    out: dict[str, dict] = {}
    for m, st in sorted(dominated):
        got = np.array([x[m][st]["simulated"] for x in sims], dtype=float)
        if not (got > 0).all():
            continue
        lg = np.log(got)
        half = t * lg.std(ddof=1) * np.sqrt(1 + 1 / phases)
        out.setdefault(m, {})[st] = {"measured": base[m][st]["measured"], "simulated": got.tolist(),
                                     "lo": float(min(np.exp(lg.mean() - half), got.min())),
                                     "hi": float(max(np.exp(lg.mean() + half), got.max()))}
    return {"knob": knob, "values_s": values, "metrics": out,
            "method": f"replays with vLLM's DP coordinator timer shifted by k/{phases} of its {period} s period (no "
                      "run records it); per routing-dominated statistic a 95 % prediction interval of one more "
                      "realisation (log space, Student t), widened to the replays' range"}
