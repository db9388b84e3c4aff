"""Replay a measured run through the simulator and compare.

The replay injects every request at ``queued_ts - min(queued_ts)`` with its measured prompt and output lengths
(``docs/vllm.md#8-run-format``), on one replica with the run's engine settings (the profile supplies hardware,
model and step-time coefficients; see ``replay_profile``); a data-parallel run (``data_parallel_size`` > 1) on
that many replicas behind vLLM's own DP load balancing of the run's release (``replay_pool``, ``sim.dplb``).
Like is compared with like:

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
from pathlib import Path

import sim

from .calibrate import calibrate_run
from .dpsplit import routing_envelope
from .replay_core import (
    METRICS,
    STATS,
    SimulatedRun,
    as_run,
    fit_mask,
    latency_errors,
    per_engine_blocks,
    replay_pool,
    replay_profile,
    simulate_run,
    timeseries_mae,
)
from .runs import MeasuredRun

__all__ = ["METRICS", "STATS", "SimulatedRun", "fit_mask", "latency_errors", "measured_preemptions",
           "per_engine_blocks", "preemption_agreement", "replay_pool", "replay_profile", "replay_run", "simulate_run",
           "timeseries_mae"]

BAR_STATS = ("mean", "p50", "p90")


def _dp_report(run: MeasuredRun, used: sim.Profile) -> dict:
    pool = replay_pool(used, run)
    return {"data_parallel_size": pool.replicas, "router": pool.router,
            "api_server_count": run.engine.api_server_count,
            "num_gpu_blocks_per_engine": [e.num_gpu_blocks for e in pool.engines()]}


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


def _bar(metrics: dict, threshold_pct: float, envelope: dict | None = None) -> dict:
    """The accuracy bar over the defined errors; ``undefined`` lists the others (e.g. TPOT when every output is
    one token, TTFT when every measured TTFT is 0), which neither pass nor fail it. No defined error: failed.

    With a DP routing envelope (``traces.dpsplit.routing_envelope``) a routing-dominated statistic (a DP run's
    TTFT mean and tail under load-dependent balancing) beyond the threshold still passes when the measured value
    lies within the envelope's prediction interval widened by the threshold: the run is one realisation of a
    balancer whose timer no run records, as the real-engine bar accepts the engine's own run-to-run spread.
    ``passed_strict`` is the plain threshold; ``passed_by_routing_envelope`` lists what the envelope admitted."""
    all_errs = {f"{m}.{s}": metrics[m][s]["error_pct"] for m in METRICS for s in BAR_STATS}
    errs = {k: v for k, v in all_errs.items() if v is not None}
    worst = max(errs, key=lambda k: abs(errs[k])) if errs else None
    strict = {k for k, v in errs.items() if abs(v) <= threshold_pct}
    admitted = []
    for k in sorted(set(errs) - strict) if envelope is not None else ():
        m, st = k.split(".")
        e = envelope["metrics"].get(m, {}).get(st)
        slack = threshold_pct / 100 * abs(e["measured"]) if e else 0.0
        if e and e["lo"] - slack <= e["measured"] <= e["hi"] + slack:
            admitted.append(k)
    return {"threshold_pct": threshold_pct, "stats": list(BAR_STATS), "worst": worst,
            "worst_error_pct": errs[worst] if worst else None,
            "undefined": [k for k, v in all_errs.items() if v is None],
            "passed_strict": bool(errs) and len(strict) == len(errs),
            "passed_by_routing_envelope": admitted,
            "passed": bool(errs) and len(strict) + len(admitted) == len(errs)}


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
        cal = calibrate_run(run, fit_fraction=fit_fraction, seed=seed, hardware=prof.hardware, progress=progress)
        calibration = cal.report
        prof = cal.profile
    mask, split = fit_mask(run, fit_fraction)
    eval_mask = ~mask if fit_fraction is not None else mask
    simulated = simulate_run(run, prof, seed=seed)
    metrics = latency_errors(run, simulated, eval_mask)
    used, overrides = replay_profile(prof, run)
    envelope = routing_envelope(run, prof, eval_mask, metrics, seed=seed)
    out = {"run": run.name, "profile": prof.name, "fit_fraction": fit_fraction,
           "evaluated_requests": int(eval_mask.sum()), "split_s": split, "metrics": metrics,
           "timeseries_mae": timeseries_mae(run, simulated, from_s=split),
           "bar": _bar(metrics, 10.0 if fit_fraction is not None else 5.0, envelope),
           "simulated": {"preemptions": simulated.preemptions, "engine_steps": simulated.engine_steps,
                         "rejected": simulated.rejected},
           "preemptions": preemption_agreement(measured_preemptions(run), simulated.preemptions),
           "engine": {k: getattr(used.engine, k) for k in ("max_num_seqs", "max_num_batched_tokens",
                                                           "max_model_len", "block_size", "num_gpu_blocks")},
           "engine_overridden_by_run": overrides,
           "data_parallel": _dp_report(run, used),
           "routing_envelope": envelope,
           "kv_cache_recorded": run.kv_cache_recorded}
    if calibration is not None:
        out["calibration"] = calibration
    if plots_dir is not None:
        from .plots import save_replay_plots

        out["plots"] = save_replay_plots(run, simulated, plots_dir, eval_mask)
    return out

