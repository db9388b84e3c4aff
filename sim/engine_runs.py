"""Decode runs of ``EngineCore``: k pure-decode steps planned, truncated and completed in closed form.

A run is the fast path's pure-decode step (``sim.engine_fast``) extended while nothing can change but context
growth: no prefill, nothing admissible, no finish before the last step, blocks for all k steps. With the step
model's linear form (``StepTimeModel.linear_decode``: ``a + b * n_dec + g * ctx`` ticks) step j+1 lasts
``g * n_dec`` ticks longer than step j, so the run's end times are an integer sum::

    end(j) = t0 + j * P + g * (j * ctx + n_dec * j * (j - 1) / 2),   P = a + b * n_dec

An arrival (or abort) during the run truncates it at the step then in progress (``_steps_until``); the
gauges between its steps are read off the same arithmetic. vLLM has nothing like it: its engine core
(``vllm/v1/engine/core.py``, ``EngineCore.step``) schedules every step; the result is the same step by step
(``tests/test_engine_modes.py`` checks it to the bit against the reference and fast paths).

This is a mixin: the state it reads is created in ``EngineCore.__init__``.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from heapq import heappop

from .engine_plan import _RUN, _Plan
from .request import Request
from .timebase import TICKS_PER_S


class _DecodeRuns:
    """``EngineCore``'s decode-run planning, end-time arithmetic and run completion."""

    # ------------------------------------------------------------------ planning
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

    # ------------------------------------------------------------------ end times
    @staticmethod
    def _steps_until(p: _Plan, t_s: float) -> int:
        """Smallest j >= 1 whose end time (as a float, exactly as the clock will show it) is >= ``t_s``."""
        step = p.P + p.g * p.ctx  # step j+1 lasts g*n_dec ticks longer than step j
        more = p.g * p.n_dec
        end = p.t0 + step
        j = 1
        while end / TICKS_PER_S < t_s:
            if j == 8:  # far into the run: solve the quadratic instead of walking
                return _DecodeRuns._steps_until_far(p, t_s)
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

    # ------------------------------------------------------------------ completion
    def _complete_run(self, p: _Plan, T: float, finished: list[Request]) -> None:
        clock = self.clock
        D0, j, n = clock.D, p.k, p.n_dec
        if j > 1:  # the first step's blocks were taken when it was planned
            self.kv.pop_free(self._need_over(D0 + 1, j - 1))  # once per run: the per-step copy is in _schedule_fast
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
