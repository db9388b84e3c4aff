"""The SimPy shell: replicas on a shared clock, pools with routers, a sampler, and the world factory.

The shell only advances time. A replica's next step boundary is one SimPy event at an absolute time
(priority ``LATE``, so requests arriving at that same instant are queued before the engine schedules, as
in vLLM's busy loop); the engine core decides everything else. An arrival during a decode run truncates
the run and re-schedules the boundary; the superseded event is ignored when it fires.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from heapq import heappop, heappush

import numpy as np
import simpy
from simpy.core import EmptySchedule, StopSimulation
from simpy.events import URGENT

from .config import EngineConfig, Overheads
from .engine import EngineCore
from .latency import make_step_time_model
from .profiles import Profile
from .records import RecordStore, TimeSeries
from .request import Request, RequestStatus
from .routing import make_router
from .timebase import TICKS_PER_S, ticks_at_or_after

__all__ = ["LATE", "SIMPY_TESTED", "Cluster", "PoolSpec", "Replica", "SimEnv", "World", "check_simpy_version",
           "make_world"]

_WAITING = RequestStatus.WAITING  # a module constant: an Enum class-attribute lookup costs ~10x more
LATE = 2  # after simpy's URGENT (0) and NORMAL (1) events at the same instant


class _Tick:
    """A pre-triggered event with one callback, run by ``SimEnv.step`` without SimPy's callback list.

    ``gen`` lets a replica ignore a boundary superseded by a truncation.
    """

    __slots__ = ("fn", "gen")

    def __init__(self, fn, gen: int = 0):
        self.fn = fn
        self.gen = gen


#: SimPy releases ``SimEnv`` was checked against (``tests/test_simenv.py`` compares event orders with plain
#: ``simpy.Environment``): it reads and writes SimPy's private ``_queue``, ``_now``, ``_eid``, ``Event._ok`` and
#: ``_value``, and re-implements ``Environment.run``. Keep ``pyproject.toml``'s simpy pin the same.
SIMPY_TESTED = ((4, 1), (4, 2))  # >= 4.1, < 4.2
_simpy_checked = False


def check_simpy_version(version: str) -> None:
    """Raise if ``version`` lies outside ``SIMPY_TESTED``, naming the range and what to do."""
    lo, hi = SIMPY_TESTED
    parts = version.split(".")
    try:
        major_minor = (int(parts[0]), int(parts[1]))
    except (ValueError, IndexError):
        major_minor = None
    if major_minor is None or not lo <= major_minor < hi:
        raise RuntimeError(
            f"simpy {version} is installed, but sim.SimEnv relies on SimPy internals tested only with simpy "
            f">={lo[0]}.{lo[1]},<{hi[0]}.{hi[1]}: install that (pip install 'simpy>={lo[0]}.{lo[1]},"
            f"<{hi[0]}.{hi[1]}'), or re-run tests/test_simenv.py on {version} and widen sim.world.SIMPY_TESTED")


class SimEnv(simpy.Environment):
    """A SimPy environment that can schedule at an absolute time without float round-off.

    Plain callbacks (``call_at``, replica step boundaries) are queue entries holding a ``_Tick``; ``step``
    calls them directly, which is what SimPy would do for a triggered event with one callback and no
    failure, without building and walking a callback list. Construction fails on a SimPy release outside
    ``SIMPY_TESTED``.
    """

    def __init__(self, initial_time: float = 0) -> None:
        global _simpy_checked
        if not _simpy_checked:
            check_simpy_version(simpy.__version__)
            _simpy_checked = True
        super().__init__(initial_time)

    def schedule_at(self, event, t: float, priority: int = 1) -> None:
        if t < self._now:
            raise ValueError(f"cannot schedule at {t} before now={self._now}")
        heappush(self._queue, (t, priority, next(self._eid), event))

    def call_at(self, t: float, fn, priority: int = 1) -> None:
        """Call ``fn(event)`` at simulated time ``t``."""
        heappush(self._queue, (t, priority, next(self._eid), _Tick(fn)))

    def call_again(self, tick: _Tick, t: float, priority: int = 1) -> None:
        """Call a tick that has just fired (the ``event`` its function got) once more, at time ``t``."""
        heappush(self._queue, (t, priority, next(self._eid), tick))

    def step(self) -> None:
        queue = self._queue
        if queue and queue[0][3].__class__ is _Tick:
            self._now, _, _, tick = heappop(queue)
            tick.fn(tick)
        else:
            super().step()

    def run(self, until: float | simpy.Event | None = None):
        """``simpy.Environment.run`` (SimPy 4.1, same semantics) with ``step`` inlined: one Python call less
        per event, and the ``_Tick`` fast path."""
        if until is not None:
            if not isinstance(until, simpy.Event):
                at = until if isinstance(until, int) else float(until)
                if at <= self._now:
                    raise ValueError(f"until ({at}) must be greater than the current simulation time")
                until = simpy.Event(self)
                until._ok, until._value = True, None
                self.schedule(until, URGENT, at - self._now)
            elif until.callbacks is None:
                return until.value  # already processed
            until.callbacks.append(StopSimulation.callback)
        queue, env_step = self._queue, simpy.Environment.step
        try:
            while True:
                if queue and queue[0][3].__class__ is _Tick:
                    self._now, _, _, tick = heappop(queue)
                    tick.fn(tick)
                else:
                    env_step(self)
        except StopSimulation as exc:
            return exc.args[0]  # == until.value
        except EmptySchedule:
            if until is not None:
                assert not until.triggered
                raise RuntimeError(
                    f'No scheduled events left but "until" event was not triggered: {until}') from None
        return None


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolSpec:
    """A model pool: ``replicas`` copies of one serving profile behind one router.

    ``router_options`` are keyword arguments of the router's factory, as ``(name, value)`` pairs (e.g.
    ``(("api_servers", 2),)`` for a ``vllm_dp*`` router). ``num_gpu_blocks_per_replica`` gives each replica its
    own KV capacity (the engines of a data-parallel vLLM each profile their own device memory); ``None``: the
    profile's for all.
    """

    name: str
    profile: Profile
    replicas: int = 1
    router: str = "round_robin"
    router_options: tuple[tuple[str, object], ...] = ()
    num_gpu_blocks_per_replica: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.replicas, int) or self.replicas < 1:
            raise ValueError(f"pool {self.name!r}: replicas must be an integer >= 1, got {self.replicas!r}")
        make_router(self.router, **dict(self.router_options))  # validates the name and options
        for _ in self.engines():  # validates the per-replica capacities
            pass

    def engines(self) -> list[EngineConfig]:
        """Each replica's engine limits."""
        eng, blocks = self.profile.engine, self.num_gpu_blocks_per_replica
        if blocks is None:
            return [eng] * self.replicas
        if len(blocks) != self.replicas:
            raise ValueError(f"pool {self.name!r}: num_gpu_blocks_per_replica has {len(blocks)} values for "
                             f"{self.replicas} replicas; give one per replica")
        return [eng if b == eng.num_gpu_blocks else replace(eng, num_gpu_blocks=b) for b in blocks]


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


