"""Replay a measured run through the simulator and compare.

The replay injects every request at ``queued_ts - min(queued_ts)`` with its measured prompt and output lengths
(``vllm.md`` s.8), on one replica with the run's engine settings (the profile supplies hardware, model and
step-time coefficients; see ``replay_profile``). Like is compared with like:

* an **engine-side** run (vLLM's own timestamps): the request enters the engine at its offset, with the frontend
  and streaming overheads set to 0; TTFT = first token - queued, E2E = last token - queued;
* a **client-side** run (``MeasuredRun.client_side``, collected over HTTP): the offset is the client's send, the
  request reaches the engine ``overheads.frontend_s`` later (the profile's client-side constant: API server and
  HTTP), and TTFT = first token - send, E2E = last token - send, as the collector timed them (the last output
  chunk, so ``post_decode_s`` and ``per_output_token_s``, which the simulator adds after it, are left out).

TPOT is ``(last - first)/(n_out - 1)`` in both. It reports, for TTFT, TPOT and E2E,
the measured and simulated mean, p50, p90 and p99 and the signed error ``100 x (sim - measured)/measured``, and
the mean absolute error of the running / waiting / KV-usage time series at the run's ticks (KV usage as a
fraction 0-1; ``null`` when the run did not record it).

``replay_run(..., fit_fraction=F)`` is the held-out check: calibrate on the requests that arrived in the first
fraction F of the arrival window, then report errors on the others only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

import sim

from .runs import MeasuredRun, read_run

__all__ = ["METRICS", "STATS", "SimulatedRun", "fit_mask", "latency_errors", "measured_preemptions",
           "preemption_agreement", "replay_profile", "replay_run", "simulate_run", "timeseries_mae"]

METRICS = ("ttft_s", "tpot_s", "e2e_s")
STATS = ("mean", "p50", "p90", "p99")
BAR_STATS = ("mean", "p50", "p90")


def as_run(run_or_dir: MeasuredRun | str | Path) -> MeasuredRun:
    return run_or_dir if isinstance(run_or_dir, MeasuredRun) else read_run(run_or_dir)


def fit_mask(run: MeasuredRun, fit_fraction: float | None) -> tuple[np.ndarray, float | None]:
    """Requests used for fitting (arrived within the first ``fit_fraction`` of the arrival window) and the split
    time in replay seconds; all requests and ``None`` without a fraction."""
    if fit_fraction is None:
        return np.ones(len(run), bool), None
    if not 0 < fit_fraction < 1:
        raise ValueError(f"fit_fraction must be in (0, 1), got {fit_fraction!r}")
    off = run.offsets_s
    split = float(fit_fraction * off.max())
    mask = off <= split
    if mask.sum() < 10 or (~mask).sum() < 10:
        raise ValueError(f"fit_fraction {fit_fraction} leaves {int(mask.sum())} fit and {int((~mask).sum())} "
                         "held-out requests; each part needs at least 10")
    return mask, split


def replay_profile(profile: sim.Profile, run: MeasuredRun | None = None) -> tuple[sim.Profile, dict]:
    """The profile as a replay of ``run`` uses it, and the engine settings the run overrode.

    Overheads: none for an engine-side run; only the profile's ``frontend_s`` for a client-side one (see the
    module docstring). The engine limits are the run's (the profile supplies hardware, model and latency): every
    setting the run records replaces the profile's, and ``num_gpu_blocks`` only when measured (an unrecorded
    capacity keeps the profile's).
    """
    client = run is not None and run.client_side
    prof = profile.replace(overheads=sim.Overheads(frontend_s=profile.overheads.frontend_s if client else 0.0))
    if run is None:
        return prof, {}
    e, cfg = run.engine, prof.engine
    want = {"max_num_seqs": e.max_num_seqs, "max_num_batched_tokens": e.max_num_batched_tokens,
            "block_size": e.block_size, "enable_prefix_caching": e.enable_prefix_caching,
            "scheduler_reserve_full_isl": e.scheduler_reserve_full_isl,
            "long_prefill_token_threshold": e.long_prefill_token_threshold}
    if e.num_gpu_blocks is not None:
        want["num_gpu_blocks"] = e.num_gpu_blocks
    if e.max_model_len is not None:
        want["max_model_len"] = e.max_model_len
    blocks = want.get("num_gpu_blocks", cfg.num_gpu_blocks)
    cap_tokens = (blocks - 1) * want["block_size"]
    want["max_model_len"] = min(want.get("max_model_len", cfg.max_model_len), cap_tokens)
    changed = {k: {"profile": getattr(cfg, k), "run": v} for k, v in want.items() if getattr(cfg, k) != v}
    return prof.replace(engine=replace(cfg, **want)), changed


@dataclass(frozen=True, eq=False, kw_only=True)
class SimulatedRun:
    """A replay: per-request records in the run's request order (``ttft_s``, ``tpot_s``, ``e2e_s`` as the run
    defines them: client-side for a client-side run), and gauges at the run's ticks."""

    records: pd.DataFrame
    gauges: pd.DataFrame | None
    preemptions: int
    engine_steps: int
    rejected: int


