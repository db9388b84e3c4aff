"""Calibrate a serving profile from one measured vLLM run: ``calibrate_run`` and ``python -m traces.calibrate``.

Pipeline (each step general: nothing here knows a particular run, GPU or model):

1. **Settings.** The run's engine limits (``traces.meta``); the GPU from ``meta.hardware.device_name`` (or the
   run's name, or ``gpu=``) and the model from ``meta.model``, whose constants come from ``traces.hardware``.
2. **KV capacity.** ``num_gpu_blocks`` as measured, or estimated and labelled so (``traces.kvcapacity``).
3. **Reconstruction and NNLS** (``traces.stepfit``): what the engine did, step by step, from the per-request
   timestamps, and the step-time coefficients of ``sim.latency.PhysicsStepModel`` fitted on whole-step spans.
4. **Refinement.** A deterministic Nelder-Mead over three multipliers (per-step/per-request base cost, decode
   KV-read factor, prefill factor) replays the run in the simulator and minimises the squared log errors of
   TTFT, TPOT and E2E (mean, p50, p90; p99 at a quarter weight) against the measured distributions.

With ``fit_fraction`` only the requests that arrived in the first part of the arrival window contribute
measurements (timestamps, latencies, KV gauge); the replay still carries every request (the workload).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import minimize

import sim
from sim.latency import BASIS_NAMES

from .hardware import GPUS, GpuEntry, ModelEntry, lookup_gpu, lookup_model, match_gpu_in_text
from .kvcapacity import KVCapacity, kv_capacity
from .replay import METRICS, as_run, fit_mask, latency_errors, simulate_run
from .runs import MeasuredRun
from .stepfit import HELD, PRIOR, UNITS, StepFit, fit_step_model

__all__ = ["CalibrationResult", "PRIOR_OVERHEADS", "calibrate_run", "format_report", "main"]

#: The run format is engine-side: per-request overheads outside the engine are not identifiable from it.
PRIOR_OVERHEADS = sim.Overheads(frontend_s=0.0156, post_decode_s=0.00078, per_output_token_s=46e-6)
_OVERHEAD_SOURCE = ("not identifiable from the run format (engine-side timestamps only; arrival_time is on another "
                    "clock): BLIS priors alpha0 15.6 ms, alpha1 0.78 ms, alpha2 46 us/token (latency_physics.md s.4)")

#: multiplier name -> coefficients it scales (only those NNLS fitted: held ones stay at their published values)
MULTIPLIERS: dict[str, tuple[str, ...]] = {
    "base": ("weight", "req_s"),
    "dc_kv": ("dc_kv",),
    "prefill": ("pf_compute",),
}
_STAT_WEIGHTS = {"mean": 1.0, "p50": 1.0, "p90": 1.0, "p99": 0.25}
#: weight of sum(log(multiplier)^2) in the objective: keeps the refinement near the NNLS fit where the
#: replay cannot tell directions apart (weight vs context cost in a KV-bound run)
REFINE_ANCHOR_WEIGHT = 0.002


@dataclass(frozen=True, eq=False, kw_only=True)
class CalibrationResult:
    """A calibrated profile and the report of how it was obtained (JSON-ready); ``fit`` holds the NNLS rows."""

    profile: sim.Profile
    report: dict
    fit: StepFit | None = None


def _gpu(run: MeasuredRun, gpu: str | None, hardware: sim.HardwareSpec | None) -> tuple[GpuEntry, str]:
    if hardware is not None and gpu is None:
        return GpuEntry(key="given", aliases=(), spec=hardware, sources={}), "given by the caller"
    if gpu is not None:
        return lookup_gpu(gpu), f"given (gpu={gpu!r})"
    name = (run.meta.hardware or {}).get("device_name")
    if isinstance(name, str) and name:
        return lookup_gpu(name), f"meta.hardware.device_name {name!r}"
    e = match_gpu_in_text(run.name)
    if e is None:
        raise ValueError(f"run {run.name}: meta.json has no hardware.device_name and the run's name names no known "
                         f"GPU; pass gpu= (maslat calibrate --gpu), one of {sorted(GPUS)}")
    return e, f"not recorded in meta.json; identified from the run directory name {run.name!r}"


def _engine(run: MeasuredRun, model: ModelEntry, cap: KVCapacity) -> tuple[sim.EngineConfig, dict[str, str]]:
    e, src = run.engine, run.engine.sources
    if e.policy != "fcfs":
        raise ValueError(f"run {run.name}: scheduling policy {e.policy!r} is not simulated (FCFS only)")
    mml, mml_src = e.max_model_len, f"run {run.name}: {src['max_model_len']}"
    if mml is None:
        mml = model.max_position_embeddings
        mml_src = f"model default ({model.sources.get('max_position_embeddings')}); the run's max_model_len is null"
    cap_tokens = (cap.num_gpu_blocks - 1) * e.block_size
    if mml > cap_tokens:
        mml, mml_src = cap_tokens, mml_src + f"; capped at the KV capacity ({cap_tokens} tokens)"
    cfg = sim.EngineConfig(max_num_seqs=e.max_num_seqs, max_num_batched_tokens=e.max_num_batched_tokens,
                           max_model_len=mml, block_size=e.block_size, num_gpu_blocks=cap.num_gpu_blocks,
                           enable_prefix_caching=e.enable_prefix_caching,
                           scheduler_reserve_full_isl=e.scheduler_reserve_full_isl,
                           long_prefill_token_threshold=e.long_prefill_token_threshold)
    sources = {f"engine.{k}": f"run {run.name}: {src[k]}" for k in
               ("max_num_seqs", "max_num_batched_tokens", "block_size", "enable_prefix_caching",
                "scheduler_reserve_full_isl", "long_prefill_token_threshold")}
    sources["engine.max_model_len"] = mml_src
    sources["engine.num_gpu_blocks"] = cap.source
    return cfg, sources


def _scaled(coef: sim.PhysicsCoefficients, mult: dict[str, float], free: tuple[str, ...]) -> dict[str, float]:
    out = dict(zip(BASIS_NAMES, coef.as_tuple(), strict=True))
    for m, names in MULTIPLIERS.items():
        for n in names:
            if n in free:
                out[n] *= mult[m]
    return out


def _objective(errors: dict) -> float:
    return float(sum(w * np.log1p(errors[m][s]["error_pct"] / 100.0) ** 2
                     for m in METRICS for s, w in _STAT_WEIGHTS.items()))


def _refine(run: MeasuredRun, base: sim.Profile, coef: sim.PhysicsCoefficients, free: tuple[str, ...],
            mask: np.ndarray, *, seed: int, max_evals: int,
            progress: Callable[[int], None] | None) -> tuple[dict, dict]:
    """Nelder-Mead over log multipliers; every evaluation is a full replay. Returns (multipliers, info)."""
    names = list(MULTIPLIERS)
    cache: dict[tuple, float] = {}
    history: list[float] = []

    def f(x: np.ndarray) -> float:
        key = tuple(np.round(x, 12))
        if key not in cache:
            mult = dict(zip(names, np.exp(x), strict=True))
            prof = base.replace(latency_coefficients=_scaled(coef, mult, free))
            errors = latency_errors(run, simulate_run(run, prof, seed=seed), mask)
            cache[key] = _objective(errors) + REFINE_ANCHOR_WEIGHT * float(np.sum(x**2))
            history.append(cache[key])
            if progress is not None:
                progress(1)
        return cache[key]

    x0 = np.zeros(len(names))
    simplex = np.vstack([x0] + [x0 + 0.04 * np.eye(len(names))[i] for i in range(len(names))])
    res = minimize(f, x0, method="Nelder-Mead",
                   options={"initial_simplex": simplex, "maxfev": max_evals, "xatol": 2e-3, "fatol": 1e-7})
    best = dict(zip(names, map(float, np.exp(res.x)), strict=True))
    return best, {"evaluations": len(history), "objective_start": history[0], "objective_best": float(res.fun),
                  "method": "Nelder-Mead on log multipliers, initial steps 4 %, replaying the run each time; "
                            f"objective = sum of squared log errors + {REFINE_ANCHOR_WEIGHT} x sum(log m)^2"}


def _residuals(pred: np.ndarray, y: np.ndarray) -> dict:
    if len(y) == 0:
        return {"rows": 0}
    rel = (pred - y) / y
    return {"rows": int(len(y)), "median_abs_rel_pct": float(100 * np.median(np.abs(rel))),
            "p90_abs_rel_pct": float(100 * np.percentile(np.abs(rel), 90)),
            "bias_pct": float(100 * (pred.sum() - y.sum()) / y.sum())}


def _nnls_report(fit: StepFit, coef_final: dict[str, float]) -> dict:
    free = set(fit.free)
    coefs = {}
    for n in BASIS_NAMES:
        status = "fitted (NNLS, refined)" if n in free else "held"
        coefs[n] = {"value": coef_final[n], "nnls": getattr(fit.coefficients, n), "unit": UNITS[n],
                    "status": status, **({"why": HELD[n]} if n in HELD and n not in free else {})}
    return {"coefficients": coefs, "iterations": fit.iterations,
            "residuals": {"decode_spans": _residuals(fit.pred_s[fit.rows_kind == "decode"],
                                                     fit.y_s[fit.rows_kind == "decode"]),
                          "prefill_spans": _residuals(fit.pred_s[fit.rows_kind == "prefill"],
                                                      fit.y_s[fit.rows_kind == "prefill"]),
                          "decode_only_stretches": _residuals(fit.decode_only_pred_s, fit.decode_only_y_s)}}


def calibrate_run(run_or_dir: MeasuredRun | str | Path, *, fit_fraction: float | None = None, seed: int = 0,
                  gpu: str | None = None, hardware: sim.HardwareSpec | None = None, name: str | None = None,
                  max_evals: int = 45, progress: Callable[[int], None] | None = None) -> CalibrationResult:
    """Calibrate a profile from a measured run (see the module docstring).

    Args:
        run_or_dir: a ``MeasuredRun`` or its directory.
        fit_fraction: use only requests that arrived in this first fraction of the arrival window.
        seed: world seed of the replays (they draw no random numbers; recorded for completeness).
        gpu: GPU key or device name when ``meta.json`` does not record it (``traces.hardware.GPUS``).
        hardware: use these peak rates instead of the GPU table's.
        name: profile name (default: the run's name).
        max_evals: replays the refinement may spend.
        progress: called with 1 after every refinement replay (for a progress bar).
    """
    t_start = time.perf_counter()
    run = as_run(run_or_dir)
    if run.requests["scheduled_ts"].isna().any():
        raise ValueError(f"{run.path}: requests without scheduled_ts (a client-side collected run); calibration "
                         "needs the engine-side timestamps of the measured run format")
    mask, split = fit_mask(run, fit_fraction)
    gpu_entry, gpu_src = _gpu(run, gpu, hardware)
    hw = hardware or gpu_entry.spec
    model = lookup_model(run.meta.model)
    cap = kv_capacity(run, gpu_entry, model, until_s=split)
    engine, engine_sources = _engine(run, model, cap)
    tp = run.engine.tensor_parallel_size
    basis = sim.PhysicsStepModel(hw, model.spec, tp, PRIOR)
    fit = fit_step_model(run.requests, run.prompt_tokens, run.output_tokens, run.offsets_s, engine, basis,
                         mask=mask, async_scheduling=bool(run.engine.async_scheduling))
    if not cap.measured:
        peak = int(fit.trace.used_blocks.max(initial=0))
        engine_sources["engine.num_gpu_blocks"] += (f"; the reconstruction of the run peaks at {peak} blocks in use"
                                                    f" ({100 * peak / (cap.num_gpu_blocks - 1):.0f} % of this)")
    base = sim.Profile(name=name or run.name, hardware=hw, model=model.spec,
                       parallel=sim.ParallelConfig(tensor_parallel_size=tp), engine=engine,
                       latency_coefficients=dict(zip(BASIS_NAMES, fit.coefficients.as_tuple(), strict=True)),
                       overheads=PRIOR_OVERHEADS)
    mult, refine_info = _refine(run, base, fit.coefficients, fit.free, mask, seed=seed, max_evals=max_evals,
                                progress=progress)
    coef = _scaled(fit.coefficients, mult, fit.free)
    profile = base.replace(latency_coefficients=coef)
    final = latency_errors(run, simulate_run(run, profile, seed=seed), mask)
    report = _report(run, fit_fraction, mask, seed, gpu_entry, gpu_src, hw, model, cap, engine, fit, coef,
                     mult, refine_info, final)
    report["wall_s"] = time.perf_counter() - t_start
    profile = profile.replace(description=_description(run, hw, model, cap, fit_fraction),
                              sources=_sources(run, gpu_entry, gpu_src, hardware, model, engine_sources, fit, mult),
                              derived_from=_derived_from(run, fit_fraction, seed))
    return CalibrationResult(profile=profile, report=report, fit=fit)


def _report(run, fit_fraction, mask, seed, gpu_entry, gpu_src, hw, model, cap, engine, fit, coef, mult,
            refine_info, final) -> dict:
    tr = fit.trace
    return {
        "run": run.name, "run_dir": str(run.path), "fit_fraction": fit_fraction, "fit_requests": int(mask.sum()),
        "seed": seed,
        "hardware": {"name": hw.name, "table_entry": gpu_entry.key, "identified_by": gpu_src,
                     "peak_flops": hw.peak_flops, "mem_bw_bytes_per_s": hw.mem_bw_bytes_per_s},
        "model": model.spec.name, "tensor_parallel_size": run.engine.tensor_parallel_size,
        "engine": {k: getattr(engine, k) for k in ("max_num_seqs", "max_num_batched_tokens", "max_model_len",
                                                   "block_size", "num_gpu_blocks", "enable_prefix_caching",
                                                   "scheduler_reserve_full_isl")},
        "async_scheduling": run.engine.async_scheduling,
        "kv_capacity": {"num_gpu_blocks": cap.num_gpu_blocks, "measured": cap.measured, "method": cap.method,
                        "source": cap.source, "detail": cap.detail,
                        "peak_used_blocks_reconstructed": int(tr.used_blocks.max(initial=0)),
                        "binding": bool(tr.num_preemptions.sum() > 0
                                        or tr.used_blocks.max(initial=0) >= 0.95 * (cap.num_gpu_blocks - 1))},
        "reconstruction": {"observed_step_boundaries": len(fit.events), "batched_boundaries": fit.events.num_batched,
                           "engine_steps": tr.num_steps, "preemptions": int(tr.num_preemptions.sum()),
                           "preempted_requests": int((tr.num_preemptions > 0).sum()),
                           "decode_span_rows": int((fit.rows_kind == "decode").sum()),
                           "prefill_span_rows": int((fit.rows_kind == "prefill").sum()),
                           "decode_only_stretches": int(len(fit.decode_only_y_s)),
                           "event_time_error_s": {"median_abs": float(np.median(np.abs(fit.event_errors_s))),
                                                  "p90_abs": float(np.percentile(np.abs(fit.event_errors_s), 90))}},
        "nnls": _nnls_report(fit, coef),
        "physical_reading": _physical(coef, hw),
        "refinement": {"multipliers": mult, **refine_info},
        "fit_errors_pct": {m: {s: final[m][s]["error_pct"] for s in final[m]} for m in final},
        "overheads": {"frontend_s": PRIOR_OVERHEADS.frontend_s, "post_decode_s": PRIOR_OVERHEADS.post_decode_s,
                      "per_output_token_s": PRIOR_OVERHEADS.per_output_token_s, "source": _OVERHEAD_SOURCE},
    }


def _physical(coef: dict[str, float], hw: sim.HardwareSpec) -> dict:
    """What the fitted factors say about the hardware, and a warning where a factor beats the roofline."""
    out = {"weight_stream_bandwidth_fraction": 1 / coef["weight"] if coef["weight"] else None,
           "decode_kv_bandwidth_fraction": 1 / coef["dc_kv"] if coef["dc_kv"] else None,
           "prefill_mfu": 1 / coef["pf_compute"] if coef["pf_compute"] else None,
           "peak_flops": hw.peak_flops, "mem_bw_bytes_per_s": hw.mem_bw_bytes_per_s, "notes": []}
    for k, what in (("weight_stream_bandwidth_fraction", "weight streaming"), ("decode_kv_bandwidth_fraction",
                    "decode KV reads"), ("prefill_mfu", "prefill compute")):
        if out[k] is not None and out[k] > 1:
            out["notes"].append(f"{what} at {100 * out[k]:.0f} % of the table's peak: the additive basis counts "
                                "overlapping compute and memory time twice and collinear terms share the time, "
                                "so the factors' sum is meaningful, not their split (or the table's peak is low)")
    return out


def _description(run, hw, model, cap, fit_fraction) -> str:
    part = "" if fit_fraction is None else f" (first {fit_fraction:g} of its arrivals)"
    kv = "measured" if cap.measured else "ESTIMATED"
    return (f"{model.spec.name} on {hw.name}, calibrated by traces.calibrate from the measured vLLM "
            f"{run.meta.vllm_version or ''} run {run.name}{part}; engine settings of that run; KV capacity {kv}.")


def _sources(run, gpu_entry, gpu_src, hardware, model, engine_sources, fit, mult) -> dict[str, str]:
    out = {}
    for k in ("peak_flops", "mem_bw_bytes_per_s", "memory_bytes", "interconnect_bw_bytes_per_s"):
        if hardware is not None:
            out[f"hardware.{k}"] = "given by the caller (the hardware of the profile passed to the replay)"
        elif k in gpu_entry.sources:
            out[f"hardware.{k}"] = f"{gpu_entry.sources[k]}; GPU {gpu_src}"
    out["model"] = model.sources.get("model", "traces.hardware.MODELS")
    out.update(engine_sources)
    n_dec = int((fit.rows_kind == "decode").sum())
    n_pre = int((fit.rows_kind == "prefill").sum())
    for n in BASIS_NAMES:
        if n in fit.free:
            m = next(k for k, names in MULTIPLIERS.items() if n in names)
            out[f"latency.coefficients.{n}"] = (f"NNLS on {n_dec} decode spans and {n_pre} prefill spans "
                                                f"reconstructed from run {run.name} (= {getattr(fit.coefficients, n):.6g})"
                                                f", x {mult[m]:.4f} by the replay refinement (multiplier {m!r})")
        else:
            out[f"latency.coefficients.{n}"] = HELD[n]
    out["overheads"] = _OVERHEAD_SOURCE
    return out


def _derived_from(run: MeasuredRun, fit_fraction, seed) -> dict:
    return {"run": run.name, "vllm_version": run.meta.vllm_version, "model": run.meta.model,
            "dataset_hash": run.meta.dataset_hash,
            "files": {n: {"sha256": h} for n, h in sorted(run.file_sha256.items())},
            "tool": "traces.calibrate.calibrate_run", "fit_fraction": fit_fraction, "seed": seed}


def format_report(report: dict) -> str:
    """The human-readable fit report: settings, reconstruction, coefficients with units, residuals, errors."""
    r, rec, kv = report, report["reconstruction"], report["kv_capacity"]
    lines = [f"run {r['run']}  model {r['model']}  GPU {r['hardware']['name']} ({r['hardware']['identified_by']})",
             "engine: " + "  ".join(f"{k}={v}" for k, v in r["engine"].items()),
             f"KV capacity: {kv['num_gpu_blocks']} blocks, {kv['method']}: {kv['source']}",
             f"  reconstructed peak use {kv['peak_used_blocks_reconstructed']} blocks: the capacity is "
             f"{'binding (preemptions)' if kv['binding'] else 'not binding for this run'}",
             f"reconstruction: {rec['observed_step_boundaries']} observed step boundaries "
             f"({rec['batched_boundaries']} shared by several requests), {rec['engine_steps']} engine steps, "
             f"{rec['preemptions']} preemptions of {rec['preempted_requests']} requests",
             f"rows: {rec['decode_span_rows']} decode spans, {rec['prefill_span_rows']} prefill spans, "
             f"{rec['decode_only_stretches']} decode-only stretches (check); reconstructed token times off by "
             f"{rec['event_time_error_s']['median_abs']:.3f} s median, {rec['event_time_error_s']['p90_abs']:.3f} s p90",
             "", "coefficients:"]
    for n, c in r["nnls"]["coefficients"].items():
        lines.append(f"  {n:11s} {c['value']:12.6g}  (NNLS {c['nnls']:.6g})  {c['unit']:38s} {c['status']}")
    lines.append("residuals of the NNLS fit (relative, per row):")
    for k, v in r["nnls"]["residuals"].items():
        if v["rows"]:
            lines.append(f"  {k:22s} rows {v['rows']:4d}  median |err| {v['median_abs_rel_pct']:5.2f} %  "
                         f"p90 |err| {v['p90_abs_rel_pct']:5.2f} %  total bias {v['bias_pct']:+.2f} %")
    ph = r["physical_reading"]
    lines.append(f"reading: weight streaming at {100 * (ph['weight_stream_bandwidth_fraction'] or 0):.0f} % of peak "
                 f"bandwidth, decode KV reads at {100 * (ph['decode_kv_bandwidth_fraction'] or 0):.0f} %, prefill MFU "
                 f"{100 * (ph['prefill_mfu'] or 0):.0f} % of {ph['peak_flops'] / 1e12:.0f} TFLOP/s")
    lines += [f"  note: {n}" for n in ph["notes"]]
    ref = r["refinement"]
    lines.append("refinement: " + "  ".join(f"{k} x{v:.4f}" for k, v in ref["multipliers"].items())
                 + f"  ({ref['evaluations']} replays, objective {ref['objective_start']:.4g} -> "
                   f"{ref['objective_best']:.4g})")
    lines.append("replay errors on the fit requests (%):")
    for m, st in r["fit_errors_pct"].items():
        lines.append(f"  {m:7s} " + "  ".join(f"{s} {v:+6.2f}" for s, v in st.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m traces.calibrate RUN --out PROFILE.json [--json]`` (the same as ``maslat calibrate``)."""
    from .commands import calibrate_main

    return calibrate_main(argv)


if __name__ == "__main__":
    sys.exit(main())
