"""One replica's background tape and the closed-form service of an agent call against it.

Split out of ``envs.bgtape`` (which records the tapes and replays them as a world) to keep each file small:
this module holds only ``ReplicaTape``, the per-replica lookups (step clock, queues, outstanding count) and
``serve``, the closed-form FCFS queueing, chunked prefill and per-step decode of one agent call described in
``envs.bgtape``'s docstring. ``envs.bgtape`` re-exports ``ReplicaTape``.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right

import numpy as np

from sim.latency import JitteredStepModel
from sim.timebase import TICKS_PER_S

__all__ = ["ReplicaTape"]


class ReplicaTape:
    """One replica's background, boundary by boundary, looped with period ``period_s`` (see module docstring).

    Every lookup maps a time to its place on the loop: ``k`` whole periods and the local time ``x`` (``divmod``),
    then the boundary index by ``bisect`` on plain lists (faster than numpy on one scalar). ``serve`` computes
    that place once per time it needs and reuses it.
    """

    def __init__(self, rows: dict[str, np.ndarray], t0_s: float, period_s: float, engine, step_model, overheads):
        self.t0_s, self.period_s = t0_s, period_s
        self.cfg, self.ov = engine, overheads
        # a jittered model draws from its own generator on every step_ticks: the tape must not (it is shared by
        # every world of a session), so the agent's own costs come from the deterministic base model
        self.model = step_model.base if isinstance(step_model, JitteredStepModel) else step_model
        t = rows["t_s"]
        self.t = t.tolist()
        self.n = len(self.t)
        self.running, self.waiting = rows["running"].tolist(), rows["waiting"].tolist()
        self.used, self.ema = rows["used"].tolist(), rows["ema_s"].tolist()
        self.arrived = rows["arrived"].tolist()
        self.admitted_max = np.maximum.accumulate(rows["admitted"]).tolist()
        # the router's count: outstanding at the start, plus submits since, less requests done since
        self.submits, self.out0 = rows["submits"].tolist(), int(rows["out0"])
        done = rows["admitted"] - rows["running"]
        self.done_since = (done - rows["done0"]).tolist()
        lin = self.model.linear_decode
        self.per_step_s, self.per_dec_s, self.per_ctx_s = (x / TICKS_PER_S for x in lin) if lin else (0.0, 0.0, 0.0)
        self.S = rows["S"].tolist()
        self.S_period = self.S[-1]
        self.pf_base = self.model.step_ticks(0, 0, []) / TICKS_PER_S
        self._max_batched, self._block = engine.max_num_batched_tokens, engine.block_size
        self._budget_cap = engine.long_prefill_token_threshold or None

    # ---------------------------------------------------------------- looping
    def _local(self, t_s: float) -> tuple[int, float]:
        k, x = divmod(t_s - self.t0_s, self.period_s)
        return int(k), self.t0_s + x

    def _index(self, t_s: float) -> tuple[int, int]:
        """(period, index of the last boundary at or before t_s, -1 if none in the period)."""
        k, x = divmod(t_s - self.t0_s, self.period_s)
        return int(k), bisect_right(self.t, self.t0_s + x) - 1

    def state(self, t_s: float) -> tuple[int, int, int, float]:
        """(running, waiting, used blocks, TTFT EMA s) of the background at ``t_s``."""
        i = bisect_right(self.t, self.t0_s + (t_s - self.t0_s) % self.period_s) - 1
        if i < 0:
            i = 0
        return self.running[i], self.waiting[i], self.used[i], self.ema[i]

    def outstanding(self, t_s: float) -> int:
        """Background requests submitted to this replica and not finished at ``t_s`` (the router's count)."""
        x = self.t0_s + (t_s - self.t0_s) % self.period_s
        i = bisect_right(self.t, x) - 1
        return self.out0 + bisect_right(self.submits, x) - (self.done_since[i] if i >= 0 else 0)

    def _steps_at(self, t_s: float) -> float:
        k, x = divmod(t_s - self.t0_s, self.period_s)
        x += self.t0_s
        return self._steps_local(int(k), x, bisect_right(self.t, x))

    def _steps_local(self, k: int, x: float, i: int) -> float:
        """The step clock at local time ``x`` of period ``k``, ``i`` = ``bisect_right(t, x)``."""
        S, t = self.S, self.t
        if i >= self.n:
            return k * self.S_period + S[-1]
        s_prev, t_prev = (S[i - 1], t[i - 1]) if i else (0.0, self.t0_s)
        frac = (x - t_prev) / (t[i] - t_prev) if t[i] > t_prev else 1.0
        return k * self.S_period + s_prev + frac * (S[i] - s_prev)

    def _time_at_steps(self, s: float) -> float:
        S, t = self.S, self.t
        k, x = divmod(s, self.S_period)
        i = bisect_left(S, x)
        if i >= self.n:
            i = self.n - 1
        s_prev, t_prev = (S[i - 1], t[i - 1]) if i else (0.0, self.t0_s)
        frac = (x - s_prev) / (S[i] - s_prev) if S[i] > s_prev else 1.0
        return k * self.period_s + t_prev + frac * (t[i] - t_prev)

    def _admit_time(self, t_s: float) -> float:
        """First boundary at or after ``t_s`` by which every background request queued before it is admitted."""
        k, i = self._index(t_s)
        return self._admit_local(t_s, k, i)

    def _admit_local(self, t_s: float, k: int, i: int) -> float:
        if i < 0 or self.waiting[i] == 0:
            return t_s
        j = bisect_left(self.admitted_max, self.arrived[i], lo=i)
        if j >= self.n:  # not within this period: admitted at the wrap (the tape starts over)
            return (k + 1) * self.period_s + self.t0_s
        return k * self.period_s + self.t[j]

    # ---------------------------------------------------------------- one call
    def _prefix_hit(self, prompt_tokens: int, segments, cache: dict) -> int:
        """Tokens of the prompt found in this world's cache of the replica, as ``sim.kv_cache`` names content:
        a segment is a stream identified by its content id and everything before it, so two prompts share
        the common part of a segment after an identical chain (``build_chain``). Block-floored, capped below
        the last token; records the prompt. No eviction (the approximation's)."""
        if not segments:
            return 0
        hit, node, full = 0, 0, True
        for cid, n in segments:
            key = (node, cid)
            seen = cache.get(key, 0)
            if full:
                h = min(seen, n)
                hit += h
                full = h == n
            if n > seen:
                cache[key] = n
            node = hash((node, n, cid))
        bs = self.cfg.block_size
        return min((hit // bs) * bs, ((prompt_tokens - 1) // bs) * bs)

    def _prefill_s(self, new: int, hit: int) -> float:
        """The step time a prefill chunk of ``new`` tokens after ``hit`` cached ones adds."""
        return max(self.model.step_ticks(0, 0, [(new, hit)]) / TICKS_PER_S - self.pf_base, 0.0)

    def serve(self, t_enqueue_s: float, prompt_tokens: int, output_tokens: int, segments, cache: dict,
              agents: list) -> tuple[float, float]:
        """(first token time, last token time) of one call reaching this engine at ``t_enqueue_s``.

        ``cache`` holds the prefix keys the caller's world has sent to this replica, ``agents`` its calls in
        flight there as ``[first token time, last token time, prefill tokens, prefill s, admission time]``
        (both updated): calls admitted at the same instant share a step (budget and prefill cost), a call
        whose prefill step is in progress delays the next step by the time its chunk adds, and every call in
        flight adds its decode cost to the steps."""
        hit = self._prefix_hit(prompt_tokens, segments, cache)
        new = prompt_tokens - hit
        t0, t, period = self.t0_s, self.t, self.period_s
        k, x = divmod(t_enqueue_s - t0, period)
        x += t0
        j = bisect_right(t, x)
        t_a = t_enqueue_s
        if j > 0 and self.waiting[j - 1]:
            t_a = self._admit_local(t_enqueue_s, int(k), j - 1)
            if t_a != t_enqueue_s:  # admitted at a later boundary: its place on the loop
                k, x = divmod(t_a - t0, period)
                x += t0
                j = bisect_right(t, x)
        live = [a for a in agents if a[1] > t_enqueue_s] if agents else agents
        agents[:] = live
        same_new = same_pf = 0
        in_progress = 0.0
        for a in live:
            if a[4] == t_a:
                same_new += a[2]
                same_pf += a[3]
            elif a[0] > t_a and a[0] > in_progress:
                in_progress = a[0]
        budget = self._budget(self.running[j - 1 if j > 0 else 0])
        k_pf = max(1, math.ceil((new + same_new) / budget))
        pf_own = self._prefill_s(new, hit)
        s0 = math.ceil(self._steps_local(int(k), x, j) - 1e-9)
        delay = max(0.0, in_progress - self._time_at_steps(s0)) if in_progress else 0.0
        t_first = self._time_at_steps(s0 + k_pf) + pf_own + same_pf + delay
        n_dec = output_tokens - 1
        t_last = t_first
        if n_dec > 0:
            ctx = prompt_tokens + output_tokens / 2
            marg = (self.per_dec_s + self.per_ctx_s * ctx) * (1 + len(live))
            k, x = divmod(t_first - t0, period)
            x += t0
            t_last = self._time_at_steps(self._steps_local(int(k), x, bisect_right(t, x)) + n_dec) + marg * n_dec
        agents.append([t_first, t_last, new, pf_own, t_a])
        return t_first, t_last

    def _budget(self, running: int) -> int:
        """Prefill tokens a step has left after ``running`` decodes (vLLM's token budget, chunked prefill)."""
        budget = max(self._max_batched - running, self._block)
        return min(budget, self._budget_cap) if self._budget_cap else budget
