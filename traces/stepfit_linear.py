"""The shape-free family of the step-time fit: ``sim.latency_linear.LinearStepModel`` for ``traces.stepfit``.

Used when the model's shape or the GPU's peak rates are unknown (``traces.calibrate`` chooses it). Nothing here
comes from a GPU or model table: the first guess and the weak priors are fractions of the run's **own** time
scale, the median decode step ``tau`` (the median TPOT of the fit requests: a decoding request emits one token
per step, so its TPOT is the mean duration of the steps it was in), spread over the run's own mean batch:

* ``step_s`` -> ``tau / 2`` (the fixed cost of a pass is half a typical step);
* ``dc_seq_s`` -> ``tau / 4`` over the mean number of decoding requests, ``dc_ctx_s`` -> ``tau / 4`` over their
  mean total context (Little's law on the fit requests' decode spans, no reconstruction needed);
* ``pf_attn_s`` -> 0 (a second-order term, identified only by a spread of chunk sizes; ``sim.latency_linear``
  explains the collinearity); ``chunk_s`` is held at 0 (``LINEAR_HELD``);
* ``pf_token_s``: no prior (every request has a prefill, the prefill spans identify it); its first guess is the
  10th percentile of TTFT per prompt token.

The priors only decide directions the data leave open (``stepfit.PRIOR_WEIGHT``, with each row scaled to its
column, so they are unit-free); they are the same for any unit of time.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sim.latency_linear import LINEAR_BASIS_NAMES, LINEAR_MODEL, LinearStepModel

from .stepfit import FitFamily, FitRun

__all__ = ["LINEAR_FREE", "LINEAR_HELD", "LINEAR_MULTIPLIERS", "LINEAR_UNITS", "linear_family", "time_scale"]

#: the priors only break ties: where the data separate the terms (a noise-free simulated run recovers every
#: coefficient exactly without priors), a stronger prior (the physics fit's 0.01) moved them by up to 7x
LINEAR_PRIOR_WEIGHT = 1e-4

#: the fitted terms (weak priors decide the collinear ones); chunk_s is held at 0 (``LINEAR_HELD``)
LINEAR_FREE: tuple[str, ...] = ("step_s", "pf_token_s", "pf_attn_s", "dc_seq_s", "dc_ctx_s")
LINEAR_HELD = {"chunk_s": "held at 0: the number of chunks in a step moves with its prefill tokens and its sequences, "
                          "so a per-chunk cost trades against pf_token_s and dc_seq_s; left free it took whole steps' "
                          "worth (10 ms per chunk) in KV-bound runs, where recomputed prefills blur the chunk count"}

LINEAR_UNITS = {"step_s": "s per step", "pf_token_s": "s per prefill token",
                "pf_attn_s": "s per prefill attention unit (n^2 + 2np)", "chunk_s": "s per prefill chunk",
                "dc_seq_s": "s per decode sequence", "dc_ctx_s": "s per decode context token"}

#: refinement multipliers: per-step/per-sequence base cost, decode context cost, prefill cost
LINEAR_MULTIPLIERS: dict[str, tuple[str, ...]] = {"base": ("step_s", "dc_seq_s", "chunk_s"),
                                                   "dc_ctx": ("dc_ctx_s",), "prefill": ("pf_token_s", "pf_attn_s")}


def time_scale(runs: Sequence[FitRun]) -> dict[str, float]:
    """The runs' own scales: ``tau_s`` (median TPOT), ``mean_decodes`` and ``mean_context_tokens`` (per step,
    by Little's law over the decode spans), ``prefill_s_per_token`` (10th percentile of TTFT per prompt token)."""
    tpot, span, ctx_time, ttft_per_tok, t_lo, t_hi = [], [], [], [], [], []
    for r in runs:
        q = r.requests
        first, last, queued = (q[c].to_numpy(float) for c in ("first_token_ts", "last_token_ts", "queued_ts"))
        m = r.mask & (r.output_tokens > 1) & (last > first)
        d = (last - first)[m]
        tpot.append(d / (r.output_tokens[m] - 1))
        span.append(d)
        ctx_time.append(d * (r.prompt_tokens[m] + r.output_tokens[m] / 2.0))
        mp = r.mask & (r.prompt_tokens > 0)
        ttft_per_tok.append((first - queued)[mp] / r.prompt_tokens[mp])
        if m.any():
            t_lo.append(queued[m].min())
            t_hi.append(last[m].max())
    tpot_all = np.concatenate(tpot)
    if len(tpot_all) < 3:
        raise ValueError("the shape-free step-time fit needs at least 3 fit requests with more than one output "
                         "token (their TPOT sets the time scale)")
    busy = sum(hi - lo for lo, hi in zip(t_lo, t_hi, strict=True))
    total_span = float(np.concatenate(span).sum())
    mean_dec = max(total_span / busy, 1.0) if busy > 0 else 1.0
    mean_ctx = max(float(np.concatenate(ctx_time).sum()) / busy, 1.0) if busy > 0 else 1.0
    tau = float(np.median(tpot_all))
    per_tok = np.concatenate(ttft_per_tok)
    pf = float(np.percentile(per_tok, 10)) if len(per_tok) else tau / 1000.0
    return {"tau_s": tau, "mean_decodes": mean_dec, "mean_context_tokens": mean_ctx,
            "prefill_s_per_token": max(pf, 1e-12)}


def linear_family(runs: Sequence[FitRun]) -> FitFamily:
    """The shape-free family with its first guess and priors from ``runs`` (module docstring)."""
    sc = time_scale(runs)
    tau = sc["tau_s"]
    prior: dict[str, float | None] = {"step_s": tau / 2, "dc_seq_s": tau / 4 / sc["mean_decodes"],
                                      "dc_ctx_s": tau / 4 / sc["mean_context_tokens"], "pf_attn_s": 0.0,
                                      "pf_token_s": None}
    start = {n: prior.get(n) or 0.0 for n in LINEAR_BASIS_NAMES}
    start["pf_token_s"] = sc["prefill_s_per_token"]
    return FitFamily(latency_model=LINEAR_MODEL, names=LINEAR_BASIS_NAMES, free=LINEAR_FREE, held=LINEAR_HELD,
                     units=LINEAR_UNITS, start=start, prior=prior, multipliers=LINEAR_MULTIPLIERS,
                     make=LinearStepModel, detail=sc, damping=0.5,
                     max_iterations=10, prior_weight=LINEAR_PRIOR_WEIGHT)
