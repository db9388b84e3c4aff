"""Wrappers for the constrained environment's users: Safety-Gymnasium's step signature.

``MASLatency-CMDP-v0`` is Gymnasium-native: ``step`` returns the 5-tuple and puts the constraint cost in
``info["cost"]`` (FSRL reads it there; Safety-Gymnasium's ``SafetyGymnasium2Gymnasium`` writes it there).
``SafetyGymnasiumWrapper`` gives the native Safety-Gymnasium 6-tuple ``(obs, reward, cost, terminated,
truncated, info)`` for code written against it (OmniSafe-style loops), without importing safety-gymnasium
(which pins gymnasium 0.28).
"""

from __future__ import annotations

import gymnasium as gym

__all__ = ["SafetyGymnasiumWrapper"]


class SafetyGymnasiumWrapper(gym.Wrapper):
    """``step`` -> ``(obs, reward, cost, terminated, truncated, info)`` with ``cost = info[cost_key]``."""

    def __init__(self, env: gym.Env, cost_key: str = "cost"):
        super().__init__(env)
        self.cost_key = cost_key

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        if self.cost_key not in info:
            raise KeyError(f"the wrapped environment gave no info[{self.cost_key!r}]; it is not a constrained env")
        return obs, reward, float(info[self.cost_key]), terminated, truncated, info
