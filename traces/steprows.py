"""The input record (``FitRun``) and regression rows of ``traces.stepfit``: what the NNLS fits, built from a
reconstructed run (``traces.reconstruct.EngineTrace``: the steps vLLM-v1's scheduler,
``vllm/v1/core/sched/scheduler.py``, would have run) and its measured per-request timestamps.

Split from ``traces/stepfit.py`` to keep files short; ``traces.stepfit`` re-exports every name here.

Regression rows (every one a sum of whole engine steps, so linear in the coefficients):

* **decode span** of a request with no preemption: its last token comes ``n_out - 1`` steps after its first,
  so ``last_token_ts - first_token_ts`` is the summed time of exactly those steps (on either clock: a client
  sees both tokens equally late);
* **prefill span** of an engine-side run: ``first_token_ts - scheduled_ts`` covers the steps from its admission
  to its first token (plus the one step already in flight at ``scheduled_ts`` when the run used async
  scheduling: vLLM 0.19.0 schedules step k+1 while step k runs, so a request scheduled at a step boundary
  starts one step later);
* **prefill span** of a client-side run (no ``scheduled_ts``): the client's TTFT is
  ``offset + wait + (steps from its admission to its first token)``, where ``offset`` is the client-side
  constant (the API server's frontend and HTTP, ``overheads.frontend_s``; one unknown shared by all client-side
  rows, fitted with the coefficients as one more NNLS column) and ``wait`` the time from its arrival to the
  start of its admission step, taken from the reconstruction. When the run's constant was measured
  (``FitRun.engine_ttft_s``, ``traces.enginelatency``) it is subtracted instead: on queued CPU runs the fitted one is
  not identified (it trades against ``step_s`` and ``pf_token_s`` in the few rows that carry it). Only requests admitted at the first step
  boundary after their arrival make such rows (``wait`` is 0 when the engine was idle and less than the step
  in flight otherwise); a request that queued longer would bring the reconstruction's accumulated timing
  error into the offset (its decode span is still used).

* **engine sums** of a client-side run whose collector recorded the engine core's own latency histograms
  (``FitRun.engine_sums``): the run's summed ``first_token_ts - scheduled_ts`` and ``last_token_ts -
  first_token_ts`` on the engine's clock, two rows of whole steps that the server's delivery delays to the client
  (``traces.delivery``) do not touch (``engine_sum_rows``).

Each row carries the summed basis terms of the reconstruction's steps (``traces.reconstruct``). Rows are
weighted by ``1/sqrt(steps)`` (independent per-step noise). Several runs of one engine (say, at two load
levels) are reconstructed separately and fitted together: their rows are stacked.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .enginelatency import client_offset
from .reconstruct import EngineTrace

__all__ = ["ENGINE_SUM_KINDS", "ENGINE_SUM_WEIGHT", "FitRun", "engine_sum_rows", "measured_offset", "pooled"]


@dataclass(frozen=True, eq=False, kw_only=True)
class FitRun:
    """What the fit needs of one measured run.

    Attributes:
        name: the run's name (for reports).
        requests: ``MeasuredRun.requests``.
        prompt_tokens, output_tokens, offsets_s: every request of the run (the workload).
        mask: requests whose timestamps may be used (the fit part of a held-out check).
        async_scheduling: whether the run scheduled one step ahead (shifts engine-side prefill rows by a step).
        client_side: the times are a client's (``traces.collect``): no ``scheduled_ts``, TTFT holds the offset.
        engine_ttft_s: a client-side run's engine-core mean TTFT from its own latency sums
            (``traces.enginelatency.engine_ttft``); with it the run's client-side constant is measured at every
            reconstruction (``enginelatency.client_offset``) and its prefill rows carry no offset column
            (``None``: the constant is fitted with the coefficients).
        engine_sums: a client-side run's engine-core summed prefill and decode times over all its requests
            (``traces.enginelatency.engine_phase_sums``); each becomes one more row (``engine_sum_rows``). With
            ``"count"`` (requests the sums cover; default all of the run's), over that many requests: a
            data-parallel engine's own sums cover its sub-run's (``traces.dpsplit``), a pool's its whole run's.
        engine_sums_pool: the sums are the total over several runs' requests (the engines of one data-parallel run
            whose split of requests to engines is uncertain, ``traces.dpsplit``): the engine-sum rows of every run
            of the pool are summed into one per kind before the fit (``pooled``).
    """

    name: str
    requests: pd.DataFrame
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    offsets_s: np.ndarray
    mask: np.ndarray
    async_scheduling: bool = False
    client_side: bool = False
    engine_ttft_s: float | None = None
    engine_sums: dict[str, float] | None = None
    engine_sums_pool: str | None = None

    @classmethod
    def of(cls, run, mask: np.ndarray, engine_ttft_s: float | None = None,
           engine_sums: dict[str, float] | None = None, engine_sums_pool: str | None = None) -> FitRun:
        """From a ``traces.runs.MeasuredRun`` (and its engine-core mean TTFT and phase sums, if measured)."""
        return cls(name=run.name, requests=run.requests, prompt_tokens=run.prompt_tokens,
                   output_tokens=run.output_tokens, offsets_s=run.offsets_s, mask=np.asarray(mask, bool),
                   async_scheduling=bool(run.engine.async_scheduling), client_side=run.client_side,
                   engine_ttft_s=engine_ttft_s if run.client_side else None,
                   engine_sums=engine_sums if run.client_side else None,
                   engine_sums_pool=engine_sums_pool if run.client_side else None)

@dataclass(frozen=True, eq=False)
class _Rows:
    X: np.ndarray  # summed basis terms
    y: np.ndarray  # measured seconds
    k: np.ndarray  # engine steps
    kind: np.ndarray  # "decode" | "prefill" | ENGINE_SUM_KINDS
    has_offset: np.ndarray  # the row contains the client-side offset (a binned row: that many times, ``_binned``)
    t: np.ndarray  # the row's time (mid-span, seconds after the run's first queued_ts): for binned fits
    group: np.ndarray  # "" or the FitRun.engine_sums_pool an engine-sum row is summed over (``pooled``)


def measured_offset(trace: EngineTrace, run: FitRun) -> float | None:
    """The run's client-side constant measured against ``trace`` (``traces.enginelatency.client_offset``), or
    ``None`` when the run has no engine latency sums."""
    if not run.client_side or run.engine_ttft_s is None:
        return None
    req = run.requests
    ttft = (req["first_token_ts"] - req["queued_ts"]).to_numpy(float)
    a = np.asarray(run.offsets_s, float)
    k = np.minimum(np.searchsorted(trace.start, a - 1e-9, side="left"), max(trace.num_steps - 1, 0))
    wait = np.maximum(trace.start[k] - a, 0.0) if trace.num_steps else np.zeros(len(a))
    return client_offset(ttft, run.engine_ttft_s, wait)


def _rows(trace: EngineTrace, run: FitRun) -> _Rows:
    req = run.requests
    f = req["first_token_ts"].to_numpy()
    last = req["last_token_ts"].to_numpy()
    cum = np.vstack([np.zeros((1, trace.basis.shape[1])), np.cumsum(trace.basis, axis=0)])
    clean = run.mask & (trace.first_step > 0) & (trace.num_preemptions == 0)
    dec = clean & (trace.last_step > trace.first_step)
    if run.client_side:
        # TTFT = offset + wait + steps admit..first, the wait (arrival to the admit step) from the reconstruction,
        # only for requests admitted at the first step boundary after their arrival (wait < one step): a longer
        # wait would carry the reconstruction's accumulated timing error into the offset
        j = trace.admit_step - 1
        pre = clean & (j >= 0)
        pre[pre] &= (j[pre] == 0) | (trace.start[np.maximum(j[pre] - 1, 0)] <= run.offsets_s[pre])
        lo = j[pre]
        wait = trace.start[lo] - run.offsets_s[pre]
        y_pre = (f - req["queued_ts"].to_numpy())[pre] - wait - (measured_offset(trace, run) or 0.0)
    else:
        shift = int(run.async_scheduling)
        pre = clean & (trace.admit_step - 1 - shift >= 0)
        lo = trace.admit_step[pre] - 1 - shift
        y_pre = (f - req["scheduled_ts"].to_numpy())[pre]
    X = np.vstack([cum[trace.last_step[dec]] - cum[trace.first_step[dec]], cum[trace.first_step[pre]] - cum[lo]])
    n_dec, n_pre = int(dec.sum()), int(pre.sum())
    q0 = req["queued_ts"].min()
    rows = _Rows(X=X, y=np.concatenate([(last - f)[dec], y_pre]),
                 k=np.concatenate([(trace.last_step - trace.first_step)[dec], trace.first_step[pre] - lo]),
                 kind=np.array(["decode"] * n_dec + ["prefill"] * n_pre),
                 has_offset=np.concatenate([np.zeros(n_dec, bool),
                                            np.full(n_pre, run.client_side and run.engine_ttft_s is None)]),
                 t=np.concatenate([(f[dec] + last[dec]) / 2 - q0, f[pre] - q0]), group=np.full(n_dec + n_pre, ""))
    sums = engine_sum_rows(trace, run, cum)
    return rows if sums is None else _stack([rows, sums])


#: the kinds of the engine-sum rows (``engine_sum_rows``)
ENGINE_SUM_KINDS = ("engine_prefill_sum", "engine_decode_sum")
#: an engine-sum row weighs as much as ``ENGINE_SUM_WEIGHT**2 x n`` span rows of the ``n`` requests it sums: the
#: span rows of a client-side run carry the server's delivery delays, the sums do not, so where they disagree the
#: engine's clock should win. On real vLLM CPU collections whose server held tokens back (``traces.delivery``), 1
#: (plain ``n`` rows) left the held-out engine decode sums 8-11 % short; 3 brought them within 5-6 %, the fit runs'
#: own within 1 %
ENGINE_SUM_WEIGHT = 3.0


def engine_sum_rows(trace: EngineTrace, run: FitRun, cum: np.ndarray) -> _Rows | None:
    """Two rows from the engine core's own latency sums (``FitRun.engine_sums``), or ``None`` without them.

    vLLM observes, per request and on the engine core's clock, ``first_token_ts - scheduled_ts`` (the steps from
    the one that first scheduled it to the one that emitted its first token) and ``last_token_ts -
    first_token_ts`` (the steps after that one up to the one that emitted its last token); summed over the run's
    requests, each is a sum of whole reconstructed steps, as a span row is, but measured where the steps ran. A
    client's token times can carry the server's delivery delays (``traces.delivery``: tokens held back and read in
    bursts); these rows cannot, so they keep the step times on the engine's clock. Each stands for the ``n``
    requests it sums: scaled by ``ENGINE_SUM_WEIGHT x sqrt(n)`` (rows are weighted ``1/sqrt(steps)``), it weighs as
    much as ``ENGINE_SUM_WEIGHT**2 x n`` span rows of its mean length would. Only for a whole run (the sums cover every request, so a held-out part's
    timing would leak into a fit on the first part) whose every request was reconstructed."""
    if run.engine_sums is None or not run.mask.all():
        return None
    first, last, admit = trace.first_step, trace.last_step, trace.admit_step
    if len(first) != len(run.mask) or (first <= 0).any() or (admit <= 0).any() or (last < first).any():
        return None
    n = len(first)
    total = float(run.engine_sums.get("count", n))  # requests the sums cover: n, or a pool's (then y is n's share)
    scale = float(np.sqrt(total)) * ENGINE_SUM_WEIGHT
    X = np.vstack([(cum[first] - cum[admit - 1]).sum(axis=0), (cum[last] - cum[first]).sum(axis=0)]) * scale
    y = np.array([run.engine_sums["prefill_s"], run.engine_sums["decode_s"]]) * (n / total) * scale
    k = np.array([int((first - admit + 1).sum()), int((last - first).sum())], np.int64)
    t_mid = float((run.requests["first_token_ts"] - run.requests["queued_ts"].min()).median())
    return _Rows(X=X, y=y, k=k, kind=np.array(ENGINE_SUM_KINDS), has_offset=np.zeros(2, bool), t=np.full(2, t_mid),
                 group=np.full(2, run.engine_sums_pool or ""))


def _stack(rows: list[_Rows]) -> _Rows:
    return _Rows(*(np.concatenate([getattr(r, f) for r in rows])
                   for f in ("X", "y", "k", "kind", "has_offset", "t", "group")))


def _take(rows: _Rows, keep: np.ndarray) -> _Rows:
    return _Rows(*(getattr(rows, f)[keep] for f in ("X", "y", "k", "kind", "has_offset", "t", "group")))


def pooled(rows: _Rows, members: dict[str, int]) -> _Rows:
    """Engine-sum rows of one pool (``FitRun.engine_sums_pool``; ``members``: pool -> its runs) summed into one row
    per kind: the whole data-parallel run's steps against the total of its engines' sums (each member's row holds
    its requests' share of the total, and every member is scaled as the pool's size, so the sum is the pool's
    row). A pool missing a member's rows (a request not reconstructed) is dropped: its total would not match."""
    grouped = rows.group != ""
    if not grouped.any():
        return rows
    out = [_take(rows, ~grouped)]
    for g in np.unique(rows.group[grouped]):
        for kind in ENGINE_SUM_KINDS:
            sel = (rows.group == g) & (rows.kind == kind)
            if sel.sum() != members.get(str(g), -1):
                continue
            part = _take(rows, sel)
            out.append(_Rows(X=part.X.sum(axis=0, keepdims=True), y=part.y.sum(keepdims=True),
                             k=part.k.sum(keepdims=True), kind=part.kind[:1], has_offset=part.has_offset[:1],
                             t=part.t[:1], group=part.group[:1]))
    return _stack(out)


