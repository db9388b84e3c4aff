"""One vLLM engine on the shared clock: ``Replica``, the SimPy side of ``sim.engine.EngineCore``.

A replica turns the time-free engine core into events. Its next step boundary is one ``_Tick`` on the
``SimEnv`` heap at an absolute time (priority ``LATE``); at a boundary it completes the step in flight, hands
the finished requests to the world, applies pending aborts, moves the requests whose frontend delay has
elapsed into the core's ``waiting`` queue (``EngineCore.add_request``) and begins the next step. The
frontend delay (``Overheads.frontend_s``: vLLM's API server and ``AsyncLLM`` input processing before the
request reaches ``EngineCore``) costs no event of its own. An arrival during a decode run truncates the run
and re-arms the boundary; a superseded boundary is recognised by its generation and ignored when it fires.
"""

from __future__ import annotations

from collections import deque
from heapq import heappush
from typing import TYPE_CHECKING

from .config import EngineConfig, Overheads
from .engine import EngineCore
from .latency import make_step_time_model
from .profiles import Profile
from .request import Request, RequestStatus
from .simenv import LATE, _Tick
from .timebase import TICKS_PER_S, ticks_at_or_after

if TYPE_CHECKING:
    from .world import World

__all__ = ["Replica"]

_WAITING = RequestStatus.WAITING  # a module constant: an Enum class-attribute lookup costs ~10x more


class Replica:
    """One vLLM engine on the shared clock."""

    def __init__(self, world: World, index: int, pool: str, engine: EngineConfig, profile: Profile, *,
                 jumps: bool, check_invariants: bool, force_reference: bool):
        self.world, self.env, self.index, self.pool = world, world.env, index, pool
        self.profile = profile
        self.core = EngineCore(engine, make_step_time_model(profile), jumps=jumps,
                               check_invariants=check_invariants, force_reference=force_reference)
        self.overheads: Overheads = profile.overheads
        self.outstanding = 0  # submitted, not yet finished (including the frontend delay)
        self._pending: deque[tuple[float, Request]] = deque()  # in the frontend, not yet queued
        self._aborts: list[Request] = []  # to drop at the next step boundary
        self._gen = 0
        self._busy = False
        self._queue, self._eid = self.env._queue, self.env._eid  # the SimPy heap, for _arm_at
        self._boundary = self._on_boundary  # one bound method, not one per armed step
        self._done = world._finished
        self._frontend_s = self.overheads.frontend_s
        self._max_model_len = engine.max_model_len

    def gauges(self, now_s: float | None = None) -> dict[str, float]:
        """What a scraper of this replica's ``/metrics`` would read now, under vLLM's names (without the
        ``vllm:`` prefix), plus ``ttft_ema_s`` (EMA of engine-side TTFT) and ``outstanding`` (router's count)."""
        now_s = self.env.now if now_s is None else now_s
        running, waiting, used, gen = self.core.gauges(now_s)
        c = self.core
        return {"num_requests_running": running, "num_requests_waiting": waiting,
                "kv_cache_usage_perc": used / c.kv.num_usable, "ttft_ema_s": c.ttft_ema_s,
                "num_preemptions": c.num_preemptions, "prompt_tokens": c.prompt_tokens, "generation_tokens": gen,
                "prefix_cache_queries": c.prefix_cache_queries, "prefix_cache_hits": c.prefix_cache_hits,
                "outstanding": self.outstanding}

    def kv_usage(self, now_s: float) -> float:
        return self.core.gauges(now_s)[2] / self.core.kv.num_usable

    def submit(self, req: Request, t_enqueue: float) -> None:
        """The request will reach the engine core at ``t_enqueue`` (after the frontend delay).

        Pending arrivals are moved into the engine at the first step boundary at or after their time, so
        the frontend delay costs no event of its own.
        """
        self._pending.append((t_enqueue, req))
        if self._busy:
            if len(self._pending) == 1:
                end = self.core.truncate(t_enqueue)
                if end is not None:  # self._arm(end), inlined: once per request
                    self._gen = gen = self._gen + 1
                    heappush(self._queue, (end / TICKS_PER_S, LATE, next(self._eid), _Tick(self._boundary, gen)))
        elif len(self._pending) == 1:
            self._arm_at(t_enqueue)

    def abort(self, req: Request) -> bool:
        """Drop ``req`` (its client went away). A request still in the frontend leaves at once; one in the
        engine leaves at the next step boundary (a decode run in flight is cut at the step in progress),
        as vLLM's engine core takes aborts between steps. Returns False if it had already finished."""
        if req.status.is_finished or req in self._aborts:
            return False
        for i, (_, r) in enumerate(self._pending):
            if r is req:
                del self._pending[i]
                req.status = RequestStatus.FINISHED_ABORTED
                self.world._aborted(self, req)
                return True
        if not self._busy:
            return False  # an idle engine holds no request: it cannot be ours
        self._aborts.append(req)
        end = self.core.truncate(self.env.now)
        if end is not None:
            self._arm(end)
        return True

    def _apply_aborts(self) -> None:
        aborts, self._aborts = self._aborts, []
        for r in aborts:
            if self.core.abort(r):
                self.world._aborted(self, r)

    def _arm(self, end_ticks: int) -> None:
        self._gen = gen = self._gen + 1
        heappush(self._queue, (end_ticks / TICKS_PER_S, LATE, next(self._eid), _Tick(self._boundary, gen)))

    def _arm_at(self, t_s: float) -> None:
        self._gen = gen = self._gen + 1
        heappush(self._queue, (t_s, LATE, next(self._eid), _Tick(self._boundary, gen)))

    def _on_boundary(self, ev: _Tick) -> None:
        if ev.gen != self._gen:
            return  # superseded by a truncation
        core = self.core
        now = self.env._now
        if self._busy:
            finished = core.complete(now)  # the boundary is the step's end
            world = self.world
            if finished:
                done = self._done
                for r in finished:
                    done(self, r)
            if world.step_listener is not None:
                world.step_listener(self, finished)
            if self._aborts:
                self._apply_aborts()
            start = core.t
        else:
            start = max(core.t, ticks_at_or_after(now))
        pending = self._pending
        if pending and pending[0][0] <= now:
            waiting, clock = core.waiting, core.clock
            while pending and pending[0][0] <= now:
                t_enq, req = pending.popleft()
                if req.prompt_segments is None:  # core.add_request(req, t_enq), inlined: once per request
                    req.queued_ts, req.status, req._decode_clock = t_enq, _WAITING, clock
                    waiting.append(req)
                else:
                    core.add_request(req, t_enq)
        end = core.begin(start, pending[0][0] if pending else None)  # a decode run stops for the next arrival
        self._busy = end is not None
        if end is not None:  # re-arm with the tick that just fired (off the heap, so free to reuse)
            self._gen = ev.gen = self._gen + 1
            heappush(self._queue, (end / TICKS_PER_S, LATE, next(self._eid), ev))
        elif pending:
            self._arm_at(pending[0][0])
