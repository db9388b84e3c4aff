"""Policies for ``MASLatency-APWA-v0``: observation -> decomposition action, the same interface as the other
envs' baselines (``act(obs) -> action``), so learned policies and rules are compared on the same episodes.

* ``ManagerRulePolicy``: the APWA manager's default rule (``envs.apwa.auto_decomposition``) read off the
  observation: as many rows per call as fit a context budget, fan-in 8, 64 calls in flight, workers on the
  first pool, merges on the first pool. Load-blind.
* ``LoadAwarePolicy``: the same, but it spreads workers over every pool when the first pool's queue is
  long (``waiting`` above ``queue_threshold`` requests), the fan-out/fan-in choice system-aware routing
  is meant to make (docs/system_aware.md#10-apwa-architecture).
* ``FixedActionPolicy``: one action for every episode (grids, ablations).
"""

from __future__ import annotations

import numpy as np

from envs.apwa_env import FAN_INS, GROUP_SIZES, IN_FLIGHT

__all__ = ["FixedActionPolicy", "LoadAwarePolicy", "ManagerRulePolicy"]


def _nearest_at_most(options: tuple[int, ...], x: float) -> int:
    fits = [i for i, v in enumerate(options) if v <= x]
    return fits[-1] if fits else 0


class ManagerRulePolicy:
    """The manager's default rule as an env policy (see the module docstring).

    Args:
        context_budget_tokens: largest worker context (prompt + expected outputs) to aim for.
        instruction_tokens: the contract's instruction tokens (``SubtaskContract``; 200 by default).
    """

    def __init__(self, context_budget_tokens: int = 4096, instruction_tokens: int = 200):
        if context_budget_tokens <= instruction_tokens:
            raise ValueError("context_budget_tokens must exceed instruction_tokens")
        self.budget, self.instr = context_budget_tokens, instruction_tokens

    def _pools(self, obs: dict) -> tuple[int, int]:
        return 0, 0

    def act(self, obs: dict, episode: int = 0) -> np.ndarray:
        row, out = float(obs["row_tokens"][0]), float(obs["row_tokens"][1])
        g = max(1.0, (self.budget - self.instr) // max(row + out, 1.0))
        worker, merge = self._pools(obs)
        return np.array([_nearest_at_most(GROUP_SIZES, g), FAN_INS.index(8), IN_FLIGHT.index(64), worker, merge],
                        np.int64)


class LoadAwarePolicy(ManagerRulePolicy):
    """``ManagerRulePolicy`` that spreads workers over all pools when the first pool queues."""

    def __init__(self, queue_threshold: float = 8.0, **kw):
        super().__init__(**kw)
        self.queue_threshold = float(queue_threshold)

    def _pools(self, obs: dict) -> tuple[int, int]:
        system = np.asarray(obs["system"]).reshape(-1, 4)
        all_pools = system.shape[0]
        return (all_pools if system[0, 0] > self.queue_threshold else 0), 0


class FixedActionPolicy:
    def __init__(self, action):
        self.action = np.asarray(action, np.int64)

    def act(self, obs: dict, episode: int = 0) -> np.ndarray:
        return self.action.copy()
