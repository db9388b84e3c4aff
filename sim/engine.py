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
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections import deque
from heapq import heappop, heappush

from .config import EngineConfig
from .histogram import ITL_BUCKETS_S, TTFT_BUCKETS_S, Histogram, token_buckets
from .kv_cache import KVCacheManager
from .latency import StepTimeModel
from .request import RejectReason, Request, RequestStatus, _DecodeClock
from .steps import StepRecord, scheduled_tokens
from .timebase import TICKS_PER_S, ticks_to_s

__all__ = ["EngineCore"]

_SINGLE, _RUN = 0, 1
# enum members as module constants: a class-attribute lookup on an Enum costs ~10x a global lookup
_WAITING, _RUNNING, _PREEMPTED = RequestStatus.WAITING, RequestStatus.RUNNING, RequestStatus.PREEMPTED
_LENGTH_CAPPED = RequestStatus.FINISHED_LENGTH_CAPPED


class _Plan:
    """The step (``_SINGLE``) or decode run (``_RUN``) in flight between ``begin`` and ``complete``.

    ``t0_s`` is ``t0`` in seconds (a big tick count divides slowly: computed once). ``k``, ``k_fin``, ``P``,
    ``g`` and ``used0`` are only set on runs.
    """

    __slots__ = ("kind", "t0", "t0_s", "end", "fast", "sched", "n_dec", "ctx", "k", "k_fin", "P", "g", "used0")

    def __init__(self, kind: int, t0: int, t0_s: float, fast: bool = False):
        self.kind, self.t0, self.t0_s, self.fast = kind, t0, t0_s, fast
        self.sched: list = []
        self.n_dec = self.ctx = 0


