"""Calibrate a serving profile from measured vLLM runs: ``calibrate_runs``/``calibrate_run`` (the command
line is ``maslat calibrate``, ``maslat/commands/calibrate.py``).

Pipeline (each step general: nothing here knows a particular run, GPU or model):

1. **Settings.** The runs' engine limits (``traces.meta``; several runs must agree); the hardware from
   ``--gpu-spec`` / ``gpu=`` / ``meta.hardware.device_name`` / the run's name (catalogue GPUs in
   ``sim.catalog``; a CPU run has no table peak); the model's shape from ``--model-config``, the served
   model directory, the local Hugging Face cache or the catalogue (``traces.shape``). The report names both
   sources (``model_source``, ``hardware_source``).
2. **Step-time family.** The physics model (``sim.latency.PhysicsStepModel``) when both the hardware and the
   model's shape are known; otherwise, automatically, the shape-free ``sim.latency_linear.LinearStepModel``,
   fitted from the reconstructed batches alone (``report["step_time_model"]`` and ``["step_time_model_reason"]``
   say which and why; ``step_time_model=`` forces one).
3. **KV capacity and block size.** ``num_gpu_blocks`` as measured, or estimated and labelled so; a block size the
   run does not record is inferred from the KV-usage gauge; with neither a memory rule nor a gauge the capacity
   is treated as not binding, and said so (``traces.kvcapacity``).
4. **Reconstruction and NNLS** (``traces.stepfit``): what the engine did, step by step, from the per-request
   timestamps, and the step-time coefficients of the chosen family fitted on whole-step spans. A data-parallel
   run is split into one run per engine first (``traces.dpsplit``).
   For client-side runs (collected over HTTP by ``traces.collect``: no ``scheduled_ts``, TTFT and E2E include
   the API server and HTTP) the fit also estimates the client-side constant, which becomes the profile's
   ``overheads.frontend_s``.
5. **Refinement.** A deterministic Nelder-Mead over three multipliers (per-step/per-request base cost, decode
   context cost, prefill cost: ``FitFamily.multipliers``; plus the client-side constant for client-side runs) replays every run in
   the simulator and minimises the squared log errors of TTFT, TPOT and E2E (mean, p50, p90; p99 at a quarter
   weight) against the measured distributions, summed over the runs. A client-side run is replayed and compared
   client-side (``traces.replay``); where its collector recorded the engine core's own prefill and decode sums, their
   replay errors join the objective (``_engine_phase_loss``), so that the server's delivery delays to the client
   (``traces.delivery``) are not priced into the step times. The refinement lives in ``traces.calrefine``.

Several runs of one server (``calibrate_runs``: say, a light load that fixes the prefill cost and the
client-side constant and a heavy one that fixes the batching costs) are reconstructed separately and fitted
together. With ``fit_fraction`` only the requests that arrived in the first part of each run's arrival window
contribute measurements (timestamps, latencies, KV gauge); the replays still carry every request (the workload).

A data-parallel run (``data_parallel_size`` > 1: several engines behind one API server) is split into one run per
engine for step 3 (``traces.dpsplit``: the engine of each request from a replay of the whole DP world behind vLLM's
DP load balancing, ``sim.dplb``); steps 4 and the final check replay the whole DP world.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

import sim

from .calrefine import (  # noqa: F401 (re-exported: the refinement's names, importable from here)
    _STAT_WEIGHTS,
    ENGINE_PHASE_WEIGHT,
    EVALS_PER_MULTIPLIER,
    JITTER_CORR_STEPS,
    JITTER_MULTIPLIER,
    JITTER_SIGMA0,
    JITTER_WHEN_RESIDUAL,
    MULTIPLIERS,
    OFFSET_MULTIPLIER,
    REFINE_ANCHOR_WEIGHT,
    _apply,
    _engine_phase_loss,
    _multiplier_names,
    _objective,
    _refine,
    _scaled,
    _wants_jitter,
)
from .calreport import OVERHEAD_SOURCE, format_report, profile_provenance, report
from .dpsplit import dp_capacity, dp_engine_sums, dp_final_errors, fit_data_parallel
from .enginelatency import engine_phase_sums, offsets_disagree, pooled_offset, run_engine_ttfts
from .hardware import GpuEntry, ModelEntry
from .kvcapacity import KVCapacity, kv_capacity, refine_capacity_by_replay
from .replay_core import as_run, fit_mask, latency_errors, simulate_run
from .runs import MeasuredRun
from .shape import STEP_TIME_CHOICES, Shape, family_choice, resolve_shape_of_runs
from .stepfit import FitRun, StepFit, fit_step_model, physics_family
from .stepfit_linear import linear_family

__all__ = ["CalibrationResult", "MULTIPLIERS", "PRIOR_OVERHEADS", "STEP_TIME_CHOICES", "Shape", "calibrate_run",
           "calibrate_runs", "format_report"]

#: Per-request overheads outside the engine, from BLIS (docs/latency_physics.md#4-step-time-model). An
#: engine-side run cannot identify any of them; a client-side run identifies ``frontend_s`` (fitted) but not
#: the other two, which the simulator adds after the last output chunk, where the collector stops timing.
PRIOR_OVERHEADS = sim.Overheads(frontend_s=0.0156, post_decode_s=0.00078, per_output_token_s=46e-6)



@dataclass(frozen=True, eq=False, kw_only=True)
class CalibrationResult:
    """A calibrated profile and the report of how it was obtained (JSON-ready); ``fit`` holds the NNLS rows."""

    profile: sim.Profile
    report: dict
    fit: StepFit | None = None


def _capacity(runs: Sequence[MeasuredRun], gpu_entry: GpuEntry | None, model: ModelEntry | None,
              splits: Sequence[float | None]) -> KVCapacity:
    """One capacity for all runs: the measured one (runs that record it must agree), else the first estimate."""
    caps = [kv_capacity(r, gpu_entry, model, until_s=s, max_model_len=_max_model_len(r, model)[0])
            for r, s in zip(runs, splits, strict=True)]
    measured = {c.num_gpu_blocks for c in caps if c.measured}
    if len(measured) > 1:
        raise ValueError(f"the runs record different KV capacities (num_gpu_blocks {sorted(measured)}); they were "
                         "not served by the same engine")
    return next((c for c in caps if c.measured), caps[0])


def _engine(runs: Sequence[MeasuredRun], model: ModelEntry | None,
            cap: KVCapacity) -> tuple[sim.EngineConfig, dict[str, str]]:
    configs = [_engine_of(r, model, cap) for r in runs]
    first, sources = configs[0]
    for (cfg, _), run in zip(configs[1:], runs[1:], strict=True):
        diff = {k: (getattr(first, k), getattr(cfg, k)) for k in first.__dataclass_fields__
                if getattr(first, k) != getattr(cfg, k)}
        if diff:
            raise ValueError(f"runs {runs[0].name} and {run.name} were served with different engine settings "
                             f"{diff}; calibrate them separately")
    if len({r.engine.tensor_parallel_size for r in runs}) > 1:
        raise ValueError("the runs were served at different tensor-parallel degrees; calibrate them separately")
    return first, sources


def _max_model_len(run: MeasuredRun, model: ModelEntry | None) -> tuple[int, str]:
    """The run's ``max_model_len``: recorded, else the model's default, else (model unknown) its longest request."""
    e = run.engine
    if e.max_model_len is not None:
        return e.max_model_len, f"run {run.name}: {e.sources['max_model_len']}"
    if model is not None:
        return model.max_position_embeddings, (f"model default ({model.sources.get('max_position_embeddings')}); "
                                               "the run's max_model_len is null")
    longest = int((run.prompt_tokens + run.output_tokens).max(initial=1))
    return longest, (f"the longest request of run {run.name} ({longest} tokens): the run records no max_model_len "
                     "and the model is unknown")


def _engine_of(run: MeasuredRun, model: ModelEntry | None,
               cap: KVCapacity) -> tuple[sim.EngineConfig, dict[str, str]]:
    e, src = run.engine, run.engine.sources
    if e.policy != "fcfs":
        raise ValueError(f"run {run.name}: scheduling policy {e.policy!r} is not simulated (FCFS only)")
    mml, mml_src = _max_model_len(run, model)
    cap_tokens = (cap.num_gpu_blocks - 1) * cap.block_size
    if mml > cap_tokens:
        mml, mml_src = cap_tokens, mml_src + f"; capped at the KV capacity ({cap_tokens} tokens)"
    # the scheduler rules of the run's vLLM release (sim.config.VLLM_BEHAVIOURS); 0.19.0's when not recorded
    version = run.meta.vllm_version or "0.19.0"
    try:
        sim.config.parse_vllm_version(version)
    except ValueError as err:
        raise ValueError(f"run {run.name}: meta.json vllm_version {version!r} is not a vLLM release "
                         f"(write it as '0.19.0')") from err
    cfg = sim.EngineConfig(max_num_seqs=e.max_num_seqs, max_num_batched_tokens=e.max_num_batched_tokens,
                           max_model_len=mml, block_size=cap.block_size, num_gpu_blocks=cap.num_gpu_blocks,
                           enable_prefix_caching=e.enable_prefix_caching,
                           scheduler_reserve_full_isl=e.scheduler_reserve_full_isl,
                           long_prefill_token_threshold=e.long_prefill_token_threshold, vllm_version=version)
    sources = {f"engine.{k}": f"run {run.name}: {src[k]}" for k in
               ("max_num_seqs", "max_num_batched_tokens", "enable_prefix_caching",
                "scheduler_reserve_full_isl", "long_prefill_token_threshold")}
    sources["engine.block_size"] = cap.block_size_source
    sources["engine.max_model_len"] = mml_src
    sources["engine.num_gpu_blocks"] = cap.source
    sources["engine.vllm_version"] = (f"run {run.name}: meta.vllm_version" if run.meta.vllm_version
                                      else "not recorded in meta.json; 0.19.0's scheduler rules")
    return cfg, sources


def _gauge_peak(runs: Sequence[MeasuredRun], splits: Sequence[float | None]) -> float:
    """The highest recorded KV usage (fraction) in the fit part of the runs (0 without a gauge)."""
    peak = 0.0
    for r, split in zip(runs, splits, strict=True):
        if r.kv_cache_recorded:
            ts = r.timeseries
            tau = ts["t"].to_numpy() * r.meta.tick_seconds + r.tick_origin_s
            use = ts["kv_cache_usage_perc"].to_numpy()[tau <= (split if split is not None else np.inf)]
            peak = max(peak, float(np.nanmax(use, initial=0.0)))
    return peak


def _replay_capacity(runs, splits, shape: Shape, hw, cap: KVCapacity, fit: StepFit, fit_runs, seed: int):
    """A capacity estimated from the gauge (or, for client-side times, only bounded), found by replaying the fit
    (``kvcapacity.refine_capacity_by_replay``), then the step times refitted at it; a bound is searched widely
    and then narrowed in two more rounds (the fit at the bound saw no preemptions). Returns the new capacity,
    engine, engine sources and fit."""
    engine, sources = _engine(runs, shape.model, cap)
    wide = cap.method == "not_binding"  # no estimate to start from (client-side times): search below the bound
    first = None
    for k in range(3 if wide else 1):
        prof = sim.Profile(name="capacity", hardware=hw, model=None if shape.model is None else shape.model.spec,
                           parallel=sim.ParallelConfig(tensor_parallel_size=runs[0].engine.tensor_parallel_size),
                           engine=engine, overheads=_overheads(fit, runs)[0], latency_model=fit.family.latency_model,
                           latency_coefficients=dict(fit.coefficients))
        blocks, detail = refine_capacity_by_replay(runs, splits, prof, seed=seed, factors=(
            (1 / 64, 1.0) if wide and k == 0 else (0.67, 1.5)), points=19 if wide and k == 0 else 9)
        if not detail:
            return cap, engine, sources, fit
        first = first or detail
        cap = replace(cap, num_gpu_blocks=blocks)
        engine, sources = _engine(runs, shape.model, cap)
        fit = fit_step_model(fit_runs, engine, replace(fit.family, start=dict(fit.coefficients)))
    how = (f"the capacity whose replay with the fitted step times best reproduces the recorded gauge "
           f"({first['start_blocks']} -> {blocks} blocks, gauge MAE {first['gauge_mae_start']:.4f} -> "
           f"{detail['gauge_mae']:.4f}, {k + 1} round(s) of search and refit)")
    cap = replace(cap, detail={**cap.detail, "replay": detail}, method="kv_usage_gauge",
                  source=(f"INFERRED from the trace by replay (the run records no num_gpu_blocks, and its client-side "
                          f"times do not say when the engine held the tokens): {how}" if wide else
                          f"{cap.source}; refined by replay: {how}"))
    return cap, engine, _engine(runs, shape.model, cap)[1], fit


def _overheads(fit: StepFit, runs: Sequence[MeasuredRun]) -> tuple[sim.Overheads, str]:
    pooled = pooled_offset(runs, fit.measured_offsets_s)
    if fit.offset_s is None and pooled is not None:
        how = "; ".join(f"{k} {1e3 * v:.2f} ms" for k, v in fit.measured_offsets_s.items() if v is not None)
        return replace(PRIOR_OVERHEADS, frontend_s=pooled), (
            f"frontend_s: the client-side constant (API server frontend and HTTP) MEASURED per run as the mean "
            f"client TTFT less the engine core's own mean TTFT (vllm:request_queue_time_seconds + "
            f"vllm:request_prefill_time_seconds) and less the mean wait for the step in flight (reconstructed), "
            f"request-weighted over the runs = {pooled:.6g} s ({how}; traces.enginelatency); not refined. "
            "post_decode_s and per_output_token_s: BLIS priors (docs/latency_physics.md#4-step-time-model)")
    if fit.offset_s is None:
        return PRIOR_OVERHEADS, OVERHEAD_SOURCE
    client = [r.name for r in runs if r.client_side]
    src = (f"frontend_s: the client-side constant (API server frontend and HTTP, send to engine and engine to "
           f"client) of the client-side run(s) {', '.join(client)}, fitted by NNLS with the step coefficients on "
           f"their first-token rows (= {fit.offset_s:.6g} s) and refined by replay; post_decode_s and "
           "per_output_token_s: not identifiable from a client's output-chunk times either (the simulator adds "
           "them after the last chunk): BLIS priors alpha1 0.78 ms, alpha2 46 us/token "
           "(docs/latency_physics.md#4-step-time-model)")
    return replace(PRIOR_OVERHEADS, frontend_s=fit.offset_s), src


def _check_servable(runs: Sequence[MeasuredRun], engine: sim.EngineConfig) -> None:
    """Refuse, up front, a request the engine can never serve (as ``replay`` does): the reconstruction would
    otherwise wait for it forever."""
    cap_tokens = (engine.num_gpu_blocks - 1) * engine.block_size
    for run in runs:
        need = run.prompt_tokens + run.output_tokens
        bad = np.flatnonzero(need > engine.max_model_len)
        if len(bad):
            i = int(bad[0])
            raise ValueError(
                f"{run.path}: request {run.requests['request_id'].iloc[i]} (input_toks {run.prompt_tokens[i]} + "
                f"output_toks {run.output_tokens[i]}) can never be served by the run's engine (max_model_len "
                f"{engine.max_model_len}, KV capacity {cap_tokens} tokens = (num_gpu_blocks {engine.num_gpu_blocks}"
                f" - 1) x block_size {engine.block_size}); {len(bad)} such request(s). Calibration needs every "
                "request served: check the run's engine limits in meta.json")


def _load(runs_or_dirs: Sequence[MeasuredRun | str | Path]) -> list[MeasuredRun]:
    runs = [as_run(r) for r in runs_or_dirs]
    if not runs:
        raise ValueError("calibrate_runs needs at least one run")
    for run in runs:
        if not run.client_side and run.requests["scheduled_ts"].isna().any():
            raise ValueError(f"{run.path}: requests without scheduled_ts in a run whose meta.json does not say its "
                             "times are a client's (collector.timestamps = \"client\"); an engine-side run needs "
                             "the engine's scheduled_ts")
    return runs


def calibrate_runs(runs_or_dirs: Sequence[MeasuredRun | str | Path], *, fit_fraction: float | None = None,
                   seed: int = 0, gpu: str | None = None, hardware: sim.HardwareSpec | None = None,
                   gpu_spec: str | None = None, model_config: str | Path | None = None,
                   name: str | None = None, max_evals: int | None = None, step_time_model: str = "auto",
                   progress: Callable[[int], None] | None = None) -> CalibrationResult:
    """Calibrate one profile from one or more runs of the same engine (see the module docstring).

    Args:
        runs_or_dirs: ``MeasuredRun``s or their directories; engine-side and client-side runs alike.
        fit_fraction: use only requests that arrived in this first fraction of each run's arrival window.
        seed: world seed of the replays (they draw no random numbers; recorded for completeness).
        gpu: GPU key or device name when ``meta.json`` does not record it (``sim.catalog.gpus``).
        hardware: use these peak rates instead of the GPU table's.
        gpu_spec: ``--gpu-spec`` text for a device that is not in the catalogue (``traces.hardware``); a CPU
            run needs it.
        model_config: ``--model-config``: the served model's ``config.json`` or its directory (wins over the
            Hugging Face cache and the catalogue, ``traces.hfconfig.resolve_shape``).
        name: profile name (default: the runs' names joined by ``+``).
        max_evals: replays of every run the refinement may spend (default 15 per multiplier).
        step_time_model: ``"auto"`` (physics when the GPU and the model's shape are known, else the shape-free
            ``"linear"``), ``"physics"`` or ``"linear"``.
        progress: called with 1 after every refinement replay (for a progress bar).
    """
    t_start = time.perf_counter()
    runs = _load(runs_or_dirs)
    masks, splits = zip(*(fit_mask(r, fit_fraction) for r in runs), strict=True)
    shape = resolve_shape_of_runs(runs, gpu=gpu, gpu_spec=gpu_spec, hardware=hardware, model_config=model_config)
    family_name, family_reason = family_choice(shape, step_time_model)
    hw = hardware or (shape.gpu.spec if shape.gpu is not None else None)
    cap = dp_capacity(_capacity(runs, shape.gpu, shape.model, splits), runs)
    engine, engine_sources = _engine(runs, shape.model, cap)
    _check_servable(runs, engine)
    parallel = sim.ParallelConfig(tensor_parallel_size=runs[0].engine.tensor_parallel_size,
                                  expert_parallel=runs[0].engine.enable_expert_parallel)
    measured = run_engine_ttfts(runs)  # the client-side constant measured for every client-side run, or fitted
    # the engine core's own prefill and decode sums, one more row each (traces.stepfit.engine_sum_rows)
    sums = {r.name: engine_phase_sums(r.meta.extra.get("collector"), num_requests=len(r)) for r in runs}
    fit_runs = [FitRun.of(r, m, measured.get(r.name, (None, ""))[0], sums[r.name])
                for r, m in zip(runs, masks, strict=True)]
    family = (physics_family(hw, shape.model.spec, parallel) if family_name == "physics"
              else linear_family(fit_runs))
    model_spec = None if shape.model is None else shape.model.spec
    dp_runs, dp_masks, dp_info = runs, masks, None
    if any(r.engine.data_parallel_size > 1 for r in runs):  # one fit run per engine (traces.dpsplit)
        def at(coef: dict[str, float], offset_s: float | None) -> sim.Profile:
            ov = PRIOR_OVERHEADS if offset_s is None else replace(PRIOR_OVERHEADS, frontend_s=offset_s)
            return sim.Profile(name="dp-assignment", hardware=hw, model=model_spec, engine=engine, overheads=ov,
                               parallel=parallel, latency_model=family.latency_model, latency_coefficients=coef)

        sums = {r.name: dp_engine_sums(r, sums[r.name]) if r.engine.data_parallel_size > 1 else sums[r.name]
                for r in runs}  # and each DP engine's own (traces.dpsplit)
        dp_runs, dp_masks, fit, dp_info = fit_data_parallel(runs, masks, engine, family, at, seed=seed,
                                                            engine_sums=[sums[r.name] for r in runs])
    else:
        fit = fit_step_model(fit_runs, engine, family)
        if (why_fitted := offsets_disagree(fit.measured_offsets_s)) is not None:
            measured = {k: (None, why_fitted) for k in measured}
            fit_runs = [FitRun.of(r, m, engine_sums=sums[r.name]) for r, m in zip(runs, masks, strict=True)]
            fit = fit_step_model(fit_runs, engine, family)
        if cap.method == "kv_usage_gauge" or (cap.method == "not_binding" and _gauge_peak(runs, splits) >= 0.5):
            cap, engine, engine_sources, fit = _replay_capacity(runs, splits, shape, hw, cap, fit, fit_runs, seed)
    if not cap.measured:
        peak = max(int(p.trace.used_blocks.max(initial=0)) for p in fit.runs)
        engine_sources["engine.num_gpu_blocks"] += (f"; the reconstruction of the run peaks at {peak} blocks in use"
                                                    f" ({100 * peak / (cap.num_gpu_blocks - 1):.0f} % of this)")
    overheads, overhead_source = _overheads(fit, runs)
    base = sim.Profile(name=name or "+".join(r.name for r in runs), hardware=hw, model=model_spec,
                       parallel=parallel, engine=engine, overheads=overheads,
                       latency_model=family.latency_model, latency_coefficients=dict(fit.coefficients))
    n_mult = len(_multiplier_names(fit))
    whole = [sums[r.name] if m.all() else None for r, m in zip(runs, masks, strict=True)]
    mult, refine_info = _refine(runs, masks, base, fit, seed=seed, progress=progress, engine_sums=whole,
                                max_evals=max_evals if max_evals is not None else EVALS_PER_MULTIPLIER * n_mult)
    profile = _apply(base, fit, mult)
    replays = [simulate_run(r, profile, seed=seed) for r in runs]
    final = [latency_errors(r, s, m) for r, s, m in zip(runs, replays, masks, strict=True)]
    if dp_info is not None:
        final_fit = dp_final_errors(runs, masks, replays, dp_runs)
        dp_info["final_errors_pct"] = {r.name: {k: {s: e[k][s]["error_pct"] for s in e[k]} for k in e}
                                       for r, e in zip(runs, final, strict=True)}
    rep = report(runs=dp_runs, masks=dp_masks, fit_fraction=fit_fraction, seed=seed, gpu_entry=shape.gpu,
                 gpu_src=shape.gpu_src, hw=hw, model=shape.model, cap=cap, engine=engine, fit=fit, profile=profile,
                 mult=mult, refine_info=refine_info, final=final if dp_info is None else final_fit,
                 overhead_source=overhead_source, family_reason=family_reason)
    if dp_info is not None:
        rep.update(run="+".join(r.name for r in runs), data_parallel=dp_info,
                   run_dir=str(runs[0].path) if len(runs) == 1 else [str(r.path) for r in runs])
    rep["identifiability"] = fit.identifiability
    if measured:
        rep["client_offset"] = {"method": "fitted" if fit.offset_s is not None else "measured",
                                "runs": {k: {"offset_s": fit.measured_offsets_s.get(k), "engine_ttft_s": v,
                                             "how": h} for k, (v, h) in measured.items()}}
        if "offset_s" in fit.identifiability.get("weak", ()):
            rep["client_offset"]["warning"] = (
                "the fitted client-side constant is weakly identified (standard error "
                f"{100 * fit.identifiability['relative_se']['offset_s']:.0f} % of its value): collect the runs with "
                "this version of `maslat collect` from a vLLM v1 server, whose latency histograms measure it")
    rep["model_source"], rep["hardware_source"] = shape.model_src, shape.gpu_src
    rep["model_source_kind"] = shape.model_kind
    if hw is not None:
        rep["hardware"].update(kind=hw.kind, interconnect=hw.interconnect,
                               interconnect_bw_bytes_per_s=hw.interconnect_bw_bytes_per_s)
    rep["parallel"] = {"tensor_parallel_size": parallel.tensor_parallel_size,
                       "expert_parallel": parallel.expert_parallel,
                       "data_parallel_size": runs[0].engine.data_parallel_size}
    if model_spec is not None:
        rep["model_shape"] = {"num_params": model_spec.num_params, "active_params": model_spec.params_per_token,
                              "num_experts": model_spec.num_experts,
                              "num_experts_per_tok": model_spec.num_experts_per_tok,
                              "kv_bytes_per_token": model_spec.kv_bytes_per_token,
                              "dtype_bytes": model_spec.dtype_bytes}
    jitter = {k: profile.latency_coefficients[k] for k in ("jitter_sigma", "jitter_corr_steps")
              if k in profile.latency_coefficients}
    if jitter:
        rep["step_time_jitter"] = jitter
    rep["wall_s"] = time.perf_counter() - t_start
    description, sources, derived = profile_provenance(runs, hw, shape.model, cap, fit_fraction, seed, shape.gpu,
                                                       shape.gpu_src, hardware, engine_sources, fit, mult,
                                                       overhead_source, fit.family.multipliers)
    profile = profile.replace(description=description, sources=sources, derived_from=derived)
    return CalibrationResult(profile=profile, report=rep, fit=fit)


def calibrate_run(run_or_dir: MeasuredRun | str | Path, **kwargs) -> CalibrationResult:
    """Calibrate a profile from one measured run: ``calibrate_runs([run_or_dir], **kwargs)``."""
    return calibrate_runs([run_or_dir], **kwargs)
