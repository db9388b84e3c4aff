"""The APWA executor: dispatch subproblems to workers on independent pools, retry, bound, fan in.

Everything here is a generator process on the environment's ``Backend`` seam (``envs.backend``): it yields
the backend's waitables (``submit``, ``process``, ``all_of``, ``event``) and never touches a clock or a
server, so the same plan runs on the simulated cluster (``envs.backend.SimBackend``) or on live vLLM servers
(``maslat.livebackend.LiveBackend``, one endpoint per pool).

* **Dispatch**: every call names a capability; the registry binds it to the pool with the fewest of this
  run's calls in flight (``CapabilityRegistry.bind``), the pool's router picks the replica.
* **Retries**: a served call whose output breaks its contract (``fail_prob``, drawn from the run's own
  failure stream) is sent again, at most ``max_retries`` times. A call the server refuses
  (``prompt_plus_max_tokens_exceeds_max_model_len``) cannot succeed as is: with ``split_on_reject`` the
  executor halves the group and runs both halves, else the group's rows are lost.
* **Bounded concurrency**: at most ``Decomposition.max_in_flight`` worker and merge calls at once (a counting
  semaphore built from backend events, FIFO).
* **Fan-in**: merge nodes start when their own children are done (no level barrier); ``llm`` merges are
  aggregator calls, ``concat`` merges are table operations.

Bookkeeping per row: ``value[i]`` is the share of the row's value that survived the contexts it went through
(``context_quality``); ``CallRecord`` per call. ``result`` turns both into a ``RunResult``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .manager import Plan
from .registry import Capability, CapabilityRegistry
from .workloads import DataTable, Workload, context_quality

__all__ = ["CallRecord", "Executor", "RunResult"]

_EMPTY = np.zeros(0, np.int64)


@dataclass(frozen=True, slots=True)
class CallRecord:
    """One LLM call: its capability, pool, sizes (tokens), timing (s, from the run's start) and outcome."""

    capability: str
    pool: str
    prompt_tokens: int
    output_tokens: int
    start_s: float
    latency_s: float
    outcome: str            # "ok" | "malformed" | "rejected"
    reject_reason: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class RunResult:
    """A method's run over one table.

    ``structural_completeness``: share of rows answered and merged into the final output; ``complete`` when
    all are. ``semantic_utility``: mean over rows of the value that reached the final output (0 for a lost
    row). ``failure_reason``: why rows were lost (the first refusal's reason), else ``None``.
    """

    method: str
    workload: str
    num_items: int
    makespan_s: float
    prompt_tokens: int
    completion_tokens: int
    num_calls: int
    retries: int
    rejected_calls: int
    malformed_calls: int
    lost_items: int
    structural_completeness: float
    complete: bool
    semantic_utility: float
    width: int
    depth: int
    peak_context_tokens: int
    failure_reason: str | None
    calls: tuple[CallRecord, ...] = field(default=(), repr=False)

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def summary(self) -> dict[str, Any]:
        """Plain figures (no per-call records)."""
        d = {k: v for k, v in asdict(self).items() if k != "calls"}
        d["tokens"] = self.tokens
        return d


class _Slots:
    """A FIFO counting semaphore from backend events (``None``: no bound)."""

    def __init__(self, backend, n: int | None):
        self.be, self.free, self.waiters = backend, n, deque()

    def acquire(self):
        ev = self.be.event()
        if self.free is None or self.free > 0:
            if self.free is not None:
                self.free -= 1
            ev.succeed()
        else:
            self.waiters.append(ev)
        return ev

    def release(self) -> None:
        if self.waiters:
            self.waiters.popleft().succeed()
        elif self.free is not None:
            self.free += 1


class Executor:
    """Runs one plan (or one baseline's calls) over ``table`` on ``backend``.

    Args:
        backend: the serving side (``envs.backend.Backend`` with one pool per model).
        registry: capabilities and their pools.
        workload, table: the job and its rows.
        pool_models: model name of each pool (for ``context_quality``).
        rng: the run's failure stream.
        fail_prob: probability that a served call breaks its output contract.
        max_retries: re-sends of a call after a malformed output.
    """

    def __init__(self, backend, registry: CapabilityRegistry, workload: Workload, table: DataTable,
                 pool_models: dict[str, str], rng: np.random.Generator, *, fail_prob: float = 0.02,
                 max_retries: int = 3):
        if not 0.0 <= fail_prob < 1.0:
            raise ValueError(f"fail_prob must be in [0, 1), got {fail_prob!r}")
        if not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be an integer >= 0, got {max_retries!r}")
        self.be, self.registry, self.workload, self.table = backend, registry, workload, table
        self.pool_models, self.rng = dict(pool_models), rng
        self.fail_prob, self.max_retries = float(fail_prob), max_retries
        self.value = np.ones(table.num_rows)
        self.calls: list[CallRecord] = []
        self.retries = 0
        self.t0 = backend.now
        self.slots = _Slots(backend, None)
        self.split_on_reject = True
        self.failure_reason: str | None = None
        self._content = 0

    # ------------------------------------------------------------------ one call
    def content_id(self) -> int:
        """A fresh content id for prompt segments (prefix caching matches equal ids)."""
        self._content += 1
        return (1 << 52) + self._content

    def call(self, capability: str, prompt_tokens: int, max_tokens: int, segments=None):
        """Process: one LLM call of ``capability``; returns ``(outcome, pool)``."""
        pool = self.registry.bind(capability)
        t0 = self.be.now
        try:
            res = yield self.be.submit(pool, int(prompt_tokens), int(max_tokens), segments)
        finally:
            self.registry.release(pool)
        reason = res.reject_reason
        outcome = "ok" if reason is None else "rejected"
        if reason is not None and self.failure_reason is None:
            self.failure_reason = reason
        if outcome == "ok" and self.fail_prob > 0 and self.rng.random() < self.fail_prob:
            outcome = "malformed"
        self.calls.append(CallRecord(capability, pool, int(prompt_tokens), int(max_tokens) if reason is None else 0,
                                     t0 - self.t0, self.be.now - t0, outcome, reason))
        return outcome, pool

    def call_with_retries(self, capability: str, prompt_tokens: int, max_tokens: int, segments=None):
        """Process: ``call`` under the concurrency bound, re-sent after malformed outputs; returns
        ``(outcome, pool)`` of the last attempt."""
        for attempt in range(self.max_retries + 1):
            yield self.slots.acquire()
            try:
                outcome, pool = yield self.be.process(self.call(capability, prompt_tokens, max_tokens, segments))
            finally:
                self.slots.release()
            if outcome != "malformed":
                return outcome, pool
            if attempt < self.max_retries:
                self.retries += 1
        return outcome, pool

    def keep(self, rows: np.ndarray, pool: str, context_tokens: int) -> None:
        """Rows handled in a context of ``context_tokens`` on ``pool`` keep that context's quality share."""
        self.value[rows] *= context_quality(self.pool_models[pool], context_tokens)

    # ------------------------------------------------------------------ a plan
    def worker(self, lo: int, hi: int):
        """Process: rows [lo, hi) through one worker call; returns ``(rows answered, output tokens)``."""
        w, t = self.workload, self.table
        prompt = w.contract.instruction_tokens + int(t.row_tokens[lo:hi].sum())
        out = int(t.output_tokens[lo:hi].sum())
        outcome, pool = yield self.be.process(self.call_with_retries(w.contract.capability, prompt, out))
        if outcome == "ok":
            rows = np.arange(lo, hi)
            self.keep(rows, pool, prompt + out)
            return rows, out
        if outcome == "rejected" and self.split_on_reject and hi - lo > 1:
            mid = (lo + hi) // 2
            halves = [self.be.process(self.worker(lo, mid)), self.be.process(self.worker(mid, hi))]
            res = yield self.be.all_of(halves)
            parts = [res[h] for h in halves]
            return np.concatenate([p[0] for p in parts]), sum(p[1] for p in parts)
        return _EMPTY, 0

    def merge(self, children: list, root: bool):
        """Process: wait for ``children`` (processes), then merge their answers (an aggregator call for an
        ``llm`` contract with several children or at the root; a table operation otherwise)."""
        res = yield self.be.all_of(children)
        parts = [res[c] for c in children]
        rows = np.concatenate([p[0] for p in parts]) if parts else _EMPTY
        out = int(sum(p[1] for p in parts))
        c = self.workload.contract
        if c.merge == "concat" or len(rows) == 0 or (len(children) == 1 and not root):
            return rows, out
        prompt, n = c.merge_instruction_tokens + out, min(out, c.merge_cap_tokens)
        outcome, pool = yield self.be.process(self.call_with_retries("merge", prompt, n))
        if outcome != "ok":
            return _EMPTY, 0
        self.keep(rows, pool, prompt + n)
        return rows, n

    def execute(self, plan: Plan):
        """Process: the plan's groups, then its merge tree; returns the rows in the final output."""
        d = plan.decomposition
        self.slots = _Slots(self.be, d.max_in_flight)
        for name, pools in ((plan.capability, d.worker_pools), ("merge", d.merge_pools)):
            if pools is not None:   # run-time re-binding: the plan still names only the capability
                old = self.registry.get(name)
                self.registry.register(Capability(name=name, pools=pools, tools=old.tools, description=old.description))
        level = [self.be.process(self.worker(lo, hi)) for lo, hi in plan.groups]
        for k, nodes in enumerate(plan.tree):
            root = k == len(plan.tree) - 1
            level = [self.be.process(self.merge([level[i] for i in node], root)) for node in nodes]
        rows, _ = yield level[0]
        return rows

    # ------------------------------------------------------------------ the outcome
    def result(self, method: str, merged_rows: np.ndarray, *, width: int, depth: int) -> RunResult:
        n = self.table.num_rows
        if len(np.unique(merged_rows)) != len(merged_rows):   # subproblems must not interfere
            raise RuntimeError(f"{method}: a row reached the final output twice (the plan's groups overlap)")
        merged = np.zeros(n, bool)
        merged[merged_rows] = True
        calls = tuple(self.calls)
        ok = [c for c in calls if c.outcome != "rejected"]
        done = max((c.start_s + c.latency_s for c in calls), default=0.0)
        return RunResult(
            method=method, workload=self.workload.name, num_items=n, makespan_s=float(done),
            prompt_tokens=sum(c.prompt_tokens for c in ok), completion_tokens=sum(c.output_tokens for c in ok),
            num_calls=len(calls), retries=self.retries, rejected_calls=sum(c.outcome == "rejected" for c in calls),
            malformed_calls=sum(c.outcome == "malformed" for c in calls), lost_items=int(n - merged.sum()),
            structural_completeness=float(merged.mean()), complete=bool(merged.all()),
            semantic_utility=float(np.where(merged, self.value, 0.0).mean()), width=width, depth=depth,
            peak_context_tokens=max((c.prompt_tokens + c.output_tokens for c in ok), default=0),
            failure_reason=self.failure_reason if not merged.all() else None, calls=calls)
