"""Reconstruct what a measured vLLM engine did, step by step, from per-request timestamps.

Every request served in one vLLM v1 engine step gets that step's output timestamp
(``docs/vllm.md#1-engine-loop``, ``#5-timestamps``), so the distinct ``first_token_ts``/``last_token_ts``
values of a run are observed step boundaries (*events*), and a request that is not preempted after its first
token emits one token per step: its first and last token are exactly ``n_out - 1`` steps apart. The steps in
between are not observed; what they held follows from the scheduler.

``reconstruct_engine`` replays the run's requests (injected at ``queued_ts - min(queued_ts)``, with their lengths)
through ``sim.EngineCore`` (the vLLM v1 scheduler with the run's limits and KV capacity) under a step-time
model, and records the composition of every step: decodes, their context, prefill chunks, preemptions. Given
arrivals between the same steps the scheduler decides as vLLM does, so with a step-time model that matches the
run the reconstruction follows the real engine; ``traces.stepfit`` alternates reconstruction and fit until the
two agree. ``step_rows`` pairs the reconstruction's steps with the measured time between consecutive events
(rows without a prefill chunk are *decode-only stretches*), a check of the reconstruction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pandas as pd

from sim import TICKS_PER_S, EngineConfig, EngineCore, Request

__all__ = ["BasisModel", "EngineTrace", "Events", "StepRows", "event_time_errors", "observed_events", "reconstruct_engine",
           "step_rows"]


@dataclass(frozen=True, eq=False, kw_only=True)
class Events:
    """Observed step boundaries: the distinct output-batch times of the chosen requests.

    Attributes:
        times_s: distinct first/last-token times, seconds after the run's first ``queued_ts``, increasing.
        members: per event, the ``(request index, is_last_token)`` pairs it carries.
    """

    times_s: np.ndarray
    members: list[list[tuple[int, bool]]]

    def __len__(self) -> int:
        return len(self.times_s)

    @property
    def num_batched(self) -> int:
        """Events that carry more than one token: requests that shared a step."""
        return sum(len(m) > 1 for m in self.members)


def observed_events(requests: pd.DataFrame, mask: np.ndarray | None = None, *, offset_s: float = 0.0) -> Events:
    """The distinct output times of the ``mask`` requests (all by default).

    ``offset_s`` is subtracted from every output time: for a client-side run, the client-side constant (frontend
    and HTTP), which puts the events on the reconstruction's clock (requests enter the engine at their offsets).
    """
    q0 = requests["queued_ts"].min() + offset_s
    use = np.flatnonzero(np.ones(len(requests), bool) if mask is None else np.asarray(mask, bool))
    ft = requests["first_token_ts"].to_numpy()[use] - q0
    lt = requests["last_token_ts"].to_numpy()[use] - q0
    t = np.concatenate([ft, lt])
    who = np.concatenate([use, use])
    is_last = np.concatenate([np.zeros(len(use), bool), np.ones(len(use), bool)])
    times, inv = np.unique(t, return_inverse=True)
    members: list[list[tuple[int, bool]]] = [[] for _ in times]
    for k in np.argsort(inv, kind="stable"):
        members[inv[k]].append((int(who[k]), bool(is_last[k])))
    return Events(times_s=times, members=members)


class BasisModel(Protocol):
    """A step-time model that also gives a step's basis terms (``PhysicsStepModel``, ``LinearStepModel``)."""

    def step_ticks(self, n_dec: int, ctx_dec: int, chunks: Sequence[tuple[int, int]]) -> int: ...

    def basis(self, n_dec: int, ctx_dec: int, chunks: Sequence[tuple[int, int]]) -> tuple[float, ...]: ...


class _Recorder:
    """Wraps a step-time model and records every step's composition."""

    linear_decode = None  # no closed-form decode jumps: every step is seen

    def __init__(self, model: BasisModel) -> None:
        self.model = model
        self.steps: list[tuple[int, int, tuple[tuple[int, int], ...]]] = []

    def step_ticks(self, n_dec: int, ctx_dec: int, chunks) -> int:
        self.steps.append((n_dec, ctx_dec, tuple(chunks)))
        return max(1, self.model.step_ticks(n_dec, ctx_dec, chunks))


