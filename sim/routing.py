"""Routers: which replica of a pool gets a request. Extend through ``ROUTERS`` (name -> factory).

Routers see what a gateway sees: each replica's outstanding request count (kept by the cluster) and the
gauges its engine last published (``vllm:kv_cache_usage_perc`` etc.). Ties rotate, so equal replicas
share load deterministically. The ``vllm_dp*`` routers are vLLM's own data-parallel load balancing, one per
release rule (``sim.dplb``): the engines of one ``vllm serve --data-parallel-size N``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

from .dplb import DP_RULES, VllmDPRouter

if TYPE_CHECKING:
    from .request import Request
    from .world import Replica

__all__ = ["ROUTERS", "Router", "make_router", "static_assignment"]


class Router(Protocol):
    def choose(self, replicas: Sequence[Replica], req: Request, now_s: float) -> int:
        """Index into ``replicas``."""
        ...


class RoundRobin:
    def __init__(self) -> None:
        self._next = 0

    def choose(self, replicas, req, now_s):
        i = self._next % len(replicas)
        self._next = i + 1
        return i

    def assign(self, num_requests: int, num_replicas: int):
        """The replica of each of the next ``num_requests`` requests, as ``choose`` would pick them (the
        choice ignores the replicas' state, so it is known before the simulation runs)."""
        import numpy as np

        return (self._next + np.arange(num_requests, dtype=np.int64)) % num_replicas


class LeastOutstanding:
    """Fewest requests submitted and not yet finished (a classic gateway policy)."""

    def __init__(self) -> None:
        self._rot = 0

    def choose(self, replicas, req, now_s):
        n = len(replicas)
        rot = self._rot
        self._rot = (rot + 1) % n
        return min(range(n), key=lambda i: (replicas[i].outstanding, (i - rot) % n))


class LeastKVUsage:
    """Lowest published ``kv_cache_usage_perc``, then fewest outstanding."""

    def __init__(self) -> None:
        self._rot = 0

    def choose(self, replicas, req, now_s):
        n = len(replicas)
        rot = self._rot
        self._rot = (rot + 1) % n
        return min(range(n), key=lambda i: (replicas[i].kv_usage(now_s), replicas[i].outstanding, (i - rot) % n))


#: name -> factory; a factory takes the pool's ``router_options`` as keywords (most take none)
ROUTERS: dict[str, Callable[..., Router]] = {
    "round_robin": RoundRobin,
    "least_outstanding": LeastOutstanding,
    "least_kv": LeastKVUsage,
    **{name: partial(VllmDPRouter, rule) for name, rule in DP_RULES.items()},
}


def static_assignment(router: Router, num_requests: int, num_replicas: int):
    """Each request's replica index if ``router`` decides without looking at the replicas (it has an
    ``assign(num_requests, num_replicas)`` method: e.g. round robin), else ``None``. Given that assignment,
    the replicas never interact, so they can be simulated apart (``sim.shard``)."""
    assign = getattr(router, "assign", None)
    return None if assign is None else assign(num_requests, num_replicas)


def make_router(name: str, **options: Any) -> Router:
    """A fresh router; ``options`` go to its factory (e.g. ``api_servers`` for the ``vllm_dp*`` routers)."""
    try:
        factory = ROUTERS[name]
    except KeyError:
        raise ValueError(f"unknown router {name!r}; choose one of {sorted(ROUTERS)}") from None
    try:
        return factory(**options)
    except TypeError:
        raise ValueError(f"router {name!r} does not take the options {sorted(options)}") from None
