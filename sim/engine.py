"""The engine core of one replica: vLLM v1's scheduler step, time-free.

Mirrors ``vllm/v1/core/sched/scheduler.py`` (``Scheduler.schedule``, ``_preempt_request``,
``update_from_output``) and ``vllm/v1/engine/core.py`` (``EngineCore.step``). A step is::

    begin(t)   -> schedule: RUNNING pass, then WAITING pass (only if nobody was preempted);
                  returns the tick at which the step's output batch is emitted
    complete() -> every scheduled request advances; completed prompts sample their first token,
                  decodes one more; finished requests free their blocks and are returned

Three ways to take a step, all producing identical results (tests check this to the bit):

* **reference** (``force_reference=True``): the literal per-request vLLM algorithm, every step.
* **fast**: decoding requests live in an aggregate (count, context sum, block-boundary phase counts, a
  finish heap) so a step with no preemption costs O(1) in the number of decodes plus O(1) per prefill
  chunk and admission. Requests read their progress from a shared decode clock.
* **jump**: a run of k steps in which nothing changes but context growth (no prefill, nothing admissible,
  no finish before the last step, blocks for all k steps) is planned in O(block_size); its end times are
  a closed-form integer sum, and an arrival during the run truncates it at the step then in progress.
  A run is the fast path's pure-decode step extended (so it costs one fast step plus O(1) when it cannot
  be extended); the next arrival, when the caller already knows it (``begin(t, stop_s)``), caps it.

Whenever the fast conditions fail (a preemption would be needed, a prefill sits before a decode with too
little budget for both, ...) the step falls back to the reference algorithm.

Release differences follow ``EngineConfig.vllm_version`` (``sim.config.VLLM_BEHAVIOURS``; checked step by step
against vLLM's own ``Scheduler`` by ``traces.conformance``): from 0.31 ``long_prefill_token_threshold`` is not
applied while a single request is in the scheduler (``begin`` sets the cap in force for the step).

Not simulated: async scheduling placeholders (outputs are still one batch per step), speculative
decoding, PRIORITY policy, pipeline parallelism, KV connectors, encoder inputs, stop strings.

The class is split by path, as mixins over one object's state (a method lookup through the mixins costs the
same as on one class; the hot loops stay inlined where they were):

* ``sim.engine`` (here): ``EngineCore``'s state and public API: ``add_request``, ``begin``, ``complete``,
  ``truncate``, ``gauges``, ``abort``, step records and invariant checks;
* ``sim.engine_fast``: the decode aggregate and the fast step;
* ``sim.engine_runs``: decode runs (the jump arithmetic);
* ``sim.engine_reference``: the literal per-request algorithm and the passes both paths share;
* ``sim.engine_plan``: ``_Plan``, the step or run in flight.
"""

from __future__ import annotations

from collections import deque

from .config import EngineConfig
from .engine_fast import _FastPath
from .engine_plan import _RUN, _WAITING, _Plan
from .engine_plan import _SINGLE as _SINGLE  # re-exported: tests build plans by hand
from .engine_reference import _ReferencePath
from .engine_runs import _DecodeRuns
from .histogram import ITL_BUCKETS_S, TTFT_BUCKETS_S, Histogram, token_buckets
from .kv_cache import KVCacheManager
from .latency import StepTimeModel
from .request import RejectReason, Request, RequestStatus, _DecodeClock
from .steps import StepRecord, scheduled_tokens
from .timebase import TICKS_PER_S, ticks_to_s

__all__ = ["EngineCore"]


