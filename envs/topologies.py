"""The Planner (level 1 of the system-aware design): a topology of agent calls and their roles, fixed at T = 0.

Topologies are MasRouter's collaboration modes (``MAR/MasRouter/mas_router.py``: IO, Chain, FullConnected,
Debate, Reflection; CoT is IO here, since the Executor picks the prompt strategy) plus APWA's parallel map
(arXiv 2605.15132, docs/system_aware.md#9-fan-out-latency): a planner, k independent branches, an aggregator.
A topology is a DAG of nodes; a node starts when all its inputs have finished and sees their outputs as
context::

    IO            Solver
    Reflection    Solver -> Inspector
    Chain         Analyst -> Solver -> Inspector
    FullConnected Analyst -> Solver -> Inspector -> Decision     (each node sees every earlier node)
    Debate        Solver x3 -> Solver x3 (each sees all of round 1) -> Decision
    ParallelMap   Planner -> Solver x4 -> Decision

A planner maps a query to a topology. ``fixed:<Mode>`` gives every query the same one; ``mix`` (the default)
draws one per query from ``MIX_WEIGHTS`` with a stream keyed by the dataset seed and the query, so every
policy meets the same topology on the same query (common random numbers).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .cmdp_catalog import ROLES

__all__ = ["MIX_WEIGHTS", "MODES", "Node", "PLANNERS", "Topology", "make_planner", "make_topology"]


@dataclass(frozen=True, slots=True)
class Node:
    index: int
    role: str
    deps: tuple[int, ...] = ()

    @property
    def function(self) -> str:
        return ROLES[self.role].function


@dataclass(frozen=True, slots=True)
class Topology:
    """A DAG of agent calls in topological order; the last node's answer is the query's answer."""

    mode: str
    nodes: tuple[Node, ...]

    def __post_init__(self) -> None:
        for i, n in enumerate(self.nodes):
            if n.index != i or any(not 0 <= d < i for d in n.deps):
                raise ValueError(f"topology {self.mode}: node {i} must depend on earlier nodes only")
        if self.nodes[-1].function == "plan":
            raise ValueError(f"topology {self.mode}: the last node must answer")

    def __len__(self) -> int:
        return len(self.nodes)

    def path_lengths(self) -> list[int]:
        """Per node, the number of calls on the longest path from it to the sink (itself included)."""
        out = [1] * len(self.nodes)
        for n in reversed(self.nodes):
            for d in n.deps:
                out[d] = max(out[d], out[n.index] + 1)
        return out


_SOLVER = {"math": "MathSolver", "code": "ProgrammingExpert"}
_ANALYST = {"math": "MathAnalyst", "code": "AlgorithmDesigner"}
_CRITIC = {"math": "Inspector", "code": "TestAnalyst"}


def _io(k):
    return [Node(0, _SOLVER[k])]


def _reflection(k):
    return [Node(0, _SOLVER[k]), Node(1, _CRITIC[k], (0,))]


def _chain(k):
    return [Node(0, _ANALYST[k]), Node(1, _SOLVER[k], (0,)), Node(2, _CRITIC[k], (1,))]


def _full(k):
    return [Node(0, _ANALYST[k]), Node(1, _SOLVER[k], (0,)), Node(2, _CRITIC[k], (0, 1)),
            Node(3, "FinalDecision", (0, 1, 2))]


def _debate(k):
    r1 = [Node(i, _SOLVER[k]) for i in range(3)]
    r2 = [Node(3 + i, _SOLVER[k] if k == "math" else "BugFixer", (0, 1, 2)) for i in range(3)]
    return r1 + r2 + [Node(6, "FinalDecision", (3, 4, 5))]


def _parallel_map(k, width: int = 4):
    branches = [Node(1 + i, _SOLVER[k], (0,)) for i in range(width)]
    return [Node(0, "TaskPlanner")] + branches + [Node(1 + width, "FinalDecision", tuple(range(1, 1 + width)))]


_BUILDERS: dict[str, Callable[[str], list[Node]]] = {
    "IO": _io, "Reflection": _reflection, "Chain": _chain, "FullConnected": _full, "Debate": _debate,
    "ParallelMap": _parallel_map,
}
MODES = tuple(_BUILDERS)
MAX_NODES = max(len(b("math")) for b in _BUILDERS.values())

#: the default planner's mode frequencies (an assumption: MasRouter samples its modes; no published
#: frequencies), each mode about equally likely, single calls a little less
MIX_WEIGHTS = {"IO": 0.12, "Reflection": 0.18, "Chain": 0.18, "FullConnected": 0.18, "Debate": 0.17,
               "ParallelMap": 0.17}


def make_topology(mode: str, kind: str) -> Topology:
    if mode not in _BUILDERS:
        raise ValueError(f"unknown topology {mode!r}; choose one of {MODES}")
    if kind not in _SOLVER:
        raise ValueError(f"task kind must be 'math' or 'code', got {kind!r}")
    return Topology(mode, tuple(_BUILDERS[mode](kind)))


class Planner:
    """Maps (query index, query embedding) to a topology; deterministic given the dataset seed."""

    def __init__(self, kind: str, weights: dict[str, float], dataset_seed: int = 0, name: str = "mix"):
        bad = [m for m in weights if m not in _BUILDERS]
        if bad or not weights or any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(f"planner weights must be non-negative over {MODES}, got {weights}")
        self.kind, self.name, self.dataset_seed = kind, name, dataset_seed
        self.modes = [m for m in MODES if weights.get(m, 0) > 0]
        w = np.array([weights[m] for m in self.modes], dtype=np.float64)
        self.cdf = np.cumsum(w / w.sum())
        self._topologies = {m: make_topology(m, kind) for m in self.modes}

    def __call__(self, query: int, split_id: int, embedding: np.ndarray | None = None) -> Topology:
        if len(self.modes) == 1:
            return self._topologies[self.modes[0]]
        u = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.dataset_seed, 77, split_id, query]))).random()
        return self._topologies[self.modes[int(np.searchsorted(self.cdf, u, side="right"))]]


def make_planner(spec: str, kind: str, dataset_seed: int = 0) -> Planner:
    """``"mix"`` or ``"fixed:<Mode>"`` (see the module docstring)."""
    if spec == "mix":
        return Planner(kind, MIX_WEIGHTS, dataset_seed, name="mix")
    if spec.startswith("fixed:"):
        mode = spec.split(":", 1)[1]
        if mode not in _BUILDERS:
            raise ValueError(f"unknown topology {mode!r} in planner {spec!r}; choose one of {MODES}")
        return Planner(kind, {mode: 1.0}, dataset_seed, name=spec)
    raise ValueError(f"planner must be 'mix' or 'fixed:<Mode>' with Mode in {MODES}, got {spec!r}")


PLANNERS = ("mix",) + tuple(f"fixed:{m}" for m in MODES)
