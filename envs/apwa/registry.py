"""The capability registry: which worker kinds exist and which model pools (and tools) serve each.

APWA's registry "equips agents with tools or software at run time" (arXiv 2605.15132; docs/system_aware.md#10-apwa-architecture
s.9). The manager's plan names capabilities only (``summarise``, ``extract``...); the executor asks the
registry to *bind* one to a pool when it dispatches a call, so the same plan runs unchanged when a pool is
added, removed or re-assigned between (or during) runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["DEFAULT_CAPABILITIES", "Capability", "CapabilityRegistry", "default_registry"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Capability:
    """A worker kind: the model pools that can serve it (dispatch spreads over them) and its tools."""

    name: str
    pools: tuple[str, ...]
    tools: tuple[str, ...] = ()
    description: str = ""

    def __post_init__(self) -> None:
        if not self.name or not self.pools or len(set(self.pools)) != len(self.pools):
            raise ValueError(f"capability {self.name!r} needs a name and one or more distinct pools, got {self.pools!r}")


#: the worker kinds of the APWA paper's benchmarks, plus the manager ("plan") and the aggregator ("merge")
DEFAULT_CAPABILITIES = {
    "plan": "decompose a query into a contract over a table (metadata only)",
    "summarise": "summarise the rows of a group",
    "extract": "fill a schema record per row",
    "redact": "mask personal data in each row",
    "code": "write a program that transforms the rows",
    "merge": "merge the outputs of several subproblems into one",
}


class CapabilityRegistry:
    """Capabilities registered at run time; ``bind`` picks the pool a call of a capability goes to.

    ``bind`` spreads calls over a capability's pools by the fewest calls this registry has in flight on
    each (ties: registration order), so independent subproblems land on independent resources.
    """

    def __init__(self, capabilities: Iterable[Capability] = ()):
        self._caps: dict[str, Capability] = {}
        self.in_flight: dict[str, int] = {}
        for c in capabilities:
            self.register(c)

    def register(self, cap: Capability) -> None:
        """Add or replace a capability (a later ``bind`` sees it at once)."""
        self._caps[cap.name] = cap
        for p in cap.pools:
            self.in_flight.setdefault(p, 0)

    def unregister(self, name: str) -> None:
        if self._caps.pop(name, None) is None:
            raise ValueError(f"capability {name!r} is not registered; registered: {sorted(self._caps)}")

    def __contains__(self, name: str) -> bool:
        return name in self._caps

    def names(self) -> tuple[str, ...]:
        return tuple(self._caps)

    def get(self, name: str) -> Capability:
        cap = self._caps.get(name)
        if cap is None:
            raise ValueError(f"no worker registered for capability {name!r}; registered: {sorted(self._caps)} "
                             "(register one with CapabilityRegistry.register)")
        return cap

    def bind(self, name: str) -> str:
        """The pool the next call of ``name`` goes to (call ``release`` with it when the call ends)."""
        pools = self.get(name).pools
        pool = min(pools, key=lambda p: self.in_flight[p])
        self.in_flight[pool] += 1
        return pool

    def release(self, pool: str) -> None:
        self.in_flight[pool] -= 1


def default_registry(pools: Sequence[str], *, workers: Sequence[str] | None = None,
                     merge: Sequence[str] | None = None, plan: Sequence[str] | None = None) -> CapabilityRegistry:
    """Every default capability on ``workers`` (default: all ``pools``); the manager on ``plan`` (default:
    the last pool, the strongest by the catalogue's order), the aggregator on ``merge`` (default: workers)."""
    workers = tuple(workers or pools)
    unknown = (set(workers) | set(merge or ()) | set(plan or ())) - set(pools)
    if unknown:
        raise ValueError(f"pools {sorted(unknown)} are not in the world's pools {list(pools)}")
    caps = []
    for name, desc in DEFAULT_CAPABILITIES.items():
        served = {"plan": tuple(plan or (pools[-1],)), "merge": tuple(merge or workers)}.get(name, workers)
        caps.append(Capability(name=name, pools=served, description=desc,
                               tools=("table_concat",) if name == "merge" else ()))
    return CapabilityRegistry(caps)
