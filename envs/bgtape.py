"""Background tapes: background load simulated once per recipe and seed, replayed under the agent's calls.

``background="exact"`` (the default everywhere) simulates every background request next to the agent's calls,
in the same engines: exact, and what costs ~90 % of a busy training run. ``background="tape"`` is an explicit
**approximation** (one-way coupling): the background alone is simulated once per (recipe, seed) for
``horizon_s`` simulated seconds after a warm-up, step boundary by step boundary, and kept as a *tape* per
replica (``BackgroundTape``: when each engine step ended, how many steps, queues, KV blocks, TTFT EMA, requests
arrived and admitted). The tape is looped when a session runs past it. The agent's calls never enter an engine:
each call is served in closed form against its replica's tape (``ReplicaTape.serve``, ``envs.tape_replica``):

* **routing**: least outstanding (the router's count: background submitted to the replica and not finished,
  from the tape, plus the agent's own calls in flight);
* **queueing (FCFS)**: admitted at the first boundary where every background request that reached the engine
  before it has been admitted (vLLM's WAITING queue is first come, first served);
* **prefill**: its prompt, less a prefix-cache hit (agent prompts seen before on the replica; no eviction),
  chunked by the token budget left after the running decodes, one chunk per background step, plus the
  chunk's own prefill cost from the replica's step-time model (``sim.latency``);
* **decode**: one token per background engine step (the tape's step clock; in idle stretches the call's own
  step time), plus its own marginal decode cost per step (``linear_decode``).

What the agent observes (queues, KV usage, TTFT EMA) is the tape's state plus its own calls in flight. Not
modelled: the agent's calls slowing the background (so the background never sees the agent), agent calls on
the same replica contending with each other, preemption of agent calls, eviction of their cached prefixes.
``tests/test_bgtape.py`` states how close this is to the exact path on the quantities the policies see.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Callable, Hashable

import numpy as np
import simpy

import sim
from sim.engine import EngineCore
from sim.timebase import TICKS_PER_S
from sim.world import SimEnv

from .tape_replica import ReplicaTape

__all__ = ["BACKGROUND_MODES", "TAPES", "BackgroundTape", "ReplicaTape", "TapeCache", "TapeWorld"]

#: how background load is served: every request in the engines, or a replayed tape (an approximation)
BACKGROUND_MODES = ("exact", "tape")

_FIELDS = ("t_s", "S", "running", "waiting", "used", "ema_s", "arrived", "admitted")


class _Served:
    """What a finished call's waiters get (the fields the environments read of a ``sim.Request``)."""

    __slots__ = ("first_token_ts", "last_token_ts", "reject_reason", "arrival_time", "num_prompt_tokens",
                 "max_tokens")

    def __init__(self, arrival, p, o, first, last, reason=None):
        self.arrival_time, self.num_prompt_tokens, self.max_tokens = arrival, p, o
        self.first_token_ts, self.last_token_ts, self.reject_reason = first, last, reason


class _Recorder:
    """Rows of one replica: a point at each step's start and one at its end (``S``: the step clock)."""

    def __init__(self, rep, alone_s: float, t0_s: float):
        self.rep, self.alone_s = rep, alone_s
        self.rows: list[tuple] = []
        self.start_s = self.last_end_s = t0_s
        self.S = 0.0
        self.steps = rep.core.num_steps
        self.out0, self.submits = rep.outstanding, []  # what the router counts: submitted, not yet finished
        self.done0 = rep.core.num_finished + rep.core.num_aborted
        core, begin, submit = rep.core, rep.core.begin, rep.submit

        def submit_and_note(req, t_enqueue):
            self.submits.append(rep.env.now)
            submit(req, t_enqueue)
        rep.submit = submit_and_note

        def begin_and_note(t0, stop_s=None):  # the recording world only: notes when each step starts
            end = begin(t0, stop_s)
            if end is not None:
                self.start_s = t0 / TICKS_PER_S
            return end
        core.begin = begin_and_note

    def _row(self, t_s: float) -> tuple:
        c = self.rep.core
        done = c.num_finished + c.num_aborted
        return (t_s, self.S, c.pub_running, c.pub_waiting, c.pub_used_blocks, c.ttft_ema_s,
                done + c.pub_running + c.pub_waiting, done + c.pub_running)

    def step_done(self) -> None:
        c = self.rep.core
        start = max(self.start_s, self.last_end_s)
        if start > self.last_end_s:  # idle until this step: a call alone would have run at its own pace
            self.S += (start - self.last_end_s) / self.alone_s
            self.rows.append(self._row(start))
        self.S += c.num_steps - self.steps
        self.steps, self.last_end_s = c.num_steps, c.t_s
        self.rows.append(self._row(c.t_s))


