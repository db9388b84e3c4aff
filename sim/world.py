"""The SimPy shell: replicas on a shared clock, pools with routers, a sampler, and the world factory.

The shell only advances time. A replica's next step boundary is one SimPy event at an absolute time
(priority ``LATE``, so requests arriving at that same instant are queued before the engine schedules, as
in vLLM's busy loop); the engine core decides everything else. An arrival during a decode run truncates
the run and re-schedules the boundary; the superseded event is ignored when it fires.

The shell is three modules, each importable from here as before:

* ``sim.simenv``: ``SimEnv``, the event loop with absolute-time callbacks, and its SimPy version pin;
* ``sim.replica``: ``Replica``, one engine core's step boundaries, frontend delay and aborts;
* ``sim.world`` (here): ``PoolSpec`` (a pool's configuration), ``Cluster`` (pools of replicas with their
  routers), ``World`` (clock, cluster, records, time series, named random streams, the sampler) and
  ``make_world``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import simpy

from .config import EngineConfig
from .profiles import Profile
from .records import RecordStore, TimeSeries
from .replica import Replica
from .request import Request, RequestStatus
from .routing import make_router
from .simenv import LATE, SIMPY_TESTED, SimEnv, check_simpy_version

__all__ = ["LATE", "SIMPY_TESTED", "Cluster", "PoolSpec", "Replica", "SimEnv", "World", "check_simpy_version",
           "make_world", "named_rng"]


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


def named_rng(seed: int, name: str) -> np.random.Generator:
    """The stream ``World(seed=seed).rng(name)`` starts as (a world that does not exist yet can draw it:
    ``sim.shard`` pre-draws a workload's arrivals and lengths)."""
    # spawn key from a cryptographic digest of the name: distinct names give independent streams
    digest = hashlib.sha256(name.encode()).digest()
    key = [int.from_bytes(digest[i:i + 4], "little") for i in range(0, 16, 4)]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=key)))


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
            g = self._streams[name] = named_rng(self._root.entropy, name)
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