def simulate_run(run: MeasuredRun, profile: sim.Profile, *, seed: int = 0) -> SimulatedRun:
    """Replay ``run`` through one simulated replica of ``profile`` with the run's engine settings."""
    prof, _ = replay_profile(profile, run)
    world = sim.make_world(sim.PoolSpec(name="replay", profile=prof), seed=seed, sample_interval_s=None)
    off = run.offsets_s
    order = np.argsort(off, kind="stable")
    sim.Workload(pool="replay", arrivals=sim.TraceArrivals(off[order]), name="replay", id_prefix="",
                 prompt_tokens=run.prompt_tokens[order], output_tokens=run.output_tokens[order]).start(world)
    gauges = _sample_ticks(run, world)
    world.run_until_idle()
    if gauges is not None and run.timeseries is not None and len(run.timeseries):
        last_tau = float(run.timeseries["t"].iloc[-1]) * run.meta.tick_seconds + run.tick_origin_s
        if last_tau >= world.now:  # ticks after the last request still read the (idle) gauges
            world.run(until=last_tau + 1e-9)
    df = world.records.to_dataframe()
    df["k"] = order[df["request_id"].astype(int).to_numpy()]
    df = df.set_index("k").sort_index()
    if run.client_side:  # as the collector times them: from the send to the first / last output chunk
        df["ttft_s"] = df["first_token_s"] - df["arrival_s"]
        df["e2e_s"] = df["last_token_s"] - df["arrival_s"]
    core = world.replicas[0].core
    return SimulatedRun(records=df, gauges=None if gauges is None else pd.DataFrame(gauges),
                        preemptions=core.num_preemptions, engine_steps=core.num_steps,
                        rejected=world.num_rejected)


def _sample_ticks(run: MeasuredRun, world: sim.World) -> dict | None:
    """Schedule gauge reads at the run's tick times (replay clock); the dict fills as the world runs."""
    ts = run.timeseries
    if ts is None:
        return None
    rep = world.replicas[0]
    out: dict[str, list] = {"t": [], "running": [], "waiting": [], "kv_cache_usage_perc": []}
    for t in ts["t"].to_numpy():
        tau = float(t) * run.meta.tick_seconds + run.tick_origin_s
        if tau < 0:
            continue

        def read(_ev, t=float(t), tau=tau):
            g = rep.gauges(tau)
            out["t"].append(t)
            out["running"].append(g["num_requests_running"])
            out["waiting"].append(g["num_requests_waiting"])
            out["kv_cache_usage_perc"].append(g["kv_cache_usage_perc"])

        world.env.call_at(tau, read)
    return out


def _stats(x: np.ndarray) -> dict[str, float]:
    return {"mean": float(np.mean(x)), "p50": float(np.percentile(x, 50)), "p90": float(np.percentile(x, 90)),
            "p99": float(np.percentile(x, 99))}


def latency_errors(run: MeasuredRun, simulated: SimulatedRun, mask: np.ndarray | None = None) -> dict:
    """Measured vs simulated statistics and signed errors (%) of TTFT, TPOT and E2E over the ``mask`` requests."""
    m = np.ones(len(run), bool) if mask is None else np.asarray(mask, bool)
    rec = simulated.records
    done = (rec["status"] == "FINISHED_LENGTH_CAPPED").reindex(range(len(run)), fill_value=False).to_numpy()
    if not done[m].all():
        raise ValueError(f"{int((~done[m]).sum())} replayed requests did not finish (rejected by the profile's "
                         "limits?); the replay is not comparable")
    out = {}
    multi = run.output_tokens > 1
    for metric in METRICS:
        sel = m & multi if metric == "tpot_s" else m
        meas = _stats(run.requests[metric].to_numpy()[sel])
        simu = _stats(rec[metric].to_numpy()[sel])
        out[metric] = {s: {"measured": meas[s], "simulated": simu[s],
                           "error_pct": 100.0 * (simu[s] - meas[s]) / meas[s] if meas[s] else None} for s in STATS}
    return out