class Cluster:
    """Pools of replicas; ``submit`` routes a request and returns its completion event if asked."""

    def __init__(self, world: World, pools: Sequence[PoolSpec]):
        self.world = world
        names = [p.name for p in pools]
        if len(set(names)) != len(names):
            raise ValueError(f"pool names must be unique, got {names}")
        if not pools:
            raise ValueError("a cluster needs at least one pool")
        self.specs = {p.name: p for p in pools}
        self.replicas: list[Replica] = []
        self.pools: dict[str, list[Replica]] = {}
        self.routers = {}
        for spec in pools:
            reps = []
            for engine in spec.engines():
                rep = Replica(world, len(self.replicas), spec.name, engine, spec.profile,
                              jumps=world.jumps, check_invariants=world.check_invariants,
                              force_reference=world.force_reference)
                self.replicas.append(rep)
                reps.append(rep)
            self.pools[spec.name] = reps
            self.routers[spec.name] = make_router(spec.router, **dict(spec.router_options))


class World:
    """A fresh simulated world: clock, cluster, records, time series and named random streams.

    Build with ``make_world``. Two worlds never share state.
    """

    def __init__(self, pools: Sequence[PoolSpec], *, seed: int = 0, sample_interval_s: float | None = 1.0,
                 jumps: bool = True, check_invariants: bool = False, force_reference: bool = False,
                 keep_records: bool = True):
        self.env = SimEnv()
        self.seed = seed
        self.jumps, self.check_invariants, self.force_reference = jumps, check_invariants, force_reference
        self.cluster = Cluster(self, pools)
        self._pool_routers = {name: (reps, self.cluster.routers[name]) for name, reps in self.cluster.pools.items()}
        self.records = RecordStore() if keep_records else None
        self.timeseries = TimeSeries()
        self.num_submitted = 0
        self.num_finished = 0
        self.active_sources = 0  # workloads that may still submit
        self.num_rejected = 0
        self._notifying = 0  # completions on their way to waiting clients
        self.num_aborted = 0
        #: called as ``step_listener(replica, finished_requests)`` after every completed engine step (a
        #: live front end streams tokens from it); ``None`` costs one attribute test per step
        self.step_listener = None
        self._idle_event = None
        self.rejected: dict[str, int] = {}
        self._seq = 0
        self._streams: dict[str, np.random.Generator] = {}
        self._root = np.random.SeedSequence(seed)
        if sample_interval_s is not None:
            if sample_interval_s <= 0:
                raise ValueError("sample_interval_s must be positive or None")
            self._interval = float(sample_interval_s)
            self.env.call_at(self._interval, self._sample)

    # ---------------------------------------------------------------- randomness
    def rng(self, name: str) -> np.random.Generator:
        """The named random stream (same seed + same name = same stream, whatever else is drawn)."""
        g = self._streams.get(name)
        if g is None:
            # spawn key from a cryptographic digest of the name: distinct names give independent streams
            digest = hashlib.sha256(name.encode()).digest()
            key = [int.from_bytes(digest[i:i + 4], "little") for i in range(0, 16, 4)]
            g = np.random.Generator(np.random.PCG64(np.random.SeedSequence(self._root.entropy, spawn_key=key)))
            self._streams[name] = g
        return g

    @property
    def now(self) -> float:
        return self.env.now

    # ---------------------------------------------------------------- requests
    def submit(self, pool: str, num_prompt_tokens: int, max_tokens: int, *, prompt_segments=None,
               tag: object = None, request_id: str | None = None, wait: bool = False):
        """Send a request to ``pool`` now. With ``wait=True`` return an event that succeeds with the
        ``RequestRecord`` when the client has the whole response (or at once if rejected)."""
        return self._submit(pool, num_prompt_tokens, max_tokens, prompt_segments, tag, request_id, wait).on_finish

    def open_request(self, pool: str, num_prompt_tokens: int, max_tokens: int, *, prompt_segments=None,
                     tag: object = None, request_id: str | None = None) -> Request:
        """Like ``submit(..., wait=True)`` but return the ``Request`` itself, for front ends that watch its
        progress (``num_output_tokens``) or ``abort`` it. ``req.on_finish`` is the completion event; a
        rejected request comes back with status ``REJECTED`` and ``reject_reason`` set."""
        return self._submit(pool, num_prompt_tokens, max_tokens, prompt_segments, tag, request_id, True)

    def abort(self, req: Request) -> bool:
        """The client of ``req`` went away: drop it (status ``FINISHED_ABORTED``, blocks freed, a record
        with ``status="FINISHED_ABORTED"``). Returns False if it had already finished or been rejected."""
        if req.replica < 0:
            return False
        return self.cluster.replicas[req.replica].abort(req)

    def _submit(self, pool, num_prompt_tokens, max_tokens, prompt_segments, tag, request_id, wait) -> Request:
        reps, router = self._pool_routers.get(pool, (None, None))
        if reps is None:
            raise ValueError(f"unknown pool {pool!r}; pools: {sorted(self.cluster.pools)}")
        if prompt_segments is not None:
            prompt_segments = tuple((int(c), int(n)) for c, n in prompt_segments)
            if sum(n for _, n in prompt_segments) != num_prompt_tokens or any(c < 0 or n < 0 for c, n in prompt_segments):
                raise ValueError(f"prompt_segments must have content ids >= 0 and lengths summing to "
                                 f"num_prompt_tokens={num_prompt_tokens}, got {prompt_segments}")
        self._seq = seq = self._seq + 1
        now = self.env._now
        req = Request(request_id or f"{pool}-{seq}", num_prompt_tokens, max_tokens, now, prompt_segments, tag)
        req.seq_id = seq
        self.num_submitted += 1
        if wait:
            req.on_finish = self.env.event()
        rep = reps[router.choose(reps, req, now)]
        req.replica = rep.index
        p, o = req.num_prompt_tokens, req.max_tokens
        if p < 1 or o < 1 or p + o > rep._max_model_len:
            self._reject(rep, req, rep.core.validate(req))  # EngineCore.validate says which rule failed
            return req
        rep.outstanding += 1
        rep.submit(req, now + rep._frontend_s)  # not inlined: envs.bgtape wraps a replica's submit
        return req

    def _reject(self, rep: Replica, req: Request, reason: str) -> None:
        req.status = RequestStatus.REJECTED
        req.reject_reason = reason
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        self.num_rejected += 1
        if self.records is not None:
            self.records.add(req, rep.pool, self.env.now)
        if req.on_finish is not None:
            req.on_finish.succeed(self.records.last() if self.records is not None else req)

    def _finished(self, rep: Replica, r: Request) -> None:
        rep.outstanding -= 1
        self.num_finished += 1
        ov = rep.overheads
        done_s = r.last_token_ts + ov.post_decode_s + ov.per_output_token_s * r._num_output_tokens
        if self.records is not None:
            self.records.add(r, rep.pool, done_s)
        ev = r.on_finish
        if ev is not None:
            payload = self.records.last() if self.records is not None else r
            if done_s > self.env.now:
                self._notifying += 1
                self.env.call_at(done_s, lambda _e: self._notify(ev, payload))
            else:
                ev.succeed(payload)
        if self._idle_event is not None and not self.active_sources:  # else not settled: skip the call
            self._maybe_idle()

    def _notify(self, ev, payload) -> None:
        self._notifying -= 1
        ev.succeed(payload)
        self._maybe_idle()

    def _aborted(self, rep: Replica, r: Request) -> None:
        rep.outstanding -= 1
        self.num_finished += 1  # a finished status in vLLM's sense; latency summaries skip it
        self.num_aborted += 1
        if self._idle_event is not None:
            self._maybe_idle()
        if self.records is not None:
            self.records.add(r, rep.pool, self.env.now)
        if r.on_finish is not None:
            r.on_finish.succeed(self.records.last() if self.records is not None else r)

    # ---------------------------------------------------------------- observability
    def _sample(self, _ev=None) -> None:
        now = self.env.now
        for rep in self.cluster.replicas:
            c = rep.core
            running, waiting, used, gen = c.gauges(now)
            self.timeseries.add(now, rep.index, running, waiting, used / c.kv.num_usable, c.prompt_tokens, gen,
                                c.num_preemptions)
        self.env.call_at(now + self._interval, self._sample)

    def run(self, until: float | simpy.Event | None = None) -> None:
        self.env.run(until=until)

    def run_until_idle(self, max_time_s: float | None = None) -> None:
        """Run until every submitted request has finished or been rejected and no workload is active."""
        env = self.env
        if self._settled():
            return
        self._idle_event = env.event()
        until = self._idle_event
        if max_time_s is not None:
            until = env.any_of([self._idle_event, env.timeout(max(0.0, max_time_s - env.now))])
        try:
            env.run(until=until)
        finally:
            self._idle_event = None

    def _settled(self) -> bool:
        return (not self.active_sources and not self._notifying
                and self.num_finished + self.num_rejected >= self.num_submitted)

    def _maybe_idle(self) -> None:
        ev = self._idle_event
        if ev is not None and not ev.triggered and self._settled():
            ev.succeed()

    @property
    def replicas(self) -> list[Replica]:
        return self.cluster.replicas


def make_world(pools: Sequence[PoolSpec] | PoolSpec, **kwargs) -> World:
    """A fresh world; see ``World`` for keyword arguments."""
    if isinstance(pools, PoolSpec):
        pools = [pools]
    return World(list(pools), **kwargs)

