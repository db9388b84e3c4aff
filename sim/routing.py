"""Routers: which replica of a pool gets a request. Extend through ``ROUTERS`` (name -> factory).

Routers see what a gateway sees: each replica's outstanding request count (kept by the cluster) and the
gauges its engine last published (``vllm:kv_cache_usage_perc`` etc.). Ties rotate, so equal replicas
share load deterministically.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .request import Request
    from .world import Replica

__all__ = ["ROUTERS", "Router", "make_router"]


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


ROUTERS: dict[str, Callable[[], Router]] = {
    "round_robin": RoundRobin,
    "least_outstanding": LeastOutstanding,
    "least_kv": LeastKVUsage,
}


def make_router(name: str) -> Router:
    try:
        return ROUTERS[name]()
    except KeyError:
        raise ValueError(f"unknown router {name!r}; choose one of {sorted(ROUTERS)}") from None