def _binned(rows: _Rows, bin_s: float | None) -> _Rows:
    """Rows summed per (kind, time bin of ``bin_s``) across all runs; unchanged without a bin. A data-parallel
    fit (``traces.dpsplit``) uses it: its per-engine sub-runs come from a split that is right in aggregate but
    not request by request, so one request's summed basis terms carry the other engine's load (errors in the
    regressors, which bias least squares towards a flat model); summed over the requests of a few seconds, what
    one engine over-counts the other under-counts. A binned row of client-side prefill rows holds the client-side
    offset once per row it sums (``has_offset`` becomes that count: the offset column of ``traces.stepfit._nnls``)."""
    if bin_s is None:
        return rows
    spans = (rows.kind == "decode") | (rows.kind == "prefill")  # engine-sum rows stay whole
    if spans.any() and not spans.all():
        return _stack([_binned(_take(rows, spans), bin_s), _take(rows, ~spans)])
    key = np.stack([rows.kind == "decode", rows.has_offset, np.floor(rows.t / bin_s)], axis=1)
    _, inv = np.unique(key, axis=0, return_inverse=True)
    inv = inv.ravel()
    m = inv.max() + 1
    X = np.zeros((m, rows.X.shape[1]))
    np.add.at(X, inv, rows.X)
    first = np.unique(inv, return_index=True)[1]
    return _Rows(X=X, y=np.bincount(inv, rows.y, m), k=np.bincount(inv, rows.k, m).astype(np.int64),
                 kind=rows.kind[first], has_offset=np.bincount(inv, rows.has_offset, m), t=rows.t[first],
                 group=rows.group[first])
