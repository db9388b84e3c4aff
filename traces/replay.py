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
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

import sim
from sim.dplb import dp_router_name

from .runs import MeasuredRun, read_run

__all__ = ["METRICS", "STATS", "SimulatedRun", "fit_mask", "latency_errors", "measured_preemptions",
           "per_engine_blocks", "preemption_agreement", "replay_pool", "replay_profile", "replay_run", "simulate_run",
           "timeseries_mae"]

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
    capacity or block size keeps the profile's).
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
    if not e.recorded("block_size"):  # vLLM's default assumed: the profile's (inferred by the calibration) stays
        del want["block_size"]
    if e.max_model_len is not None:
        want["max_model_len"] = e.max_model_len
    blocks = min(per_engine_blocks(run) or (want.get("num_gpu_blocks", cfg.num_gpu_blocks),))
    cap_tokens = (blocks - 1) * want.get("block_size", cfg.block_size)
    want["max_model_len"] = min(want.get("max_model_len", cfg.max_model_len), cap_tokens)
    changed = {k: {"profile": getattr(cfg, k), "run": v} for k, v in want.items() if getattr(cfg, k) != v}
    return prof.replace(engine=replace(cfg, **want)), changed


def per_engine_blocks(run: MeasuredRun) -> tuple[int, ...] | None:
    """The run's per-engine KV capacities when it recorded them for a data-parallel server, else ``None``."""
    per = run.engine.num_gpu_blocks_per_engine
    return per if per is not None and run.engine.data_parallel_size > 1 else None


def _is_moe(run: MeasuredRun) -> bool:
    """Whether the served model is a mixture of experts, as far as ``meta.json`` says (expert parallelism on, or
    an expert count in the resolved model config); vLLM balances DP engines of MoE models differently."""
    if run.meta.engine_kwargs.get("enable_expert_parallel") is True:
        return True
    mc = (run.meta.resolved_config or {}).get("model_config")
    hf = mc.get("hf_config") if isinstance(mc, dict) else None
    keys = ("num_experts", "num_local_experts", "n_routed_experts")
    return isinstance(hf, dict) and any(isinstance(hf.get(k), int) and hf[k] > 1 for k in keys)


def replay_pool(profile: sim.Profile, run: MeasuredRun, name: str = "replay") -> sim.PoolSpec:
    """The pool a replay of ``run`` serves from: ``data_parallel_size`` engines of ``profile`` (already through
    ``replay_profile``) behind vLLM's DP load balancing of the run's release (``sim.dplb``), each with its
    recorded KV capacity; one engine without data parallelism."""
    e = run.engine
    if e.data_parallel_size == 1:
        return sim.PoolSpec(name=name, profile=profile)
    return sim.PoolSpec(name=name, profile=profile, replicas=e.data_parallel_size,
                        router=dp_router_name(run.meta.vllm_version, moe=_is_moe(run)),
                        router_options=(("api_servers", e.api_server_count),),
                        num_gpu_blocks_per_replica=per_engine_blocks(run))


@dataclass(frozen=True, eq=False, kw_only=True)
class SimulatedRun:
    """A replay: per-request records in the run's request order (``ttft_s``, ``tpot_s``, ``e2e_s`` as the run
    defines them: client-side for a client-side run; ``replica`` = the engine that served it), and gauges at
    the run's ticks (summed over engines, KV usage averaged, as a scrape reads a DP server; with data
    parallelism also ``running_engine<i>``, ``waiting_engine<i>``, ``kv_cache_usage_perc_engine<i>``).
    ``preemptions`` and ``engine_steps`` are summed over the engines."""

    records: pd.DataFrame
    gauges: pd.DataFrame | None
    preemptions: int
    engine_steps: int
    rejected: int


def simulate_run(run: MeasuredRun, profile: sim.Profile, *, seed: int = 0) -> SimulatedRun:
    """Replay ``run`` through the simulated engines of ``profile`` with the run's engine settings (one engine, or
    ``data_parallel_size`` behind vLLM's DP load balancing: ``replay_pool``)."""
    prof, _ = replay_profile(profile, run)
    world = sim.make_world(replay_pool(prof, run), seed=seed, sample_interval_s=None)
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
    cores = [r.core for r in world.replicas]
    return SimulatedRun(records=df, gauges=None if gauges is None else pd.DataFrame(gauges),
                        preemptions=sum(c.num_preemptions for c in cores), engine_steps=sum(c.num_steps for c in cores),
                        rejected=world.num_rejected)


