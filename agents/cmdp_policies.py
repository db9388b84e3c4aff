"""Executor policies for ``MASLatency-CMDP-v0``: one interface for baselines and learned policies.

A policy maps the environment's Dict observation to ``(model index, strategy index)``; the runner encodes it
with ``env.encode_action``. ``begin(env, seed, options)`` is called at the start of every evaluation
episode (the oracle uses it to replay the episode), ``act(obs)`` at every agent call.

Static and greedy baselines:

* ``always_large_deepthink``: the strongest model, DeepThink, every call;
* ``always_small_flash``: the fastest model (smallest reference latency), Flash, every call;
* ``greedy_fastest``: the action with the smallest predicted total latency ``T_total`` (the estimators).

``Featurizer`` turns an observation into what the learned policies read: a state vector and one feature row
per action (its published quality, predicted latency and slack against the remaining budget).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from envs.cmdp_catalog import ROLE_NAMES, STRATEGY_NAMES
from envs.topologies import MAX_NODES, MODES

__all__ = ["BASELINES", "CMDPPolicy", "Featurizer", "GreedyFastest", "StaticAction", "action_dim", "make_baseline",
           "state_dim"]


class CMDPPolicy(Protocol):
    name: str

    def act(self, obs: dict) -> tuple[int, int]: ...


STATE_DIM = 2 + 2 + 1 + 384 + len(ROLE_NAMES) + MAX_NODES + len(MODES)
ACTION_FEATURES = 6     # + one-hot model and strategy


def action_dim(num_models: int) -> int:
    return ACTION_FEATURES + num_models + len(STRATEGY_NAMES)


def state_dim(num_models: int) -> int:
    return STATE_DIM + 4 * num_models


class Featurizer:
    """The learned policies' inputs: a state vector and one feature row per action.

    State: remaining budget (fraction and signed log seconds), calls left, prompt length, the query
    embedding, one-hot role, step and topology, and per model the log queue lengths, KV usage and log TTFT
    EMA. Per action (model-major): the published quality of (model, strategy) on the task (public numbers,
    ``envs.cmdp_catalog.quality_table``), its predicted latency (log seconds), its *slack* (budget per
    call left on the critical path minus the prediction, over the SLO), the prediction over the remaining
    budget, whether it fits, and one-hot model and strategy. Sharing one scorer across actions lets what is
    learned about slack on one action carry over to the others.
    """

    def __init__(self, quality_table: np.ndarray):
        self.quality = np.asarray(quality_table, dtype=np.float64).reshape(-1)
        self.num_models = quality_table.shape[0]
        na = len(self.quality)
        self.onehot = np.zeros((na, self.num_models + len(STRATEGY_NAMES)))
        for a in range(na):
            m, st = divmod(a, len(STRATEGY_NAMES))
            self.onehot[a, m] = 1.0
            self.onehot[a, self.num_models + st] = 1.0

    def __call__(self, obs: dict) -> tuple[np.ndarray, np.ndarray]:
        b_s, b_frac = float(obs["budget"][0]), float(obs["budget"][1])
        slo = b_s / b_frac if b_frac != 0 else 1.0
        est = obs["estimates"].astype(np.float64)
        path = max(float(obs["nodes_left"][1]), 1.0)
        sysm = obs["system"].astype(np.float64).reshape(-1, 4)
        sys_f = np.column_stack([np.log1p(sysm[:, 0]), np.log1p(sysm[:, 1]), sysm[:, 2],
                                 np.log1p(sysm[:, 3])]).reshape(-1)
        state = np.concatenate([
            np.array([b_frac, np.sign(b_s) * np.log1p(abs(b_s))]),
            obs["nodes_left"].astype(np.float64) / MAX_NODES,
            np.array([np.log1p(float(obs["prompt_tokens"][0])) / 8.0]),
            obs["query"].astype(np.float64),
            np.eye(len(ROLE_NAMES))[int(obs["role"])], np.eye(MAX_NODES)[int(obs["step"])],
            np.eye(len(MODES))[int(obs["topology"])], sys_f,
        ])
        share = b_s / path
        slack = np.clip((share - est) / max(abs(slo), 1e-6), -5.0, 5.0)
        ratio = np.clip(est / max(b_s, 1e-3), 0.0, 10.0) if b_s > 0 else np.full_like(est, 10.0)
        act = np.column_stack([self.quality, np.log1p(est), slack, ratio, (est <= share).astype(np.float64),
                               (est <= b_s).astype(np.float64), self.onehot])
        return state.astype(np.float32), act.astype(np.float32)


class StaticAction:
    """The same (model, strategy) for every call."""

    def __init__(self, model: int, strategy: int, name: str):
        self.action, self.name = (int(model), int(strategy)), name

    def act(self, obs: dict) -> tuple[int, int]:
        return self.action


class GreedyFastest:
    """The action with the smallest predicted total latency (ties: the first, model-major)."""

    name = "greedy_fastest"

    def act(self, obs: dict) -> tuple[int, int]:
        return divmod(int(np.argmin(obs["estimates"])), len(STRATEGY_NAMES))


def make_baseline(name: str, env) -> CMDPPolicy:
    """``always_large_deepthink``, ``always_small_flash`` or ``greedy_fastest`` for ``env`` (unwrapped)."""
    deep, flash = STRATEGY_NAMES.index("DeepThink"), STRATEGY_NAMES.index("Flash")
    if name == "always_large_deepthink":
        return StaticAction(env.reference_model, deep, name)
    if name == "always_small_flash":
        return StaticAction(env.fastest_model, flash, name)
    if name == "greedy_fastest":
        return GreedyFastest()
    raise ValueError(f"unknown baseline {name!r}; choose one of {BASELINES}")


BASELINES = ("always_large_deepthink", "always_small_flash", "greedy_fastest")
