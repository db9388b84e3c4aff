"""The fast path of ``sim.engine.EngineCore``: the decode aggregate and the O(1)-in-decodes step.

Decoding requests live in an aggregate instead of being walked one by one as vLLM's ``Scheduler.schedule``
(``vllm/v1/core/sched/scheduler.py``) walks ``self.running``: their count (``n_dec``), their context sum
(``ctx_base`` plus ``n_dec`` times the shared decode clock ``D``), how many sit at each block-boundary phase
(``phase``: who needs a new KV block at the next step) and a finish heap keyed on the decode clock. A request
reads its own progress from the clock (``sim.request._DecodeClock``) and is materialised (``_leave_decode``)
only when it finishes, or when the aggregate is dissolved for the reference path.

A fast step costs O(1) in the number of decodes plus O(1) per prefill chunk and admission. It gives the
reference path's result exactly whenever it applies: no preemption is needed and the prefilling requests
either come after every decode in admission order or all fit in the budget (``_prefill_chunks``); otherwise
``_schedule_fast`` returns ``None`` and ``EngineCore.begin`` falls back to ``sim.engine_reference``.

This is a mixin: the state it reads is created in ``EngineCore.__init__``; the hot loops keep their inlined
bodies (one call less per step or per request, measured by ``maslat bench sim``).
"""

from __future__ import annotations

from bisect import bisect_left
from heapq import heappop, heappush

from .engine_plan import _LENGTH_CAPPED, _SINGLE, _Plan
from .request import Request
from .timebase import TICKS_PER_S, ticks_to_s


class _FastPath:
    """``EngineCore``'s decode aggregate, fast scheduling pass and fast completion."""

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

    # ------------------------------------------------------------------ fast scheduling
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

    # ------------------------------------------------------------------ fast completion
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