class EngineCore(_FastPath, _DecodeRuns, _ReferencePath):
    """One vLLM v1 engine: waiting/running queues, token budget, paged KV cache, recompute preemption."""

    def __init__(self, config: EngineConfig, step_model: StepTimeModel, *, jumps: bool = True,
                 force_reference: bool = False, check_invariants: bool = False, ttft_ema_alpha: float = 0.2):
        self.cfg = config
        self._bs, self._max_batched = config.block_size, config.max_num_batched_tokens  # read every step
        self.model = step_model
        self.kv = KVCacheManager(config)
        self.waiting: deque[Request] = deque()
        self.running: dict[Request, None] = {}  # insertion-ordered: admission order; popitem() = last
        self.clock = _DecodeClock()
        self._linear = step_model.linear_decode  # (per_step, per_decode, per_ctx_token) ticks, or None
        self.jumps = jumps and self._linear is not None and not force_reference
        self.force_reference = force_reference
        self.check = check_invariants
        self.ttft_ema_alpha = ttft_ema_alpha
        self._thr = self._thr_now = config.long_prefill_token_threshold  # the cap in force this step
        self._lone_uncapped = config.has_behaviour("lone_request_prefill_uncapped")
        self.t = 0  # tick of the last emitted output batch
        self.t_s = 0.0  # the same in seconds
        self._plan: _Plan | None = None
        self._spare: _Plan | None = None  # a completed plan for ``_schedule_fast`` to reuse
        self._admit_seq = 0
        self._valid = False  # decode aggregate built?
        self._reset_aggregate()
        # published gauges: state after the last completed step, as vLLM's stats loggers see it
        self.pub_running = self.pub_waiting = self.pub_used_blocks = 0
        # counters (vLLM metric names in comments)
        self.num_steps = 0
        # decode-run jumps (what ``maslat bench sim`` reports): a run of k steps costs one step boundary
        self.num_jumps = 0  # runs completed
        self.num_jumped_steps = 0  # engine steps inside them
        self.num_truncated_jumps = 0  # runs cut short by an arrival (or abort) after they were planned
        self.num_preemptions = 0  # vllm:num_preemptions
        self.prompt_tokens = 0  # vllm:prompt_tokens
        self.generation_tokens = 0  # vllm:generation_tokens
        self.prefix_cache_queries = 0  # vllm:prefix_cache_queries (tokens)
        self.prefix_cache_hits = 0  # vllm:prefix_cache_hits (tokens)
        self.num_finished = 0
        self.num_aborted = 0
        self.ttft_ema_s = float("nan")
        self.itl = Histogram(ITL_BUCKETS_S)  # vllm:inter_token_latency_seconds
        # vllm:time_to_first_token_seconds, observed at the first token as vLLM does, from the frontend
        # arrival (so it includes the frontend delay), not from queued_ts
        self.ttft = Histogram(TTFT_BUCKETS_S)
        self.iteration_tokens = Histogram(token_buckets(config.max_num_batched_tokens))
        self.step_records = None  # the property below; sets ``_hooks``
        self._rec_preempted: tuple[str, ...] = ()
        self._rec_pending: tuple = ()

    # ------------------------------------------------------------------ requests in
    def validate(self, req: Request) -> str | None:
        """Why ``req`` can never be served (vLLM's frontend 400s), or ``None``."""
        if req.num_prompt_tokens < 1:
            return RejectReason.EMPTY_PROMPT
        if req.max_tokens < 1:
            return RejectReason.BAD_MAX_TOKENS
        if req.num_prompt_tokens + req.max_tokens > self.cfg.max_model_len:
            return RejectReason.PROMPT_TOO_LONG
        return None

    def add_request(self, req: Request, t_s: float) -> None:
        """Queue ``req`` (event QUEUED). It is first considered at the next ``begin``."""
        if req.prompt_segments is not None:
            total = sum(n for _, n in req.prompt_segments)
            if total != req.num_prompt_tokens or any(c < 0 or n < 0 for c, n in req.prompt_segments):
                raise ValueError(f"request {req.request_id}: prompt_segments must have content ids >= 0 and "
                                 f"lengths summing to num_prompt_tokens={req.num_prompt_tokens} (got {total})")
        req.queued_ts = t_s
        req.status = _WAITING
        req._decode_clock = self.clock
        self.waiting.append(req)

    @property
    def idle(self) -> bool:
        return not self.running and not self.waiting

    # ------------------------------------------------------------------ scheduling
    def begin(self, t0: int, stop_s: float | None = None) -> int | None:
        """Schedule the next step (or decode run) starting at tick ``t0``; return its end tick.

        ``stop_s``: when the next request already known to the caller reaches the engine; a decode run
        ends at the step then in progress (what ``truncate(stop_s)`` would do right after).
        """
        assert self._plan is None, "begin() while a step is in flight"
        if not self.running and not self.waiting:
            return None
        thr = self._thr
        if thr is not None and self._lone_uncapped and len(self.running) + len(self.waiting) <= 1:
            thr = None  # vLLM >= 0.31: a request alone in the scheduler has nobody to starve
        self._thr_now = thr
        if self.force_reference:
            plan = self._schedule_reference(t0)
        else:
            if not self._valid:
                self._build_aggregate()
            plan = self._schedule_fast(t0)
            if plan is None:
                self._dissolve()
                plan = self._schedule_reference(t0)
            elif self.jumps and not plan.sched and plan.n_dec and not self.prefilling and not self.lagging:
                self._extend_to_run(plan, stop_s)
        self._plan = plan
        if self._hooks:  # one test per step for both
            self._after_begin(plan)
        return plan.end

    @property
    def step_records(self) -> list[StepRecord] | None:
        """Set to ``[]`` to collect a ``StepRecord`` per engine step (``sim.steps``); ``None`` (the default) costs
        nothing."""
        return self._step_records

    @step_records.setter
    def step_records(self, records: list[StepRecord] | None) -> None:
        self._step_records = records
        self._hooks = self.check or records is not None

    def _after_begin(self, plan: _Plan) -> None:
        if self.check:
            self._check_budget(plan)
        if self._step_records is not None:
            self._rec_pending = (*scheduled_tokens(self.running, plan.sched), self._rec_preempted)
            self._rec_preempted = ()

    def _check_budget(self, plan: _Plan) -> None:
        """vLLM's ``Scheduler.schedule`` asserts: the token budget never goes negative, and the step's tokens
        (``total_num_scheduled_tokens``) stay within ``max_num_batched_tokens``."""
        tokens = [n for _, n, _ in plan.sched]
        assert all(n > 0 for n in tokens), f"a request scheduled a non-positive token count: {tokens}"
        total = plan.n_dec + sum(tokens)
        assert total <= self.cfg.max_num_batched_tokens, (
            f"step scheduled {total} tokens > max_num_batched_tokens={self.cfg.max_num_batched_tokens}")
        assert len(tokens) + plan.n_dec <= self.cfg.max_num_seqs, "more requests scheduled than max_num_seqs"

    # ------------------------------------------------------------------ truncation and gauges
    def truncate(self, t_s: float) -> int | None:
        """An arrival at ``t_s`` ends a decode run at the step then in progress; return the new end tick."""
        p = self._plan
        if p is None or p.kind != _RUN:
            return None
        j = self._steps_until(p, t_s)
        if j >= p.k:
            return None
        self.num_truncated_jumps += 1
        p.k = j
        p.end = self._run_end(p, j)
        return p.end

    def gauges(self, t_s: float) -> tuple[int, int, int, int]:
        """``(running, waiting, used_blocks, generation_tokens)`` as published at simulated time ``t_s``."""
        p = self._plan
        if p is not None and p.kind == _RUN and t_s > p.t0_s:
            # steps that ended strictly before t_s
            j = p.k if p.end / TICKS_PER_S < t_s else min(p.k, self._steps_until(p, t_s) - 1)
            if j > 0:  # the run's steps publish the queues as they stood when it was planned
                used = p.used0 + self._need_over(self.clock.D, j)
                return len(self.running), len(self.waiting), used, self.generation_tokens + p.n_dec * j
        return self.pub_running, self.pub_waiting, self.pub_used_blocks, self.generation_tokens

    # ------------------------------------------------------------------ completion
    def complete(self, end_s: float | None = None) -> list[Request]:
        """Apply the in-flight step's outputs at its end tick; return the requests that finished.

        ``end_s``: that tick in seconds (``end / TICKS_PER_S``), if the caller has it.
        """
        p = self._plan
        assert p is not None, "complete() without begin()"
        self._plan = None
        T = p.end / TICKS_PER_S if end_s is None else end_s
        if self.check:
            assert T == p.end / TICKS_PER_S, f"complete(end_s={end_s}) at the wrong time"
        finished: list[Request] = []
        if p.fast:
            self._complete_fast(p, T, finished)
        elif p.kind == _RUN:
            self._complete_run(p, T, finished)
        else:
            self._complete_reference(p, T, finished)
        self.t, self.t_s = p.end, T
        self.pub_running, self.pub_waiting = len(self.running), len(self.waiting)
        kv = self.kv
        self.pub_used_blocks = kv.num_usable - kv.free
        if finished:
            self.num_finished += len(finished)
        if self._hooks:
            if self._step_records is not None:
                self._record(p, finished)
            if self.check:
                self.check_invariants()
        self._spare = p
        return finished

    def _record(self, p: _Plan, finished: list[Request]) -> None:
        """Append the completed plan's ``StepRecord``s: one per engine step (k for a decode run)."""
        pairs, prefill, decode, preempted = self._rec_pending
        k = p.k if p.kind == _RUN else 1
        first = self.num_steps - k
        done = tuple(sorted(r.request_id for r in finished))
        start = p.t0
        for j in range(k):
            end = p.end if j == k - 1 else self._run_end(p, j + 1)
            self._step_records.append(StepRecord(
                step=first + j, start_s=ticks_to_s(start), end_s=ticks_to_s(end), num_scheduled_tokens=pairs,
                num_prefill_tokens=prefill, num_decode_tokens=decode, preempted_req_ids=preempted if j == 0 else (),
                finished_req_ids=done if j == k - 1 else ()))
            start = end

    # ------------------------------------------------------------------ aborts
    def abort(self, req: Request) -> bool:
        """Drop an unfinished request whose client went away (``Scheduler.finish_requests`` with
        ``FINISHED_ABORTED``): it leaves ``waiting`` or ``running`` and its blocks are freed.

        vLLM handles aborts from the engine core's input queue between steps, so this must be called with
        no step in flight (the replica calls it at a step boundary). The request keeps the timestamps it
        reached; ``last_token_ts`` is its last output (NaN if none). Returns False if it had already
        finished.
        """
        assert self._plan is None, "abort() while a step is in flight"
        if req.status.is_finished:
            return False
        if req.status == RequestStatus.RUNNING:
            # materialise the decode aggregate (O(running)); aborts are rare, steps are not
            self._dissolve()
            self.kv.free_request(req)
            del self.running[req]
        else:
            self.waiting.remove(req)
        req.status = RequestStatus.FINISHED_ABORTED
        req.last_token_ts = req.last_output_ts
        self.num_aborted += 1
        self.pub_running, self.pub_waiting = len(self.running), len(self.waiting)
        self.pub_used_blocks = self.kv.num_usable - self.kv.free
        if self.check:
            self.check_invariants()
        return True

    # ------------------------------------------------------------------ checks
    def check_invariants(self) -> None:
        """Blocks conserved, running <= max_num_seqs, every request in exactly one place."""
        assert len(self.running) <= self.cfg.max_num_seqs, "len(running) > max_num_seqs"
        holders = list(self.running)
        saved = []
        if self._valid:  # materialise decoding requests' holdings for the check, then restore
            D, bs = self.clock.D, self.cfg.block_size
            for r in holders:
                if r._is_decoding:
                    c = r._computed_base + D
                    extra = -(-c // bs) - r.kv_blocks
                    saved.append((r, r.kv_anon))
                    r.kv_anon += extra
        try:
            self.kv.check_invariants(holders)
        finally:
            for r, anon in saved:
                r.kv_anon = anon
        ids = [id(r) for r in self.waiting] + [id(r) for r in self.running]
        assert len(ids) == len(set(ids)), "a request is queued twice"
        for r in self.waiting:
            assert r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED) and r.kv_blocks == 0
        if self._valid:
            assert self.n_dec + len(self.prefilling) == len(self.running), "aggregate out of sync"
