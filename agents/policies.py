"""Policies map a ``MASLatency-v0`` observation to an action; baselines and learned policies share this.

An action is the ordered operator list of the next layer, encoded as ``MultiDiscrete([K + 1] * K)`` (K for
an empty slot). ``act(obs, episode=key)`` receives the episode key from ``MASLatencyEnv.rollout`` so a policy
can tell concurrent queries apart; a Gymnasium loop may leave it at 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from envs.operators import GENERATE_TYPE, operator_set

__all__ = ["POLICIES", "Policy", "StaticPolicy", "encode_action", "make_static"]


class Policy(Protocol):
    def act(self, obs: dict, episode: int = 0) -> np.ndarray:
        """The next layer's operators for this observation."""
        ...


def encode_action(indices: Sequence[int], num_ops: int) -> np.ndarray:
    """An ordered list of operator indices as a ``MultiDiscrete`` action (empty slots = ``num_ops``)."""
    a = np.full(num_ops, num_ops, dtype=np.int64)
    a[: len(indices)] = list(indices)
    return a


class StaticPolicy:
    """A fixed architecture: the same list of layers for every query. EarlyStop ends it after the last."""

    def __init__(self, kind: str, layers: Sequence[Sequence[str]], name: str = "static"):
        self.ops = operator_set(kind)
        self.name = name
        if not layers:
            raise ValueError("a static architecture needs at least one layer")
        self._actions = []
        for i, layer in enumerate(layers):
            names = list(layer) + (["EarlyStop"] if i == len(layers) - 1 and "EarlyStop" not in layer else [])
            unknown = [n for n in names if n not in self.ops]
            if unknown:
                raise ValueError(f"layer {i}: operators {unknown} are not in the {kind} set {self.ops}")
            self._actions.append(encode_action([self.ops.index(n) for n in names], len(self.ops)))

    def act(self, obs: dict, episode: int = 0) -> np.ndarray:
        return self._actions[min(int(obs["layer"]), len(self._actions) - 1)]


def single_cot(kind: str) -> StaticPolicy:
    """One chain-of-thought call (the graph's fixed post-processing still runs)."""
    return StaticPolicy(kind, [["GenerateCoT"]], name="single_cot")


def all_parallel(kind: str, num_layers: int = 4) -> StaticPolicy:
    """Every operator in every layer, all in parallel: the full supernet.

    Layer 0 leaves out ScEnsemble (over no solutions it raises in LAMaS's graph) and puts the generators
    first, as the controller's layer-0 rules would.
    """
    ops = [o for o in operator_set(kind) if o != "EarlyStop"]
    first = [o for o in ops if o in GENERATE_TYPE] + [o for o in ops if o not in GENERATE_TYPE and o != "ScEnsemble"]
    return StaticPolicy(kind, [first] + [ops] * (num_layers - 1), name="all_parallel")


#: static baselines: name -> factory(kind)
POLICIES: dict[str, Callable[[str], StaticPolicy]] = {"single_cot": single_cot, "all_parallel": all_parallel}


def make_static(name: str, kind: str) -> StaticPolicy:
    try:
        return POLICIES[name](kind)
    except KeyError:
        raise ValueError(f"unknown static policy {name!r}; choose one of {sorted(POLICIES)}") from None
