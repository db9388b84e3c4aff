"""The APWA manager: a query over a table becomes non-interfering subproblems and a fan-in tree.

The manager has the global view but never the data: it reads ``TableMeta`` (row count, columns, mean row
length) and picks a ``SubtaskContract``; the contract *expands over the data* into groups of rows, one worker
call each, and a tree of merges (``fan_in`` children per node) brings the answers back::

    manager (metadata only) --> contract x groups:  [rows 0..g) [g..2g) ... [.., N)     (no cross-talk)
                                                         \\   ...   /    \\  ...  /
                                                         merge (fan_in)  merge       depth = ceil(log_f groups)
                                                                \\        /
                                                                  root

Its own LLM call's size follows the template and the metadata, not N (``manager_prompt_tokens``). A
``Decomposition`` holds the choices a policy makes (``MASLatency-APWA-v0``'s action); ``auto_decomposition``
is the manager's default rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .workloads import TableMeta, Workload

__all__ = ["Decomposition", "Plan", "auto_decomposition", "make_plan"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Decomposition:
    """How a query is cut and brought back together.

    Attributes:
        group_size: rows per subproblem (fan-out width = ceil(N / group_size)).
        fan_in: children per merge node (``None``: one flat merge of every group; depth 1).
        max_in_flight: worker and merge calls the executor keeps in flight at once (``None``: no bound).
        worker_pools: pools serving the workers' capability (``None``: the registry's).
        merge_pools: pools serving the aggregator (``None``: the registry's).
    """

    group_size: int
    fan_in: int | None = 8
    max_in_flight: int | None = None
    worker_pools: tuple[str, ...] | None = None
    merge_pools: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.group_size, (int, np.integer)) or self.group_size < 1:
            raise ValueError(f"Decomposition.group_size must be an integer >= 1, got {self.group_size!r}")
        if self.fan_in is not None and self.fan_in < 2:
            raise ValueError(f"Decomposition.fan_in must be >= 2 or None (flat), got {self.fan_in!r}")
        if self.max_in_flight is not None and self.max_in_flight < 1:
            raise ValueError(f"Decomposition.max_in_flight must be >= 1 or None (no bound), got {self.max_in_flight!r}")
        for name in ("worker_pools", "merge_pools"):
            v = getattr(self, name)
            if v is not None and (not v or len(set(v)) != len(v)):
                raise ValueError(f"Decomposition.{name} must be None or distinct pool names, got {v!r}")


@dataclass(frozen=True, slots=True)
class Plan:
    """A manager's plan: its own call, the contract's groups (row index ranges) and the merge tree.

    ``tree[k]`` lists the nodes of level k+1 as tuples of child indices into level k (level 0: groups).
    """

    capability: str
    manager_tokens: tuple[int, int]
    groups: tuple[tuple[int, int], ...]
    tree: tuple[tuple[tuple[int, ...], ...], ...]
    decomposition: Decomposition

    @property
    def width(self) -> int:
        return len(self.groups)

    @property
    def depth(self) -> int:
        return len(self.tree)


def auto_decomposition(workload: Workload, meta: TableMeta, *, context_budget_tokens: int = 4096,
                       fan_in: int = 8, max_in_flight: int | None = 64) -> Decomposition:
    """The manager's default rule: as many rows per call as fit, with their expected outputs, a context budget
    (RULER's 4K: no measured long-context loss), merges of ``fan_in`` children; only metadata is read."""
    room = context_budget_tokens - workload.contract.instruction_tokens
    g = max(1, int(room // max(meta.mean_row_tokens + workload.output_tokens, 1.0)))
    return Decomposition(group_size=min(g, meta.num_rows), fan_in=fan_in, max_in_flight=max_in_flight)


def merge_tree(width: int, fan_in: int | None) -> tuple[tuple[tuple[int, ...], ...], ...]:
    """Levels of merge nodes over ``width`` leaves; a single leaf still gets one root (the final answer)."""
    levels = []
    n = width
    while True:
        f = n if fan_in is None else fan_in
        nodes = tuple(tuple(range(i, min(i + f, n))) for i in range(0, n, f))
        levels.append(nodes)
        n = len(nodes)
        if n == 1:
            return tuple(levels)


def make_plan(workload: Workload, meta: TableMeta, decomposition: Decomposition, num_capabilities: int) -> Plan:
    """Expand ``workload``'s contract over ``meta.num_rows`` rows as ``decomposition`` says."""
    from .workloads import manager_prompt_tokens

    n, g = meta.num_rows, int(decomposition.group_size)
    groups = tuple((i, min(i + g, n)) for i in range(0, n, g))
    tree = merge_tree(len(groups), decomposition.fan_in)
    return Plan(workload.contract.capability, manager_prompt_tokens(meta, num_capabilities), groups, tree,
                decomposition)
