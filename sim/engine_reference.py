"""The per-request vLLM algorithm of ``EngineCore``: the reference path and the passes both paths share.

Mirrors ``vllm/v1/core/sched/scheduler.py``: ``Scheduler.schedule``'s RUNNING pass with recompute
preemption of the most recently admitted request (``_schedule_reference``, ``_preempt`` for
``_preempt_request``), its WAITING pass (``_admit``: head-of-line admission while budget, ``max_num_seqs``
and KV blocks allow; the fast path calls it too), and ``update_from_output``'s per-request part (``_sample``:
first token, TTFT, inter-token latency, the length cap; ``_finish``).

The reference path runs every step with ``force_reference=True`` and, otherwise, whenever the fast path's
conditions fail (``sim.engine_fast``); it works on materialised requests and leaves the decode aggregate
invalid, to be rebuilt at the next fast step.

This is a mixin: the state it reads is created in ``EngineCore.__init__``.
"""

from __future__ import annotations

from bisect import bisect_left

from .engine_plan import _LENGTH_CAPPED, _PREEMPTED, _RUNNING, _SINGLE, _Plan
from .request import Request
from .timebase import TICKS_PER_S


class _ReferencePath:
    """``EngineCore``'s literal scheduling passes, preemption and per-request completion."""

    # ------------------------------------------------------------------ scheduling
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

    # ------------------------------------------------------------------ completion
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
