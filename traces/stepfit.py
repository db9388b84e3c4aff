"""Fit the step-time coefficients of a step-time model on reconstructed runs by NNLS.

The same pipeline fits either family (``FitFamily``): the physics model ``sim.latency.PhysicsStepModel``
(``physics_family``: its roofline basis needs the GPU and the model's shape; held, free and prior coefficients
below) or the shape-free ``sim.latency_linear.LinearStepModel`` (``traces.stepfit_linear.linear_family``: its
own free set and scale-free priors taken from the run's own step times).

The regression rows and their input record ``FitRun`` live in ``traces.steprows``: sums of whole engine steps,
so linear in the coefficients (decode and prefill spans per request and, where recorded, the engine core's own
latency sums), weighted by ``1/sqrt(steps)``; several runs of one engine are reconstructed separately and
their rows stacked.

**Identifiability of the physics basis** (``docs/latency_physics.md#4-step-time-model``). For one model and TP
degree ``X_weight``, ``L`` and the constant are all constant per step: only their sum is identified. It is
fitted through ``weight`` while ``layer_s`` and ``step_s`` are held at published values. ``dc_compute`` is
collinear with ``req_s`` (decode FLOPs grow with the decodes) and ``dc_kv`` (attention FLOPs with the
context): held at 0, decode being memory-bound. ``pf_kv`` and ``chunk_s`` are collinear with ``pf_compute``
and ``req_s`` at chunk sizes within one token budget: held at 0. ``tp`` is zero at TP 1 and grows with the
step's tokens at TP > 1 (collinear with ``req_s`` and ``pf_compute``): held at the published value. In a
KV-bound run the decode context barely varies, so ``weight`` and ``dc_kv`` are nearly collinear too: a weak
prior (``PRIOR_WEIGHT``) toward the published factors decides that split without moving well-determined
directions. The client-side offset is separated from ``weight`` (constant per step, so also constant in a
one-step prefill row) by the decode spans, which do not contain it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import nnls

from sim import EngineConfig, PhysicsCoefficients, PhysicsStepModel
from sim.latency import BASIS_NAMES

from .fitcheck import identifiability
from .reconstruct import (
    EngineTrace,
    Events,
    event_time_errors,
    observed_events,
    reconstruct_engine,
    step_rows,
)
from .steprows import (  # noqa: F401 (re-exported: the rows' names, importable from here)
    ENGINE_SUM_KINDS,
    ENGINE_SUM_WEIGHT,
    FitRun,
    _binned,
    _Rows,
    _rows,
    _stack,
    engine_sum_rows,
    measured_offset,
    pooled,
)

__all__ = ["FitFamily", "FitRun", "HELD", "PRIOR", "PRIOR_WEIGHT", "RunFit", "StepFit", "UNITS", "fit_step_model",
           "free_coefficients", "physics_family"]

#: Published factors on this basis (BLIS trained-physics on H100 vLLM traces,
#: docs/latency_physics.md#4-step-time-model); the prefill factor is 1/0.45 (BLIS's H100 prefill MFU on the
#: peak-rate basis).
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
               "model and TP degree (docs/latency_physics.md#4-step-time-model); their sum is fitted "
               "through weight",
    "step_s": "held at the published 126 us/step: collinear with weight and layer_s "
              "(docs/latency_physics.md#4-step-time-model)",
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
class FitFamily:
    """A step-time model family as the fit sees it.

    Attributes:
        latency_model: the profile's ``latency.model`` (a key of ``sim.latency.STEP_TIME_MODELS``).
        names: the coefficients, in the order of the model's ``basis(...)`` terms.
        free: the coefficients NNLS fits; the others stay at their ``start`` value.
        held: why each coefficient that is not free is held (for the report).
        units: per coefficient, what it multiplies.
        start: every coefficient's first value (the first reconstruction's model; held ones keep it).
        prior: per free coefficient, the value a weak prior row pulls it toward (``PRIOR_WEIGHT``), or ``None``
            for no prior (identified by the data alone).
        multipliers: the refinement's multipliers (name -> the free coefficients each scales).
        make: coefficients (name -> value) -> a step-time model with ``basis(n_dec, ctx_dec, chunks)``.
        detail: the numbers behind ``start`` and ``prior`` when they come from the data (for the report).
        damping: weight of the previous round's coefficients in the next reconstruction's (0: none). A basis with
            free terms that trade against each other (the shape-free one) can otherwise oscillate between two
            reconstructions (a slow prefill queues requests, which makes the next fit's prefill fast, ...).
        max_iterations: reconstruction/fit rounds at most.
        prior_weight: relative weight of the prior rows against the data rows (``PRIOR_WEIGHT`` by default).
    """

    latency_model: str
    names: tuple[str, ...]
    free: tuple[str, ...]
    held: Mapping[str, str]
    units: Mapping[str, str]
    start: Mapping[str, float]
    prior: Mapping[str, float | None]
    multipliers: Mapping[str, tuple[str, ...]]
    make: Callable[[dict[str, float]], object]
    detail: Mapping[str, float] = field(default_factory=dict)
    damping: float = 0.0
    max_iterations: int = 6
    prior_weight: float = PRIOR_WEIGHT


#: refinement multipliers of the physics family: name -> the fitted coefficients each scales
PHYSICS_MULTIPLIERS: dict[str, tuple[str, ...]] = {"base": ("weight", "req_s"), "dc_kv": ("dc_kv",),
                                                    "prefill": ("pf_compute",)}


def physics_family(hardware, model, tp: int) -> FitFamily:
    """The physics basis of ``hardware`` x ``model`` at tensor-parallel degree ``tp``, with the published
    ``PRIOR`` as first guess, held values and prior."""
    free = free_coefficients(tp)
    start = dict(zip(BASIS_NAMES, PRIOR.as_tuple(), strict=True))

    def make(coef: dict[str, float]) -> PhysicsStepModel:
        return PhysicsStepModel(hardware, model, tp, PhysicsCoefficients(**coef))

    return FitFamily(latency_model="physics", names=BASIS_NAMES, free=free, held=HELD, units=UNITS, start=start,
                     prior={c: start[c] for c in free}, multipliers=PHYSICS_MULTIPLIERS, make=make)


@dataclass(frozen=True, eq=False, kw_only=True)
class RunFit:
    """One run at the final coefficients.

    Attributes:
        name: the run's name.
        trace: its final reconstruction.
        rows: its rows in the stacked ``StepFit`` arrays.
        events: the measured events used (on the reconstruction's clock); ``decode_only_*`` the decode-only
            stretches between them (at least ``DECODE_STRETCH_MIN_STEPS`` steps), measured and predicted.
        event_errors_s: reconstructed minus measured time of every token event.
    """

    name: str
    trace: EngineTrace
    rows: slice
    events: Events
    decode_only_y_s: np.ndarray
    decode_only_pred_s: np.ndarray
    event_errors_s: np.ndarray


@dataclass(frozen=True, eq=False, kw_only=True)
class StepFit:
    """Result of the NNLS stage.

    Attributes:
        family: the fitted family.
        coefficients: every coefficient of the family (fitted and held), by name.
        free: the fitted names.
        offset_s: the fitted client-side constant (seconds), or ``None`` when no run is client-side or every
            client-side run's constant was measured (``FitRun.engine_ttft_s``).
        measured_offsets_s: per run, its measured client-side constant at the final reconstruction (``None``
            where not measured).
        identifiability: ``identifiability`` of the final rows (condition number, relative standard errors).
        rows_kind: per row, ``"decode"`` or ``"prefill"`` (or one of ``ENGINE_SUM_KINDS``); ``y_s`` measured and ``pred_s`` fitted durations
            (client-side prefill rows: TTFT less the reconstructed wait, offset included in both).
        steps: engine steps per row.
        iterations: per iteration, the fitted free coefficients (and offset) and the reconstructions' size.
        runs: per run, its reconstruction, rows and checks.
    """

    family: FitFamily
    coefficients: dict[str, float]
    free: tuple[str, ...]
    offset_s: float | None
    rows_kind: np.ndarray
    y_s: np.ndarray
    pred_s: np.ndarray
    steps: np.ndarray
    iterations: list[dict]
    runs: tuple[RunFit, ...]
    measured_offsets_s: dict[str, float | None] = field(default_factory=dict)
    identifiability: dict = field(default_factory=dict)



def _nnls(rows: _Rows, family: FitFamily) -> tuple[np.ndarray, float | None]:
    """Weighted NNLS on the free columns (held terms subtracted; plus the offset column when a row has it), with
    weak prior rows on the coefficients; the full coefficient vector and the offset (``None`` without one)."""
    free = family.free
    cols = [family.names.index(c) for c in free]
    hv = np.array([float(family.start[n]) for n in family.names])
    hv[cols] = 0.0
    w = 1.0 / np.sqrt(np.maximum(rows.k, 1))
    with_offset = bool(rows.has_offset.any())
    A = rows.X[:, cols] * w[:, None]
    if with_offset:
        A = np.hstack([A, (rows.has_offset * w)[:, None]])
    b = (rows.y - rows.X @ hv) * w
    wanted = [family.prior.get(c) for c in free] + [None] * with_offset  # no prior on the offset (data alone)
    prior = np.array([0.0 if p is None else float(p) for p in wanted])
    scale = np.sqrt(family.prior_weight * len(b)) * np.sqrt((A**2).mean(axis=0))
    has = np.array([p is not None for p in wanted])
    R = np.diag(scale)[has]
    sol, _ = nnls(np.vstack([A, R]), np.concatenate([b, R @ prior]), maxiter=50 * A.shape[1])
    out = hv.copy()
    out[cols] = sol[:len(cols)]
    return out, (float(sol[-1]) if with_offset else None)


def _coef_dict(family: FitFamily, coef: np.ndarray) -> dict[str, float]:
    return dict(zip(family.names, map(float, coef), strict=True))


def _reconstruct(runs: Sequence[FitRun], engine: EngineConfig, model) -> list[EngineTrace]:
    return [reconstruct_engine(r.prompt_tokens, r.output_tokens, r.offsets_s, engine, model) for r in runs]


def fit_step_model(runs: Sequence[FitRun], engine: EngineConfig, family: FitFamily | PhysicsStepModel, *,
                   max_iterations: int | None = None, row_bin_s: float | None = None) -> StepFit:
    """Reconstruct the runs and fit the coefficients (and the client-side offset), alternating until they settle.

    Args:
        runs: one or more runs served by the same engine (``FitRun.of(run, mask)``).
        engine: the runs' limits and KV capacity.
        family: the family to fit (``physics_family``, ``traces.stepfit_linear.linear_family``); a
            ``PhysicsStepModel`` stands for ``physics_family`` of its hardware, model and TP.
        max_iterations: reconstruction/fit rounds at most (stops earlier when everything moves < 0.5 %); default
            the family's.
        row_bin_s: fit on rows summed per time bin of this many seconds (``_binned``; data-parallel sub-runs).
    """
    if not runs:
        raise ValueError("fit_step_model needs at least one run")
    if isinstance(family, PhysicsStepModel):
        family = physics_family(family.hardware, family.model, family.tp)
    free, names, d = family.free, family.names, family.damping
    max_iterations = family.max_iterations if max_iterations is None else max_iterations
    traces = _reconstruct(runs, engine, family.make(dict(family.start)))
    pools = Counter(r.engine_sums_pool for r in runs if r.engine_sums is not None and r.engine_sums_pool)
    iterations, coef, offset = [], None, None
    for it in range(max_iterations):
        rows = _stack([_rows(t, r) for t, r in zip(traces, runs, strict=True)])
        if len(rows.y) < len(free) + 2 + bool(rows.has_offset.any()):
            raise ValueError(f"only {len(rows.y)} usable rows to fit {len(free)} coefficients; the run needs more "
                             "requests that were not preempted")
        new, new_offset = _nnls(_binned(pooled(rows, pools), row_bin_s), family)
        iterations.append({"iteration": it, "engine_steps": sum(t.num_steps for t in traces),
                           "preemptions": int(sum(t.num_preemptions.sum() for t in traces)), "rows": int(len(rows.y)),
                           **{c: float(new[names.index(c)]) for c in free},
                           **({} if new_offset is None else {"offset_s": new_offset})})
        settled = coef is not None and np.allclose(new, coef, rtol=5e-3, atol=1e-9) and (
            new_offset is None or abs(new_offset - offset) <= 5e-3 * max(offset, 1e-3))
        if coef is not None and d and not settled:
            new = (1 - d) * new + d * coef
            new_offset = None if new_offset is None else (1 - d) * new_offset + d * offset
        coef, offset = new, new_offset
        if settled or it == max_iterations - 1:
            break
        traces = _reconstruct(runs, engine, family.make(_coef_dict(family, coef)))
    pred = rows.X @ coef + (0.0 if offset is None else offset * rows.has_offset)
    parts, at, measured = [], 0, {}
    for t, r in zip(traces, runs, strict=True):
        n = len(_rows(t, r).y)
        own = measured_offset(t, r)
        events = observed_events(r.requests, r.mask, offset_s=(0.0 if not r.client_side else own
                                                                if own is not None else offset))
        measured[r.name] = own
        st = step_rows(events, t, min_steps=DECODE_STRETCH_MIN_STEPS)
        d = st.decode_only
        parts.append(RunFit(name=r.name, trace=t, rows=slice(at, at + n), events=events, decode_only_y_s=st.y_s[d],
                            decode_only_pred_s=st.X[d] @ coef, event_errors_s=event_time_errors(events, t)))
        at += n
    return StepFit(family=family, coefficients=_coef_dict(family, coef), free=free, offset_s=offset, rows_kind=rows.kind, y_s=rows.y, pred_s=pred, steps=rows.k,
                   iterations=iterations, runs=tuple(parts), measured_offsets_s=measured,
                   identifiability=identifiability(rows.X, rows.y, rows.k, rows.has_offset, family.names,
                                                   family.free, coef, offset))