@dataclass(frozen=True, eq=False, kw_only=True)
class EngineTrace:
    """The steps of a reconstruction.

    Attributes:
        basis: one row per step, the model's basis terms (``sim.latency.BASIS_NAMES`` for the physics model).
        n_dec, ctx_dec, prefill_tokens, n_chunks: per step.
        start, end: per step, its start and end time (seconds after the first arrival).
        used_blocks: per step, KV blocks in use after it.
        first_step, last_step: per request, the step (1-based) that emitted its first / last token.
        admit_step: per request, the step (1-based) that first scheduled it.
        num_preemptions: per request.
    """

    basis: np.ndarray
    n_dec: np.ndarray
    ctx_dec: np.ndarray
    prefill_tokens: np.ndarray
    n_chunks: np.ndarray
    start: np.ndarray
    end: np.ndarray
    used_blocks: np.ndarray
    first_step: np.ndarray
    last_step: np.ndarray
    admit_step: np.ndarray
    num_preemptions: np.ndarray

    @property
    def num_steps(self) -> int:
        return len(self.n_dec)


def reconstruct_engine(prompt_tokens: np.ndarray, output_tokens: np.ndarray, arrivals_s: np.ndarray,
                       engine: EngineConfig, model: BasisModel, *, max_steps: int | None = None) -> EngineTrace:
    """Replay requests through the vLLM v1 scheduler under ``model`` and record every step.

    Args:
        prompt_tokens, output_tokens: per request.
        arrivals_s: when each request reaches the engine (a request arriving during a step is first considered
            when the next step is scheduled).
        engine: the run's limits and KV capacity.
        model: the step-time model; it also supplies each step's basis terms.
        max_steps: raise ``ValueError`` past this many steps (default: 4 x every token of every request + 1,000,
            at most 5,000,000; each step serves at least one token, so only recompute preemption gets near it).
    """
    arrivals = np.asarray(arrivals_s, dtype=np.float64)
    rec = _Recorder(model)
    core = EngineCore(engine, rec, jumps=False)
    order = np.argsort(arrivals, kind="stable")
    reqs = []
    for i in range(len(prompt_tokens)):
        r = Request(str(i), int(prompt_tokens[i]), int(output_tokens[i]))
        r.seq_id = i + 1
        reqs.append(r)
    starts: list[int] = []
    ends: list[int] = []
    used: list[int] = []
    k, t = 0, 0
    limit = max_steps if max_steps is not None else min(
        4 * (int(np.sum(prompt_tokens)) + int(np.sum(output_tokens))) + 1000, 5_000_000)
    while True:
        while k < len(order) and arrivals[order[k]] * TICKS_PER_S <= t:
            core.add_request(reqs[order[k]], float(arrivals[order[k]]))
            k += 1
        end = core.begin(t)
        if end is None:
            if k >= len(order):
                break
            t = max(t, int(np.ceil(arrivals[order[k]] * TICKS_PER_S)))
            continue
        core.complete()
        if len(starts) >= limit:
            raise ValueError(f"the reconstruction took more than {limit} engine steps for {len(order)} requests "
                             f"({int(np.sum(prompt_tokens)) + int(np.sum(output_tokens))} tokens): a request the "
                             "engine cannot serve, or preemptions without end; check the run's engine limits")
        starts.append(t)
        ends.append(end)
        used.append(core.kv.num_usable - core.kv.free)
        t = end
    return _trace(rec, reqs, starts, ends, used, model)


def _trace(rec: _Recorder, reqs: list[Request], starts: list[int], ends: list[int], used: list[int],
           model: BasisModel) -> EngineTrace:
    m = len(rec.steps)
    step_of = {e / TICKS_PER_S: i + 1 for i, e in enumerate(ends)}
    started = {s / TICKS_PER_S: i + 1 for i, s in enumerate(starts)}
    basis = np.array([model.basis(*s) for s in rec.steps], dtype=np.float64).reshape(m, -1)
    return EngineTrace(
        basis=basis,
        n_dec=np.fromiter((s[0] for s in rec.steps), np.int64, m),
        ctx_dec=np.fromiter((s[1] for s in rec.steps), np.int64, m),
        prefill_tokens=np.fromiter((sum(n for n, _ in s[2]) for s in rec.steps), np.int64, m),
        n_chunks=np.fromiter((len(s[2]) for s in rec.steps), np.int64, m),
        start=np.array(starts, np.float64) / TICKS_PER_S,
        end=np.array(ends, np.float64) / TICKS_PER_S,
        used_blocks=np.array(used, np.int64),
        first_step=np.array([step_of.get(r.first_token_ts, -1) for r in reqs], np.int64),
        last_step=np.array([step_of.get(r.last_token_ts, -1) for r in reqs], np.int64),
        admit_step=np.array([started.get(r.scheduled_ts, -1) for r in reqs], np.int64),
        num_preemptions=np.array([r.num_preemptions for r in reqs], np.int64))


