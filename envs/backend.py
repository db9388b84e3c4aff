"""Where an environment's LLM calls run: the seam between the task/operator logic and the serving side.

``MASLatencyEnv`` writes one query's life as generator processes (``envs.mas_latency``): they yield
*waitables* and get their values back, and they never touch a clock or a server directly. A backend supplies
the waitables and drives the processes:

====================  ======================================================================================
``now``               the backend's clock (seconds); ``started`` once ``reset(seed)`` has been called
``event()``           a waitable that someone ``succeed(value)``-s later (a decision, the end of a batch)
``process(gen)``      run a generator process; a waitable whose value is the generator's return value
``timeout(s)``        a waitable that fires ``s`` seconds from now (tool runs, retry waits)
``all_of(ws)``        a waitable whose value maps each of ``ws`` to its value, in order
``submit(...)``       one LLM call to a model pool; a waitable whose value has ``reject_reason`` (``None``
                      when the call was served)
``run(until)``        advance until ``until`` has fired (the Gymnasium API calls it between decisions)
``load()``            mean over the pool's replicas of running and waiting requests and KV-cache usage
``is_event(x)``       whether ``x`` is one of this backend's waitables
====================  ======================================================================================

``SimBackend`` (the default) is a ``sim.World`` on SimPy's clock: every waitable is a SimPy event, so a run is
deterministic and as fast as the simulator. ``maslat.livebackend.LiveBackend`` implements the same seam on
an asyncio loop with streamed HTTP requests to live vLLM servers (wall-clock time); it lives in ``maslat``
because it needs the HTTP client of ``traces`` and an optional dependency, which ``envs`` may not import.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable
from typing import Any, Protocol

import simpy

import sim

from .cluster import POOL, ClusterConfig, build_world

__all__ = ["BACKEND_POOL", "Backend", "SimBackend"]

#: the model pool the environment sends every LLM call to
BACKEND_POOL = POOL


class Backend(Protocol):
    """The serving side of an environment (see the module docstring)."""

    @property
    def now(self) -> float: ...

    @property
    def started(self) -> bool:
        """Whether ``reset`` has been called."""

    def reset(self, seed: int) -> None:
        """Start afresh (a simulator builds a new world from ``seed``; a live backend restarts its clock)."""

    def event(self) -> Any: ...

    def process(self, gen: Generator) -> Any: ...

    def timeout(self, seconds: float) -> Any: ...

    def all_of(self, waitables: Iterable[Any]) -> Any: ...

    def submit(self, pool: str, prompt_tokens: int, max_tokens: int,
               prompt_segments: tuple[tuple[int, int], ...] | None) -> Any: ...

    def run(self, until: Any) -> None: ...

    def load(self) -> tuple[float, float, float]: ...

    def is_event(self, x: Any) -> bool: ...

    def close(self) -> None: ...


class SimBackend:
    """The simulated cluster of ``ClusterConfig`` (pool and background load) on SimPy's clock.

    Args:
        cluster: the pool and its background traffic.
    """

    def __init__(self, cluster: ClusterConfig | None = None):
        self.cluster = cluster if cluster is not None else ClusterConfig()
        self.world: sim.World | None = None

    @property
    def started(self) -> bool:
        return self.world is not None

    @property
    def now(self) -> float:
        return self.world.env.now

    def reset(self, seed: int) -> None:
        self.world = build_world(self.cluster, seed)

    def event(self) -> simpy.Event:
        return self.world.env.event()

    def process(self, gen: Generator) -> simpy.Process:
        return self.world.env.process(gen)

    def timeout(self, seconds: float) -> simpy.Event:
        return self.world.env.timeout(seconds)

    def all_of(self, waitables: Iterable[simpy.Event]) -> simpy.Event:
        return self.world.env.all_of(waitables)

    def submit(self, pool: str, prompt_tokens: int, max_tokens: int,
               prompt_segments: tuple[tuple[int, int], ...] | None) -> simpy.Event:
        return self.world.submit(pool, prompt_tokens, max_tokens, prompt_segments=prompt_segments, wait=True)

    def run(self, until: simpy.Event) -> None:
        self.world.env.run(until=until)

    def load(self) -> tuple[float, float, float]:
        reps = self.world.cluster.replicas
        now = self.world.env.now
        run_n = wait_n = kv = 0.0
        for rep in reps:
            r, w, used, _ = rep.core.gauges(now)
            run_n += r
            wait_n += w
            kv += used / rep.core.kv.num_usable
        n = len(reps)
        return run_n / n, wait_n / n, kv / n

    def is_event(self, x: Any) -> bool:
        return isinstance(x, simpy.Event)

    def close(self) -> None:
        pass
