"""The replay's core: a measured run through the simulated engines, and its errors against the measurement.

``simulate_run`` replays a ``MeasuredRun`` (one engine, or ``data_parallel_size`` behind vLLM's DP load
balancing); ``latency_errors`` and ``timeseries_mae`` compare it with the run. Calibration (``traces.calibrate``,
``traces.kvcapacity``, ``traces.dpsplit``) builds on these; ``traces.replay.replay_run`` (the validation, with
its held-out check and plots) sits on top of calibration. The module docstring of ``traces.replay`` says what
a replay compares and how.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

import sim
from sim.dplb import dp_router_name

from .runs import MeasuredRun, read_run

__all__ = ["METRICS", "STATS", "SimulatedRun", "as_run", "dp_router", "fit_mask", "latency_errors", "per_engine_blocks",
           "replay_pool", "replay_profile", "simulate_run", "timeseries_mae"]

METRICS = ("ttft_s", "tpot_s", "e2e_s")
STATS = ("mean", "p50", "p90", "p99")


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


def dp_router(run: MeasuredRun) -> str:
    """The ``sim.dplb`` router of the run's release (and MoE or not) for its DP engines."""
    return dp_router_name(run.meta.vllm_version, moe=_is_moe(run))


def replay_pool(profile: sim.Profile, run: MeasuredRun, name: str = "replay") -> sim.PoolSpec:
    """The pool a replay of ``run`` serves from: ``data_parallel_size`` engines of ``profile`` (already through
    ``replay_profile``) behind vLLM's DP load balancing of the run's release (``sim.dplb``), each with its
    recorded KV capacity; one engine without data parallelism."""
    e = run.engine
    if e.data_parallel_size == 1:
        return sim.PoolSpec(name=name, profile=profile)
    return sim.PoolSpec(name=name, profile=profile, replicas=e.data_parallel_size,
                        router=dp_router(run),
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


def simulate_run(run: MeasuredRun, profile: sim.Profile, *, seed: int = 0,
                 router_options: tuple[tuple[str, object], ...] = ()) -> SimulatedRun:
    """Replay ``run`` through the simulated engines of ``profile`` with the run's engine settings (one engine, or
    ``data_parallel_size`` behind vLLM's DP load balancing: ``replay_pool``). ``router_options`` go to a DP pool's
    router on top of the run's (e.g. the coordinator's timer phase, ``traces.dpsplit.routing_envelope``)."""
    prof, _ = replay_profile(profile, run)
    pool = replay_pool(prof, run)
    if pool.replicas > 1 and router_options:
        pool = replace(pool, router_options=(*pool.router_options, *router_options))
    off = run.offsets_s
    order = np.argsort(off, kind="stable")
    world = sim.make_world(pool, seed=seed, sample_interval_s=None)
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