@dataclass(frozen=True, eq=False, kw_only=True)
class StepRows:
    """Regression rows: stretches of engine steps between consecutive measured events.

    Attributes:
        X: summed basis terms per row (``BASIS_NAMES`` order).
        y_s: measured duration of each row.
        steps: engine steps per row.
        decode_only: whether no step of the row holds a prefill chunk.
        t0_s: measured time of the row's start (seconds after the first ``queued_ts``).
        anchors: ``(time_s, engine step)`` of the events the rows run between (step 0 at time 0 first).
        skipped_events: events whose engine step was not after the previous anchor's (the reconstruction put
            them out of the measured order); they are merged into the next row, never dropped from the time.
        batch_disagreements: measured batches whose requests the reconstruction put in different steps.
    """

    X: np.ndarray
    y_s: np.ndarray
    steps: np.ndarray
    decode_only: np.ndarray
    t0_s: np.ndarray
    anchors: np.ndarray
    skipped_events: int
    batch_disagreements: int

    def __len__(self) -> int:
        return len(self.y_s)


def step_rows(events: Events, trace: EngineTrace, *, min_steps: int = 1) -> StepRows:
    """Pair the reconstruction's steps with the measured time between consecutive events.

    Args:
        events: the measured events.
        trace: the reconstruction.
        min_steps: merge events until a row spans at least this many steps (an event's step is uncertain by a
            step or two, which matters less over longer rows).
    """
    ev_step = np.zeros(len(events), np.int64)
    disagree = 0
    for j, members in enumerate(events.members):
        s = np.array([trace.last_step[r] if last else trace.first_step[r] for r, last in members])
        s = s[s > 0]
        ev_step[j] = int(np.median(s)) if len(s) else -1
        disagree += int(len(s) > 0 and s.min() != s.max())
    cum = np.vstack([np.zeros((1, trace.basis.shape[1])), np.cumsum(trace.basis, axis=0)])
    cum_ch = np.concatenate([[0], np.cumsum(trace.n_chunks)])
    X, y, k, dec, t0, anchors = [], [], [], [], [], [(0.0, 0)]
    skipped = 0
    prev_t, lo = 0.0, 0  # the run starts idle at time 0, step 0
    for j in range(len(events)):
        hi = int(ev_step[j])
        if hi <= lo:
            skipped += 1
            continue
        if hi - lo < min_steps and j < len(events) - 1:
            continue
        # steps lo+1 .. hi (1-based) are rows lo .. hi-1 of the basis
        X.append(cum[hi] - cum[lo])
        y.append(events.times_s[j] - prev_t)
        k.append(hi - lo)
        dec.append(cum_ch[hi] == cum_ch[lo])
        t0.append(prev_t)
        anchors.append((events.times_s[j], hi))
        prev_t, lo = float(events.times_s[j]), hi
    return StepRows(X=np.array(X).reshape(-1, trace.basis.shape[1]), y_s=np.array(y),
                    steps=np.array(k, np.int64), decode_only=np.array(dec, bool), t0_s=np.array(t0),
                    anchors=np.array(anchors, np.float64), skipped_events=skipped, batch_disagreements=disagree)


def event_time_errors(events: Events, trace: EngineTrace) -> np.ndarray:
    """Reconstructed minus measured time of every token event (seconds), over the events' requests."""
    out = []
    for t, members in zip(events.times_s, events.members, strict=True):
        for r, last in members:
            s = trace.last_step[r] if last else trace.first_step[r]
            if s > 0:
                out.append(trace.end[s - 1] - t)
    return np.array(out)
