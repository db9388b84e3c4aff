"""Where an environment's LLM calls run: the seam between the task/operator logic and the serving side.

The environments (``envs.decision``) write one query's life as generator processes (``envs.mas_latency``): they yield
*waitables* and get their values back, and they never touch a clock or a server directly. A backend supplies
the waitables and drives the processes:

====================  ======================================================================================
``now``               the backend's clock (seconds); ``started`` once ``reset(seed)`` has been called
``event()``           a waitable that someone ``succeed(value)``-s later (a decision, the end of a batch)
``process(gen)``      run a generator process; a waitable whose value is the generator's return value
``timeout(s)``        a waitable that fires ``s`` seconds from now (tool runs, retry waits)
``all_of(ws)``        a waitable whose value maps each of ``ws`` to its value, in order
``any_of(ws)``        a waitable that fires once one of ``ws`` has
``submit(...)``       one LLM call to a model pool; a waitable whose value has ``reject_reason`` (``None``
                      when the call was served)
``run(until)``        advance until ``until`` has fired (the Gymnasium API calls it between decisions)
``load()``            mean over the pool's replicas of running and waiting requests and KV-cache usage
``pool_state(p, out)`` writes pool ``p``'s waiting and running requests (sums over its engines), KV-cache
                      usage (mean) and TTFT EMA (ms) into ``out`` (what a scraper of ``/metrics`` sees)
``is_event(x)``       whether ``x`` is one of this backend's waitables
====================  ======================================================================================

``SimBackend`` (the default) is a ``sim.World`` on SimPy's clock: every waitable is a SimPy event, so a run is
deterministic and as fast as the simulator. ``maslat.livebackend.LiveBackend`` implements the same seam on
an asyncio loop with streamed HTTP requests to live vLLM servers (wall-clock time); it lives in ``maslat``
because it needs the HTTP client of ``traces`` and an optional dependency, which ``envs`` may not import.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Generator, Iterable
from typing import Any, Protocol

import simpy

import sim

from .cluster import POOL, ClusterConfig, build_world
from .cmdp_world import pool_state

__all__ = ["BACKEND_POOL", "Backend", "SimBackend", "call_timing"]

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

    def any_of(self, waitables: Iterable[Any]) -> Any: ...

    def submit(self, pool: str, prompt_tokens: int, max_tokens: int,
               prompt_segments: tuple[tuple[int, int], ...] | None) -> Any: ...

    def run(self, until: Any) -> None: ...

    def load(self) -> tuple[float, float, float]: ...

    def pool_state(self, pool: str, out: Any) -> None: ...

    def is_event(self, x: Any) -> bool: ...

    def close(self) -> None: ...


class SimBackend:
    """The simulated cluster of ``ClusterConfig`` (pool and background load) on SimPy's clock.

    Args:
        cluster: the pool and its background traffic.
        build: instead of ``cluster``, a function of the seed that returns a ready world (several pools,
            warmed up: ``MASLatency-CMDP-v0``'s).
    """

    def __init__(self, cluster: ClusterConfig | None = None, *, build: Callable[[int], sim.World] | None = None):
        if build is not None and cluster is not None:
            raise ValueError("give SimBackend either cluster= or build=, not both")
        self.cluster = cluster if cluster is not None or build is not None else ClusterConfig()
        self._build = build if build is not None else functools.partial(build_world, self.cluster)
        self.world: sim.World | None = None

    @property
    def started(self) -> bool:
        return self.world is not None

    @property
    def now(self) -> float:
        return self.world.env.now

    def reset(self, seed: int) -> None:
        self.world = self._build(seed)

    def event(self) -> simpy.Event:
        return self.world.env.event()

    def process(self, gen: Generator) -> simpy.Process:
        return self.world.env.process(gen)

    def timeout(self, seconds: float) -> simpy.Event:
        return self.world.env.timeout(seconds)

    def all_of(self, waitables: Iterable[simpy.Event]) -> simpy.Event:
        return self.world.env.all_of(waitables)

    def any_of(self, waitables: Iterable[simpy.Event]) -> simpy.Event:
        return self.world.env.any_of(waitables)

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

    def pool_state(self, pool: str, out) -> None:
        """``[waiting, running, kv usage, ttft ema ms]`` of ``pool`` into ``out`` (the engines' own gauges)."""
        pool_state(self.world, pool, out)

    def is_event(self, x: Any) -> bool:
        return isinstance(x, simpy.Event)

    def close(self) -> None:
        pass


def call_timing(result: Any, sent_s: float, output_tokens: int) -> tuple[float, float]:
    """``(ttft_s, tpot_s)`` of a served call's value, whatever the backend: a simulated ``sim`` request
    (absolute timestamps of its first and last token) or a live ``CallResult`` (durations; its end is
    ``[DONE]``)."""
    n = output_tokens
    if hasattr(result, "first_token_ts"):
        return result.first_token_ts - sent_s, (result.last_token_ts - result.first_token_ts) / (n - 1) if n > 1 else 0.0
    return result.ttft_s, (result.latency_s - result.ttft_s) / (n - 1) if n > 1 else 0.0
