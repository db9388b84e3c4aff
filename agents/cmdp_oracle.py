"""An oracle that knows the future load: lookahead by exact re-simulation (an upper-bound reference).

The simulated world is deterministic given its seed and the actions taken, and evaluation episodes start
from ``reset(seed=s, options=...)``. So the oracle can answer "what happens if I take action a now?" exactly,
future background arrivals included: it replays the episode in a private copy of the environment (same
seed, the actions taken so far), takes a, and finishes the episode with the fastest-predicted action for
every later call. At each call it takes the action of highest published quality (``quality_table``) whose
lookahead meets the SLO; if none does, the one whose lookahead finishes first. Once a call has a feasible
completion, every later call has one too (the same fast completion), so the oracle misses the SLO only when
even the fastest plan would.

It knows the load, not the answers: quality enters only through the public per-(model, strategy) table.
Its cost is one replay per action tried (usually one or two per call). The replays are of the world the oracle
is scored in: on a background tape (``background="tape"``, the experiment's default evaluation) they replay the
tape world (its calls served in closed form, ~10x cheaper), in an exact world every background request.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from envs.cmdp_catalog import STRATEGY_NAMES, quality_table

from .cmdp_policies import GreedyFastest

__all__ = ["LookaheadOracle"]


class LookaheadOracle:
    name = "oracle"

    def __init__(self, make_env: Callable[[], object]):
        self._env = make_env()
        q = quality_table(self._env.task, self._env.models).reshape(-1)
        self._order = [int(a) for a in np.argsort(-q, kind="stable")]
        self._fast = GreedyFastest()
        self._seed = None
        self._options: dict = {}
        self._history: list[tuple[int, int]] = []
        self.replays = 0

    def begin(self, env, seed: int, options: dict) -> None:
        self._seed, self._options, self._history = seed, dict(options), []

    def _lookahead(self, action: tuple[int, int]) -> tuple[float, float]:
        """(latency, SLO) of the episode: the actions so far, ``action``, then the fastest-predicted ones."""
        env = self._env
        self.replays += 1
        obs, _ = env.reset(seed=self._seed, options=self._options)
        for a in [*self._history, action]:
            obs, _, term, _, info = env.step(env.encode_action(*a))
            if term:
                return info["latency_s"], info["slo_s"]
        while True:
            obs, _, term, _, info = env.step(env.encode_action(*self._fast.act(obs)))
            if term:
                return info["latency_s"], info["slo_s"]

    def act(self, obs: dict) -> tuple[int, int]:
        if self._seed is None:
            raise RuntimeError("the oracle needs begin(env, seed, options) before each episode")
        best, best_lat = None, float("inf")
        for a in self._order:
            action = divmod(a, len(STRATEGY_NAMES))
            lat, slo = self._lookahead(action)
            if lat <= slo:
                best = action
                break
            if lat < best_lat:
                best, best_lat = action, lat
        self._history.append(best)
        return best