def timeseries_mae(run: MeasuredRun, simulated: SimulatedRun, *, from_s: float | None = None) -> dict:
    """Mean absolute error of running, waiting and KV usage (fraction) at the run's ticks.

    KV usage is ``None`` when the run did not record it (an all-zero column is not a measurement).
    """
    keys = ("running", "waiting", "kv_cache_usage_perc")
    if run.timeseries is None or simulated.gauges is None or len(simulated.gauges) == 0:
        return dict.fromkeys(keys)
    g = simulated.gauges.set_index("t")
    ts = run.timeseries.set_index("t")
    tau = ts.index.to_numpy() * run.meta.tick_seconds + run.tick_origin_s
    keep = ts.index.isin(g.index) & (tau >= (from_s if from_s is not None else -np.inf))
    ts, g = ts[keep], g.loc[ts.index[keep]]
    out = {}
    for k in keys:
        if k == "kv_cache_usage_perc" and not run.kv_cache_recorded:
            out[k] = None
        else:
            d = np.abs(g[k].to_numpy() - ts[k].to_numpy())
            d = d[np.isfinite(d)]  # ticks whose scrape failed carry nan: not measured
            out[k] = float(np.mean(d)) if len(d) else None
    out["ticks"] = int(len(ts))
    return out


def measured_preemptions(run: MeasuredRun) -> int | None:
    """Recompute preemptions the server counted during the run (``meta.collector.preemptions``, from
    ``vllm:num_preemptions_total``, written by ``traces.collect``); ``None`` for runs that did not record it."""
    col = run.meta.extra.get("collector")
    v = col.get("preemptions") if isinstance(col, dict) else None
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def preemption_agreement(measured: int | None, simulated: int, *, rel: float = 0.10, abs_: int = 3) -> dict:
    """Measured vs simulated preemptions over the whole run; they agree within ``rel`` or ``abs_`` preemptions."""
    if measured is None:
        return {"measured": None, "simulated": simulated, "error_pct": None, "agree": None}
    diff = simulated - measured
    return {"measured": measured, "simulated": simulated,
            "error_pct": 100.0 * diff / measured if measured else None,
            "agree": abs(diff) <= max(abs_, rel * measured), "tolerance": f"{rel:.0%} or {abs_} preemptions"}


def _bar(metrics: dict, threshold_pct: float) -> dict:
    errs = {f"{m}.{s}": metrics[m][s]["error_pct"] for m in METRICS for s in BAR_STATS}
    worst = max(errs, key=lambda k: abs(errs[k]))
    return {"threshold_pct": threshold_pct, "stats": list(BAR_STATS), "worst": worst,
            "worst_error_pct": errs[worst], "passed": all(abs(v) <= threshold_pct for v in errs.values())}


def replay_run(run_or_dir: MeasuredRun | str | Path, profile: sim.Profile | str | Path, *,
               fit_fraction: float | None = None, seed: int = 0, plots_dir: str | Path | None = None,
               progress: Callable[[int], None] | None = None) -> dict:
    """Replay a run and compare (the ``maslat replay --json`` object).

    Args:
        run_or_dir: a ``MeasuredRun`` or its directory.
        profile: the profile to replay (a ``sim.Profile``, an embedded name or a path). With ``fit_fraction`` it
            only supplies the hardware and model; the coefficients are calibrated on the fit part.
        fit_fraction: held-out check (see the module docstring); ``None`` compares on every request.
        seed: world seed (the replay itself draws no random numbers).
        plots_dir: also write the CDF and queue plots there (paths under ``"plots"``).
        progress: passed to the calibration of a held-out check (called once per refinement replay).
    """
    run = as_run(run_or_dir)
    prof = profile if isinstance(profile, sim.Profile) else sim.load_profile(profile)
    calibration = None
    if fit_fraction is not None:
        from .calibrate import calibrate_run

        cal = calibrate_run(run, fit_fraction=fit_fraction, seed=seed, hardware=prof.hardware, progress=progress)
        calibration = cal.report
        prof = cal.profile
    mask, split = fit_mask(run, fit_fraction)
    eval_mask = ~mask if fit_fraction is not None else mask
    simulated = simulate_run(run, prof, seed=seed)
    metrics = latency_errors(run, simulated, eval_mask)
    used, overrides = replay_profile(prof, run)
    out = {"run": run.name, "profile": prof.name, "fit_fraction": fit_fraction,
           "evaluated_requests": int(eval_mask.sum()), "split_s": split, "metrics": metrics,
           "timeseries_mae": timeseries_mae(run, simulated, from_s=split),
           "bar": _bar(metrics, 10.0 if fit_fraction is not None else 5.0),
           "simulated": {"preemptions": simulated.preemptions, "engine_steps": simulated.engine_steps,
                         "rejected": simulated.rejected},
           "preemptions": preemption_agreement(measured_preemptions(run), simulated.preemptions),
           "engine": {k: getattr(used.engine, k) for k in ("max_num_seqs", "max_num_batched_tokens",
                                                           "max_model_len", "block_size", "num_gpu_blocks")},
           "engine_overridden_by_run": overrides,
           "kv_cache_recorded": run.kv_cache_recorded}
    if calibration is not None:
        out["calibration"] = calibration
    if plots_dir is not None:
        from .plots import save_replay_plots

        out["plots"] = save_replay_plots(run, simulated, plots_dir, eval_mask)
    return out