class BackgroundTape:
    """Per pool, one ``ReplicaTape`` per replica, recorded from a background-only world."""

    def __init__(self, world: sim.World, warmup_s: float, horizon_s: float):
        if not horizon_s > 0:
            raise ValueError(f"horizon_s must be > 0, got {horizon_s!r}")
        if warmup_s > 0:
            world.run(until=warmup_s)
        t0 = world.now
        recs = {rep.index: _Recorder(rep, _alone_s(rep.core.model), t0) for rep in world.replicas}
        world.step_listener = lambda rep, _finished: recs[rep.index].step_done()
        world.run(until=t0 + horizon_s)
        world.step_listener = None
        self.t0_s, self.horizon_s = t0, float(horizon_s)
        self.num_background = world.num_submitted
        self.pools: dict[str, list[ReplicaTape]] = {}
        for name, reps in world.cluster.pools.items():
            tapes = []
            for rep in reps:
                rows = recs[rep.index].rows or [(t0, 0.0, 0, 0, 0, float("nan"), 0, 0)]
                last = rows[-1]
                tail_s = t0 + horizon_s - last[0]
                rows.append((t0 + horizon_s, last[1] + tail_s / _alone_s(rep.core.model), *last[2:]))
                arr = np.array(rows, dtype=np.float64)
                cols = {f: arr[:, i] for i, f in enumerate(_FIELDS)}
                cols["submits"] = np.array(recs[rep.index].submits, dtype=np.float64)
                cols["out0"], cols["done0"] = recs[rep.index].out0, recs[rep.index].done0
                tapes.append(ReplicaTape(cols, t0, self.horizon_s, rep.core.cfg, rep.core.model, rep.overheads))
            self.pools[name] = tapes


def _alone_s(model) -> float:
    """One decode step of a single sequence with a 500-token context (a call's pace on an idle engine)."""
    return max(model.step_ticks(1, 500, []) / TICKS_PER_S, 1e-4)


class _TapeCore:
    """The gauges ``pool_state``/``SimBackend.load`` read of an engine core, from the tape plus the agent's own
    calls in flight (counted as running). Times are the world's clock; the tape's is ``offset_s`` ahead."""

    def __init__(self, rep: _TapeReplica, env: simpy.Environment, offset_s: float):
        self.rep, self.env, self.offset_s = rep, env, offset_s
        self._core = EngineCore(rep.tape.cfg, rep.tape.model)
        self.kv = self._core.kv

    def gauges(self, now_s: float) -> tuple[int, int, int, int]:
        r, w, used, _ = self.rep.tape.state(now_s + self.offset_s)
        return r + self.rep.in_flight, w, used, 0

    @property
    def ttft_ema_s(self) -> float:
        return self.rep.tape.state(self.env.now + self.offset_s)[3]

    def validate(self, prompt_tokens: int, max_tokens: int) -> str | None:
        """``EngineCore.validate`` on the numbers alone (no ``sim.Request`` built per call)."""
        if prompt_tokens < 1:
            return sim.RejectReason.EMPTY_PROMPT
        if max_tokens < 1:
            return sim.RejectReason.BAD_MAX_TOKENS
        if prompt_tokens + max_tokens > self.rep.tape.cfg.max_model_len:
            return sim.RejectReason.PROMPT_TOO_LONG
        return None


class _TapeReplica:
    """One replica of a ``TapeWorld``: its tape (shared, read only) and this world's own calls and prefixes."""

    def __init__(self, index: int, pool: str, tape: ReplicaTape, env, offset_s: float):
        self.index, self.pool, self.tape = index, pool, tape
        self.in_flight = 0
        self.cache: dict = {}
        self.agents: list = []
        self.core = _TapeCore(self, env, offset_s)
        self.kv_usable = self.core.kv.num_usable

    def outstanding(self, t_tape_s: float) -> int:
        return self.tape.outstanding(t_tape_s) + self.in_flight

    def release(self, _event) -> None:
        """A call of this world is done (its event's first callback)."""
        self.in_flight -= 1


def _least_outstanding(reps: list[_TapeReplica], t_tape_s: float) -> _TapeReplica:
    """The replica with the fewest outstanding requests at ``t_tape_s``, the first on ties (``min``'s); the
    replicas of a tape share its loop, so the local time is computed once."""
    tp = reps[0].tape
    x = tp.t0_s + (t_tape_s - tp.t0_s) % tp.period_s
    best = None
    for r in reps:
        tp = r.tape
        i = bisect_right(tp.t, x) - 1
        n = tp.out0 + bisect_right(tp.submits, x) - (tp.done_since[i] if i >= 0 else 0) + r.in_flight
        if best is None or n < best:
            rep, best = r, n
    return rep