class EngineCore:
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

    # ------------------------------------------------------------------ decode aggregate
    def _reset_aggregate(self) -> None:
        self.n_dec = 0
        self.ctx_base = 0  # sum of (computed - D) over decoding requests
        self.phase = [0] * self.cfg.block_size
        self.fin_heap: list[tuple[int, int, Request]] = []
        self.prefilling: dict[Request, None] = {}
        self.max_dec_seq = -1
        self.lagging: list[Request] = []  # decodes whose last token predates the last step end

    def _enter_decode(self, r: Request) -> None:
        D = self.clock.D
        r._computed_base = dorig = r._num_computed_tokens - D
        r._output_base = oorig = r._num_output_tokens - D
        r._is_decoding = True
        self.n_dec += 1
        self.ctx_base += dorig
        self.phase[dorig % self._bs] += 1
        r._finish_step = fkey = r.max_tokens - 1 - oorig
        heappush(self.fin_heap, (fkey, r.seq_id, r))
        if r._admit_seq > self.max_dec_seq:
            self.max_dec_seq = r._admit_seq

    def _leave_decode(self, r: Request, last_output_s: float) -> None:
        """Materialise a decoding request's progress and KV holdings; it leaves the aggregate."""
        D, dorig, bs = self.clock.D, r._computed_base, self.cfg.block_size
        c = dorig + D
        r._num_computed_tokens, r._num_output_tokens, r._is_decoding = c, r._output_base + D, False
        self.n_dec -= 1
        self.ctx_base -= dorig
        self.phase[dorig % bs] -= 1
        r._finish_step = -1
        nb = -(-c // bs)
        extra = nb - r.kv_blocks
        r.kv_blocks = nb
        r.kv_anon += extra  # decode blocks hold private (output) content: registered only on preemption
        if last_output_s == last_output_s:  # not NaN
            r.last_output_ts = last_output_s

    def _build_aggregate(self) -> None:
        self._reset_aggregate()
        for r in self.running:
            if r._num_output_tokens >= 1 and r._num_computed_tokens == r.num_tokens - 1:
                self._enter_decode(r)
                if r.last_output_ts != ticks_to_s(self.t):
                    self.lagging.append(r)
            else:
                self.prefilling[r] = None
        self._valid = True

    def _dissolve(self) -> None:
        if not self._valid:
            return
        prev_end = ticks_to_s(self.t)
        lag = set(map(id, self.lagging))
        for r in self.running:
            if r._is_decoding:
                self._leave_decode(r, float("nan") if id(r) in lag else prev_end)
        self._reset_aggregate()
        self._valid = False

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

    def _admit(self, plan: _Plan, budget: int, free: int | None = None) -> int:
        """WAITING pass: admit from the head while budget, slots and blocks allow (head-of-line)."""
        cfg, kv, waiting, running = self.cfg, self.kv, self.waiting, self.running
        bs, max_seqs, gate = cfg.block_size, cfg.max_num_seqs, cfg.scheduler_reserve_full_isl
        now_s = plan.t0_s
        thr = self._thr_now
        sched, prefilling = plan.sched, (self.prefilling if self._valid else None)
        while waiting and budget > 0 and len(running) < max_seqs:
            r = waiting[0]
            tokens = r.num_prompt_tokens + r._num_output_tokens
            if r.prompt_segments is None and not r.num_preemptions:
                # a private prompt never computed before has no cached prefix (find_hit's shortcut)
                h = 0
                n = tokens if thr is None or tokens <= thr else thr
                if n > budget:
                    n = budget
                if not kv.allocate_private_prompt(r, n, gate):
                    break
            else:
                hit, ev = kv.find_hit(r) if r._num_computed_tokens == 0 else (0, 0)
                h = hit * bs
                n = tokens - h
                if thr is not None and n > thr:
                    n = thr
                if n > budget:
                    n = budget
                if not kv.allocate_slots(r, n, hit, ev, gate):
                    break
            waiting.popleft()
            running[r] = None
            r.status = _RUNNING
            r._num_computed_tokens = h
            if r.num_cached_tokens < 0:
                r.num_cached_tokens = h
                r.scheduled_ts = now_s
            self.prefix_cache_queries += tokens
            self.prefix_cache_hits += h
            self._admit_seq += 1
            r._admit_seq = self._admit_seq
            if prefilling is not None:
                prefilling[r] = None
            sched.append((r, n, h))
            budget -= n
        return budget

    def _schedule_fast(self, t0: int) -> _Plan | None:
        """O(1)-in-decodes step when no preemption is needed; ``None`` if the fast conditions fail."""
        n_dec = self.n_dec
        budget = self._max_batched - n_dec
        if budget < 0:
            return None
        kv = self.kv
        D = self.clock.D
        need = self.phase[(-D) % self._bs] if n_dec else 0
        free = kv.free - need
        if free < 0:
            return None
        chunks = ()
        if self.prefilling:
            chunks = self._prefill_chunks(budget, free)
            if chunks is None:
                return None
        # commit: nothing above changed any state
        plan = self._spare  # the last completed plan, reused (nothing keeps it): one object less per step
        t0_s = self.t_s if t0 == self.t else t0 / TICKS_PER_S
        if plan is None:
            plan = _Plan(_SINGLE, t0, t0_s, True)
        else:
            self._spare = None
            plan.kind, plan.t0, plan.t0_s, plan.fast, plan.sched, plan.n_dec, plan.ctx = _SINGLE, t0, t0_s, True, [], 0, 0
        if need:
            head = kv._head.next  # kv.pop_free(need), its common case inlined: once per step
            if head.node is None and head.hi - head.lo > need:
                head.hi -= need
                kv.free -= need
            else:
                kv.pop_free(need)
        sched = plan.sched
        for r, n in chunks:
            ok = kv.allocate_slots(r, n)
            assert ok
            sched.append((r, n, r._num_computed_tokens))
            budget -= n
        plan.n_dec = n_dec
        plan.ctx = ctx = self.ctx_base + n_dec * D
        if self.waiting:
            self._admit(plan, budget)
        lin = self._linear
        if sched or lin is None:
            plan.end = t0 + self._step_ticks(sched, n_dec, ctx)
        else:  # a pure-decode step: the model's linear form (``StepTimeModel.linear_decode``)
            plan.end = t0 + lin[0] + lin[1] * n_dec + lin[2] * ctx
        return plan

    def _prefill_chunks(self, budget: int, free: int) -> list[tuple[Request, int]] | None:
        """This step's chunks of the prefilling requests in admission order, within ``budget`` tokens and
        ``free`` blocks; ``None`` when the fast path cannot take them (blocks run out, or a prefill admitted
        before some decode would not leave that decode its token)."""
        cfg = self.cfg
        bs, thr, max_c = cfg.block_size, self._thr_now, cfg.max_model_len - 1
        demand = 0
        ordered = True
        max_dec_seq = self.max_dec_seq
        for r in self.prefilling:
            rem = r.num_prompt_tokens + r._num_output_tokens - r._num_computed_tokens
            demand += rem if thr is None or rem <= thr else thr
            ordered = ordered and r._admit_seq > max_dec_seq
        if not ordered and demand > budget:
            return None
        chunks = []
        for r in self.prefilling:
            if budget <= 0:
                break
            n = r.num_prompt_tokens + r._num_output_tokens - r._num_computed_tokens
            if thr is not None and n > thr:
                n = thr
            n = min(n, budget, max_c - r._num_computed_tokens)
            if n <= 0:
                continue
            nb = -(-(r._num_computed_tokens + n) // bs) - r.kv_blocks
            if nb > free:
                return None
            free -= max(nb, 0)
            chunks.append((r, n))
            budget -= n
        return chunks

    def _step_ticks(self, sched: list, n_dec: int, ctx: int) -> int:
        """Step time of ``n_dec`` aggregated decodes plus the individually scheduled entries."""
        chunks = []
        for r, n, p in sched:
            if n == 1 and r._num_output_tokens >= 1 and p == r.num_prompt_tokens + r._num_output_tokens - 1:
                n_dec += 1
                ctx += p
            else:
                chunks.append((n, p))
        return self.model.step_ticks(n_dec, ctx, chunks)

    def _need_over(self, D: int, k: int) -> int:
        """Blocks the decodes need over the k steps starting at decode clock D."""
        bs, n, ph = self._bs, self.n_dec, self.phase
        q, rem = divmod(k, bs)
        total = q * n
        for j in range(rem):
            total += ph[(-(D + j)) % bs]
        return total

    def _extend_to_run(self, plan: _Plan, stop_s: float | None) -> None:
        """Turn a planned pure-decode step whose WAITING pass admitted nobody into a run of k >= 2 such steps.

        The run stops before the step after the next finish, before the decodes' blocks run out, and at the
        step in progress at ``stop_s``. Nothing else can change in between: the budget and the running
        count stay as they are, the free blocks only shrink, and so the head of ``waiting`` stays blocked
        (see ``_head_stays_blocked`` for the one exception). Leaves ``plan`` as it is when k would be 1.
        """
        if stop_s is not None and plan.end / TICKS_PER_S >= stop_s:
            return  # the next arrival lands during the first step
        n, D = plan.n_dec, self.clock.D
        h = self.fin_heap  # the next finish: drop stale entries (every decode has a valid one)
        while h[0][2]._finish_step != h[0][0]:
            heappop(h)
        k_fin = h[0][0] - D + 1
        if k_fin < 2:
            return
        bs, phase = self._bs, self.phase
        free = self.kv.free + phase[(-D) % bs]  # before the first step's blocks, taken by _schedule_fast
        # largest k <= k_fin whose cumulative block need fits
        cycles = free // n
        if cycles * bs >= k_fin:
            k = k_fin
        else:
            k, used = cycles * bs, cycles * n
            while k < k_fin:
                nxt = phase[(-(D + k)) % bs]
                if used + nxt > free:
                    break
                used += nxt
                k += 1
        if self.waiting and not self.cfg.scheduler_reserve_full_isl:
            k = self._head_stays_blocked(D, k, n)
        if k < 2:
            return
        a, b, g = self._linear
        plan.kind, plan.fast, plan.k_fin, plan.P, plan.g = _RUN, False, k_fin, a + b * n, g
        if stop_s is not None:
            k = min(k, self._steps_until(plan, stop_s))
        plan.k = k
        plan.used0 = self.kv.num_usable - free
        plan.end = plan.t0 + k * plan.P + g * (k * plan.ctx + n * k * (k - 1) // 2)  # _run_end(plan, k)

    def _head_stays_blocked(self, D: int, k: int, n: int) -> int:
        """How many of the k steps the head of ``waiting`` (not admitted at the first) surely stays blocked.

        Without the full-sequence gate, the decodes' new blocks can evict part of the head's cached prefix:
        its hit shrinks, and so may what ``allocate_slots`` asks of the free blocks (evictable hits count
        against them). Then only the steps that take no new block are certain.
        """
        if len(self.running) >= self.cfg.max_num_seqs or self.cfg.max_num_batched_tokens - n <= 0:
            return k
        _, evictable = self.kv.find_hit(self.waiting[0])
        if not evictable:
            return k
        bs, phase = self.cfg.block_size, self.phase
        j = 1
        while j < k and not phase[(-(D + j)) % bs]:
            j += 1
        return j

    @staticmethod
    def _run_end(p: _Plan, j: int) -> int:
        return p.t0 + j * p.P + p.g * (j * p.ctx + p.n_dec * j * (j - 1) // 2)

    def _schedule_reference(self, t0: int) -> _Plan:
        """The literal vLLM algorithm over materialised requests (used when the fast path cannot be)."""
        cfg, kv = self.cfg, self.kv
        plan = _Plan(_SINGLE, t0, t0 / TICKS_PER_S)
        budget = cfg.max_num_batched_tokens
        thr = self._thr_now
        order = list(self.running)
        preempted: list[Request] = []
        i = 0
        while i < len(order) and budget > 0:
            r = order[i]
            n = r.num_tokens - r._num_computed_tokens
            if thr is not None and n > thr:
                n = thr
            n = min(n, budget, cfg.max_model_len - 1 - r._num_computed_tokens)
            if n <= 0:
                i += 1
                continue
            while not kv.allocate_slots(r, n):
                victim, _ = self.running.popitem()  # the most recently admitted (FCFS: running.pop())
                order.pop()
                self._preempt(victim)
                preempted.append(victim)
                if victim is r:
                    break
            if preempted and preempted[-1] is r:
                break
            plan.sched.append((r, n, r._num_computed_tokens))
            budget -= n
            i += 1
        if not preempted:
            self._admit(plan, budget)
        if self._step_records is not None:
            self._rec_preempted = tuple(v.request_id for v in preempted)
        plan.end = t0 + self._step_ticks(plan.sched, 0, 0)
        return plan

    def _preempt(self, r: Request) -> None:
        """Recompute preemption (``Scheduler._preempt_request``): free, reset, front of waiting."""
        self.kv.cache_private(r, r._num_computed_tokens)
        self.kv.free_request(r)
        self.prefilling.pop(r, None)
        r.status = _PREEMPTED
        r._num_computed_tokens = 0
        r.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(r)

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

    @staticmethod
    def _steps_until(p: _Plan, t_s: float) -> int:
        """Smallest j >= 1 whose end time (as a float, exactly as the clock will show it) is >= ``t_s``."""
        step = p.P + p.g * p.ctx  # step j+1 lasts g*n_dec ticks longer than step j
        more = p.g * p.n_dec
        end = p.t0 + step
        j = 1
        while end / TICKS_PER_S < t_s:
            if j == 8:  # far into the run: solve the quadratic instead of walking
                return EngineCore._steps_until_far(p, t_s)
            step += more
            end += step
            j += 1
        return j

    @staticmethod
    def _steps_until_far(p: _Plan, t_s: float) -> int:
        """``_steps_until`` from the quadratic's root (a float seed, settled on the exact end times)."""
        if p.t0_s >= t_s:
            return 1
        t0, P, g, ctx, n = p.t0, p.P, p.g, p.ctx, p.n_dec
        A = g * n / 2.0
        B = P + g * ctx - A
        C = t0 - t_s * TICKS_PER_S
        j = int((-B + math.sqrt(B * B - 4 * A * C)) / (2 * A)) if A > 0 else int(-C / B)
        j = max(1, j - 1)
        # exact integer end times decide (the float estimate only seeds the search)
        while (t0 + j * P + g * (j * ctx + n * j * (j - 1) // 2)) / TICKS_PER_S < t_s:
            j += 1
        while j > 1 and (t0 + (j - 1) * P + g * ((j - 1) * ctx + n * (j - 1) * (j - 2) // 2)) / TICKS_PER_S >= t_s:
            j -= 1
        return j

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

    def _finish_decodes(self, key: int, T: float, finished: list[Request]) -> None:
        """Decodes whose last token came at decode clock ``key`` leave the aggregate and finish
        (``_leave_decode`` and ``_finish`` inlined: once per request)."""
        h = self.fin_heap
        D, bs, phase, kv, running, prefilling = self.clock.D, self.cfg.block_size, self.phase, self.kv, self.running, \
            self.prefilling
        while h and h[0][0] <= key:
            _, _, r = heappop(h)
            if r._finish_step == key:
                dorig = r._computed_base
                c = dorig + D
                r._num_computed_tokens, r._num_output_tokens, r._is_decoding = c, r._output_base + D, False
                self.n_dec -= 1
                self.ctx_base -= dorig
                phase[dorig % bs] -= 1
                r._finish_step = -1
                nb = -(-c // bs)
                r.kv_anon += nb - r.kv_blocks
                r.kv_blocks = nb
                r.last_output_ts = r.last_token_ts = T
                r.status = _LENGTH_CAPPED
                kv.free_request(r)
                del running[r]
                if prefilling:
                    prefilling.pop(r, None)
                finished.append(r)

    def _complete_run(self, p: _Plan, T: float, finished: list[Request]) -> None:
        clock = self.clock
        D0, j, n = clock.D, p.k, p.n_dec
        if j > 1:  # the first step's blocks were taken when it was planned
            m, kv = self._need_over(D0 + 1, j - 1), self.kv
            head = kv._head.next  # kv.pop_free(m), its common case inlined: once per run
            if head.node is None and head.hi - head.lo > m:
                head.hi -= m
                kv.free -= m
            else:
                kv.pop_free(m)
        clock.D = D0 + j
        self.num_steps += j
        self.num_jumps += 1
        self.num_jumped_steps += j
        self.generation_tokens += n * j
        g = p.g
        self.itl.observe_linear((p.P + g * p.ctx) / TICKS_PER_S, g * n / TICKS_PER_S, j, n)
        it = self.iteration_tokens  # it.observe(n, j), inlined: once per run
        it.counts[bisect_left(it.bounds, n)] += j
        it.sum += n * j
        it.count += j
        if j == p.k_fin:
            self._finish_decodes(D0 + j - 1, T, finished)

    def _complete_fast(self, p: _Plan, T: float, finished: list[Request]) -> None:
        clock = self.clock
        D0 = clock.D
        n_dec = p.n_dec
        clock.D = D0 + 1
        self.num_steps += 1
        self.generation_tokens += n_dec
        if n_dec:
            dur_s = T - p.t0_s
            lag = self.lagging
            if lag:
                for r in lag:
                    if r._is_decoding:
                        self.itl.observe(T - r.last_output_ts)
                self.lagging = []
            w, itl = n_dec - len(lag), self.itl  # itl.observe(dur_s, w), inlined: once per step
            itl.counts[bisect_left(itl.bounds, dur_s)] += w
            itl.sum += dur_s * w
            itl.count += w
            h = self.fin_heap
            if h and h[0][0] <= D0:
                self._finish_decodes(D0, T, finished)
        tokens = n_dec
        for r, n, _ in p.sched:
            tokens += n
            r._num_computed_tokens = c = r._num_computed_tokens + n
            if c >= r.num_prompt_tokens + r._num_output_tokens:
                self._sample(r, T, finished)
        it = self.iteration_tokens  # it.observe(tokens), inlined
        it.counts[bisect_left(it.bounds, tokens)] += 1
        it.sum += tokens
        it.count += 1

    def _complete_reference(self, p: _Plan, T: float, finished: list[Request]) -> None:
        self.num_steps += 1
        self.iteration_tokens.observe(sum(n for _, n, _ in p.sched))
        for r, n, _ in p.sched:
            r._num_computed_tokens += n
            if r._num_computed_tokens >= r.num_prompt_tokens + r._num_output_tokens:
                self._sample(r, T, finished)
        self._valid = False

    def _sample(self, r: Request, T: float, finished: list[Request]) -> None:
        """The step completed r's pending tokens: it samples one output token."""
        r._num_output_tokens = out = r._num_output_tokens + 1
        self.generation_tokens += 1
        if out == 1 and r.first_token_ts != r.first_token_ts:  # first token ever
            r.first_token_ts = T
            self.prompt_tokens += r.num_prompt_tokens
            ttft = T - r.queued_ts
            h, v = self.ttft, T - r.arrival_time  # h.observe(v), inlined: once per request
            h.counts[bisect_left(h.bounds, v)] += 1
            h.sum += v
            h.count += 1
            a = self.ttft_ema_alpha
            self.ttft_ema_s = ttft if self.ttft_ema_s != self.ttft_ema_s else a * ttft + (1 - a) * self.ttft_ema_s
        else:
            self.itl.observe(T - r.last_output_ts)
        r.last_output_ts = T
        if out >= r.max_tokens:
            self._finish(r, T, finished)
        elif self._valid:  # it joins the decode aggregate (once per request)
            del self.prefilling[r]
            self._enter_decode(r)

    def _finish(self, r: Request, T: float, finished: list[Request]) -> None:
        r.status = _LENGTH_CAPPED
        r.last_token_ts = T
        self.kv.free_request(r)
        del self.running[r]
        self.prefilling.pop(r, None)
        finished.append(r)

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
