"""Fit the step-time coefficients of ``sim.latency.PhysicsStepModel`` on a reconstructed run by NNLS.

Regression rows (every one a sum of whole engine steps, so linear in the coefficients):

* **decode span** of a request with no preemption: its last token comes ``n_out - 1`` steps after its first,
  so ``last_token_ts - first_token_ts`` is the summed time of exactly those steps;
* **prefill span**: ``first_token_ts - scheduled_ts`` covers the steps from its admission to its first token
  (plus the one step already in flight at ``scheduled_ts`` when the run used async scheduling: vLLM 0.19.0
  schedules step k+1 while step k runs, so a request scheduled at a step boundary starts one step later).

Each row carries the summed basis terms of the reconstruction's steps (``traces.reconstruct``). Rows are
weighted by ``1/sqrt(steps)`` (independent per-step noise).

**Identifiability** (``latency_physics.md`` s.4). For one model and TP degree ``X_weight``, ``L`` and the
constant are all constant per step: only their sum is identified. It is fitted through ``weight`` while
``layer_s`` and ``step_s`` are held at published values. ``dc_compute`` is collinear with ``req_s`` (decode FLOPs
grow with the decodes) and ``dc_kv`` (attention FLOPs with the context): held at 0, decode being memory-bound.
``pf_kv`` and ``chunk_s`` are collinear with ``pf_compute`` and ``req_s`` at chunk sizes within one token budget:
held at 0. ``tp`` is zero at TP 1 and grows with the step's tokens at TP > 1 (collinear with ``req_s`` and
``pf_compute``): held at the published value. In a KV-bound run the decode context
barely varies, so ``weight`` and ``dc_kv`` are nearly collinear too: a weak prior (``PRIOR_WEIGHT``) toward the
published factors decides that split without moving well-determined directions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.optimize import nnls

from sim import EngineConfig, PhysicsCoefficients, PhysicsStepModel
from sim.latency import BASIS_NAMES

from .reconstruct import (
    EngineTrace,
    Events,
    event_time_errors,
    observed_events,
    reconstruct_engine,
    step_rows,
)

__all__ = ["HELD", "PRIOR", "PRIOR_WEIGHT", "StepFit", "UNITS", "fit_step_model", "free_coefficients"]

#: Published factors on this basis (BLIS trained-physics on H100 vLLM traces, latency_physics.md s.4); the
#: prefill factor is 1/0.45 (BLIS's H100 prefill MFU on the peak-rate basis).
PRIOR = PhysicsCoefficients(pf_compute=2.2, pf_kv=0.0, dc_compute=0.0, dc_kv=1.9, weight=1.4, tp=0.75,
                            layer_s=32e-6, req_s=4e-6, step_s=126e-6, chunk_s=0.0)
PRIOR_WEIGHT = 0.01  # relative weight of the prior rows against the data rows
DECODE_STRETCH_MIN_STEPS = 20  # an event's step is uncertain by a step or two; checks use longer stretches

UNITS = {"pf_compute": "x roofline prefill FLOP time (1/MFU)", "pf_kv": "x roofline prefill KV time",
         "dc_compute": "x roofline decode FLOP time", "dc_kv": "x roofline decode KV-read time",
         "weight": "x roofline weight-read time", "tp": "x roofline all-reduce time", "layer_s": "s per layer",
         "req_s": "s per request in the step", "step_s": "s per step", "chunk_s": "s per prefill chunk"}

HELD = {
    "layer_s": "held at the published 32 us/layer: constant per step, collinear with weight and step_s at one "
               "model and TP degree (latency_physics.md s.4); their sum is fitted through weight",
    "step_s": "held at the published 126 us/step: collinear with weight and layer_s (latency_physics.md s.4)",
    "dc_compute": "held at 0: collinear with req_s (decode FLOPs per decode) and dc_kv (attention FLOPs per "
                  "context token); decode is memory-bound",
    "pf_kv": "held at 0: collinear with pf_compute for chunks within one token budget",
    "chunk_s": "held at 0: collinear with req_s and pf_compute",
    "tp": "held at the published 0.75: its basis term is 0 at tensor_parallel_size 1, and at TP > 1 it grows with "
          "the step's tokens, collinear with req_s (one token per decode) and pf_compute (prefill tokens) within "
          "one run; separating it needs runs at several TP degrees",
}


def free_coefficients(tp: int) -> tuple[str, ...]:
    """The coefficients NNLS fits for a run at tensor-parallel degree ``tp`` (``tp`` itself never: see HELD)."""
    del tp
    return ("weight", "req_s", "dc_kv", "pf_compute")


@dataclass(frozen=True, eq=False, kw_only=True)
class StepFit:
    """Result of the NNLS stage.

    Attributes:
        coefficients: all ten coefficients (fitted and held).
        free: the fitted names.
        trace: the final reconstruction.
        rows_kind: per row, ``"decode"`` or ``"prefill"``; ``y_s`` measured and ``pred_s`` fitted durations.
        iterations: per iteration, the fitted free coefficients and the reconstruction's size.
        events: the measured events used; ``decode_only_*`` the decode-only stretches between them (at least
            ``DECODE_STRETCH_MIN_STEPS`` steps), measured and predicted.
        event_errors_s: reconstructed minus measured time of every token event.
    """

    coefficients: PhysicsCoefficients
    free: tuple[str, ...]
    trace: EngineTrace
    rows_kind: np.ndarray
    y_s: np.ndarray
    pred_s: np.ndarray
    steps: np.ndarray
    iterations: list[dict]
    events: Events
    decode_only_y_s: np.ndarray
    decode_only_pred_s: np.ndarray
    event_errors_s: np.ndarray


def _rows(trace: EngineTrace, requests: pd.DataFrame, mask: np.ndarray, async_shift: int):
    q0 = requests["queued_ts"].min()
    f = requests["first_token_ts"].to_numpy() - q0
    last = requests["last_token_ts"].to_numpy() - q0
    s = requests["scheduled_ts"].to_numpy() - q0
    cum = np.vstack([np.zeros((1, trace.basis.shape[1])), np.cumsum(trace.basis, axis=0)])
    clean = mask & (trace.first_step > 0) & (trace.num_preemptions == 0)
    dec = clean & (trace.last_step > trace.first_step)
    pre = clean & (trace.admit_step - 1 - async_shift >= 0)
    lo = trace.admit_step[pre] - 1 - async_shift
    X = np.vstack([cum[trace.last_step[dec]] - cum[trace.first_step[dec]], cum[trace.first_step[pre]] - cum[lo]])
    y = np.concatenate([(last - f)[dec], (f - s)[pre]])
    k = np.concatenate([(trace.last_step - trace.first_step)[dec], trace.first_step[pre] - lo])
    kind = np.array(["decode"] * int(dec.sum()) + ["prefill"] * int(pre.sum()))
    return X, y, k, kind


def _nnls(X: np.ndarray, y: np.ndarray, k: np.ndarray, free: tuple[str, ...],
          held: PhysicsCoefficients) -> np.ndarray:
    """Weighted NNLS on the free columns (held terms subtracted), with weak prior rows; full coefficient vector."""
    cols = [BASIS_NAMES.index(c) for c in free]
    hv = np.array(held.as_tuple())
    hv[cols] = 0.0
    w = 1.0 / np.sqrt(np.maximum(k, 1))
    A = X[:, cols] * w[:, None]
    b = (y - X @ hv) * w
    prior = np.array([getattr(PRIOR, c) for c in free])
    scale = np.sqrt(PRIOR_WEIGHT * len(b)) * np.sqrt((A**2).mean(axis=0))
    has = prior > 0
    R = np.diag(scale)[has]
    sol, _ = nnls(np.vstack([A, R]), np.concatenate([b, R @ prior]), maxiter=50 * len(cols))
    out = hv.copy()
    out[cols] = sol
    return out


def fit_step_model(requests: pd.DataFrame, prompt_tokens: np.ndarray, output_tokens: np.ndarray,
                   offsets_s: np.ndarray, engine: EngineConfig, basis_model: PhysicsStepModel, *,
                   mask: np.ndarray, async_scheduling: bool, max_iterations: int = 6) -> StepFit:
    """Reconstruct the run and fit the coefficients, alternating until the fit settles.

    Args:
        requests: ``MeasuredRun.requests``.
        prompt_tokens, output_tokens, offsets_s: every request of the run (the workload).
        engine: the run's limits and KV capacity.
        basis_model: hardware, model and TP of the basis (its coefficients are the first guess).
        mask: requests whose timestamps may be used (the fit part of a held-out check).
        async_scheduling: whether the run scheduled one step ahead (shifts the prefill rows by one step).
        max_iterations: reconstruction/fit rounds at most (stops earlier when coefficients move < 0.5 %).
    """
    free = free_coefficients(basis_model.tp)
    held = PRIOR
    events = observed_events(requests, mask)
    model = basis_model
    trace = reconstruct_engine(prompt_tokens, output_tokens, offsets_s, engine, model)
    iterations, coef = [], None
    for it in range(max_iterations):
        X, y, k, kind = _rows(trace, requests, mask, int(async_scheduling))
        if len(y) < len(free) + 2:
            raise ValueError(f"only {len(y)} usable rows to fit {len(free)} coefficients; the run needs more "
                             "requests that were not preempted")
        new = _nnls(X, y, k, free, held)
        iterations.append({"iteration": it, "engine_steps": trace.num_steps,
                           "preemptions": int(trace.num_preemptions.sum()), "rows": int(len(y)),
                           **{c: float(new[BASIS_NAMES.index(c)]) for c in free}})
        settled = coef is not None and np.allclose(new, coef, rtol=5e-3, atol=1e-9)
        coef = new
        if settled or it == max_iterations - 1:
            break
        model = PhysicsStepModel(model.hardware, model.model, model.tp,
                                 PhysicsCoefficients(**dict(zip(BASIS_NAMES, map(float, coef), strict=True))))
        trace = reconstruct_engine(prompt_tokens, output_tokens, offsets_s, engine, model)
    rows = step_rows(events, trace, min_steps=DECODE_STRETCH_MIN_STEPS)
    d = rows.decode_only
    return StepFit(coefficients=PhysicsCoefficients(**dict(zip(BASIS_NAMES, map(float, coef), strict=True))),
                   free=free, trace=trace, rows_kind=kind, y_s=y, pred_s=X @ coef, steps=k,
                   iterations=iterations, events=events, decode_only_y_s=rows.y_s[d],
                   decode_only_pred_s=rows.X[d] @ coef, event_errors_s=event_time_errors(events, trace))