class _Cluster:
    def __init__(self, pools: dict[str, list[_TapeReplica]]):
        self.pools = pools
        self.replicas = [r for reps in pools.values() for r in reps]


class TapeWorld:
    """The part of ``sim.World`` the environments use (``env``, ``now``, ``submit``, ``cluster``, ``replicas``),
    with every agent call served against a ``BackgroundTape`` (an approximation: see the module docstring).

    The clock starts at 0 at the tape's start (after its warm-up). Calls are routed to the replica with the
    fewest outstanding requests (background on the tape plus the agent's own), lowest index on ties (the
    pools' router when the tape was recorded must be ``least_outstanding``, the environments' default).
    """

    def __init__(self, tape: BackgroundTape):
        self.env = SimEnv()
        self.tape = tape
        self.num_submitted = self.num_rejected = 0
        idx = 0
        pools = {}
        for name, tapes in tape.pools.items():
            reps = []
            for tp in tapes:
                reps.append(_TapeReplica(idx, name, tp, self.env, tape.t0_s))
                idx += 1
            pools[name] = reps
        self.cluster = _Cluster(pools)

    @property
    def now(self) -> float:
        return self.env.now

    @property
    def replicas(self):
        return self.cluster.replicas

    def run(self, until=None) -> None:
        self.env.run(until=until)

    def submit(self, pool: str, num_prompt_tokens: int, max_tokens: int, prompt_segments=None, *, wait: bool = True,
               **_ignored):
        """``sim.World.submit`` of one agent call (``wait`` is implied: the event's value is the served call);
        ``prompt_segments`` may also come fourth, as ``Backend.submit`` passes it."""
        reps = self.cluster.pools.get(pool)
        if reps is None:
            raise ValueError(f"unknown pool {pool!r}; pools: {sorted(self.cluster.pools)}")
        env = self.env
        now = env.now
        t0 = self.tape.t0_s
        t_tape = now + t0
        rep = reps[0] if len(reps) == 1 else _least_outstanding(reps, t_tape)
        self.num_submitted += 1
        ev = env.event()
        reason = rep.core.validate(num_prompt_tokens, max_tokens)
        if reason is not None:
            self.num_rejected += 1
            ev.succeed(_Served(now, num_prompt_tokens, max_tokens, now, now, reason))
            return ev
        tp = rep.tape
        ov = tp.ov
        first, last = tp.serve(t_tape + ov.frontend_s, int(num_prompt_tokens), int(max_tokens), prompt_segments,
                               rep.cache, rep.agents)
        first, last = first - t0, last - t0
        done = last + ov.post_decode_s + ov.per_output_token_s * max_tokens
        rep.in_flight += 1
        # the call's outcome is known now: the event is triggered at once and processed when the call is done
        # (one queue entry; SimPy's private _ok/_value, as sim.SimEnv.run sets them, sim.world.SIMPY_TESTED)
        ev._ok, ev._value = True, _Served(now, num_prompt_tokens, max_tokens, first, last)
        ev.callbacks.append(rep.release)
        env.schedule_at(ev, done if done > now else now)
        return ev

    def load(self) -> tuple[float, float, float]:
        """``SimBackend.load`` of this world (the same sums, read straight off the tapes)."""
        t = self.env.now + self.tape.t0_s
        run_n = wait_n = kv = 0.0
        reps = self.cluster.replicas
        for rep in reps:
            r, w, used, _ = rep.tape.state(t)
            run_n += r + rep.in_flight
            wait_n += w
            kv += used / rep.kv_usable
        n = len(reps)
        return run_n / n, wait_n / n, kv / n


class TapeCache:
    """A small LRU of tapes keyed by everything the background depends on (recipe and seed)."""

    def __init__(self, max_entries: int = 16):
        self.max_entries = max_entries
        self._tapes: OrderedDict[Hashable, BackgroundTape] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: Hashable, build: Callable[[], sim.World], warmup_s: float, horizon_s: float) -> BackgroundTape:
        tape = self._tapes.get(key)
        if tape is not None:
            self._tapes.move_to_end(key)
            self.hits += 1
            return tape
        self.misses += 1
        tape = BackgroundTape(build(), warmup_s, horizon_s)
        self._tapes[key] = tape
        if len(self._tapes) > self.max_entries:
            self._tapes.popitem(last=False)
        return tape

    def clear(self) -> None:
        self._tapes.clear()


#: the process-wide tapes the environments share
TAPES = TapeCache()