def _sample_ticks(run: MeasuredRun, world: sim.World) -> dict | None:
    """Schedule gauge reads at the run's tick times (replay clock); the dict fills as the world runs."""
    ts = run.timeseries
    if ts is None:
        return None
    reps = world.replicas
    keys = ("running", "waiting", "kv_cache_usage_perc")
    out: dict[str, list] = {k: [] for k in ("t", *keys)}
    if len(reps) > 1:
        out.update({f"{k}_engine{i}": [] for i in range(len(reps)) for k in keys})
    for t in ts["t"].to_numpy():
        tau = float(t) * run.meta.tick_seconds + run.tick_origin_s
        if tau < 0:
            continue

        def read(_ev, t=float(t), tau=tau):
            gs = [rep.gauges(tau) for rep in reps]
            vals = [(g["num_requests_running"], g["num_requests_waiting"], g["kv_cache_usage_perc"]) for g in gs]
            out["t"].append(t)
            out["running"].append(sum(v[0] for v in vals))
            out["waiting"].append(sum(v[1] for v in vals))
            out["kv_cache_usage_perc"].append(sum(v[2] for v in vals) / len(vals))
            if len(reps) > 1:
                for i, v in enumerate(vals):
                    for k, x in zip(keys, v, strict=True):
                        out[f"{k}_engine{i}"].append(x)

        world.env.call_at(tau, read)
    return out


def _stats(x: np.ndarray) -> dict[str, float | None]:
    """Mean and percentiles; all ``None`` for no values (TPOT of a run whose outputs are all one token)."""
    if len(x) == 0:
        return dict.fromkeys(STATS)
    return {"mean": float(np.mean(x)), "p50": float(np.percentile(x, 50)), "p90": float(np.percentile(x, 90)),
            "p99": float(np.percentile(x, 99))}


def _error_pct(simulated: float | None, measured: float | None) -> float | None:
    """Signed error in %; ``None`` where it is undefined (no values, or a measured 0)."""
    if simulated is None or not measured:
        return None
    return 100.0 * (simulated - measured) / measured


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
        out[metric] = {s: {"measured": meas[s], "simulated": simu[s], "error_pct": _error_pct(simu[s], meas[s])}
                       for s in STATS}
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
    engines = [i for i in range(len(g.columns)) if f"running_engine{i}" in g.columns and f"running_engine{i}" in ts]
    if engines:  # a DP run that recorded per-engine gauges: engine label i is replica i (vLLM's rank order)
        out["per_engine"] = {str(i): _mae_engine(ts, g, i, run.kv_cache_recorded) for i in engines}
    return out


def _mae_engine(ts: pd.DataFrame, g: pd.DataFrame, i: int, kv_recorded: bool) -> dict:
    out = {}
    for k, col in (("running", "running"), ("waiting", "waiting"), ("kv_cache_usage_perc", "kv_cache_usage_perc")):
        name = f"{col}_engine{i}"
        if name not in ts or (k == "kv_cache_usage_perc" and not kv_recorded):
            out[k] = None
            continue
        d = np.abs(g[name].to_numpy(float) - ts[name].to_numpy(float))
        d = d[np.isfinite(d)]
        out[k] = float(np.mean(d)) if len(d) else None
    return out


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


def _bar(metrics: dict, threshold_pct: float) -> dict:
    """The accuracy bar over the defined errors; ``undefined`` lists the others (e.g. TPOT when every output is
    one token, TTFT when every measured TTFT is 0), which neither pass nor fail it. No defined error: failed."""
    all_errs = {f"{m}.{s}": metrics[m][s]["error_pct"] for m in METRICS for s in BAR_STATS}
    errs = {k: v for k, v in all_errs.items() if v is not None}
    worst = max(errs, key=lambda k: abs(errs[k])) if errs else None
    return {"threshold_pct": threshold_pct, "stats": list(BAR_STATS), "worst": worst,
            "worst_error_pct": errs[worst] if worst else None,
            "undefined": [k for k, v in all_errs.items() if v is None],
            "passed": bool(errs) and all(abs(v) <= threshold_pct for v in errs.values())}


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
           "data_parallel": _dp_report(run, used),
           "kv_cache_recorded": run.kv_cache_recorded}
    if calibration is not None:
        out["calibration"] = calibration
    if plots_dir is not None:
        from .plots import save_replay_plots

        out["plots"] = save_replay_plots(run, simulated, plots_dir, eval_mask)
    return out

