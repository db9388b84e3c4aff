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
        # the per-action rows' constant columns (quality, one-hot model and strategy); __call__ fills the rest
        self._act = np.zeros((na, ACTION_FEATURES + self.onehot.shape[1]))
        self._act[:, 0], self._act[:, ACTION_FEATURES:] = self.quality, self.onehot

    def __call__(self, obs: dict) -> tuple[np.ndarray, np.ndarray]:
        b_s, b_frac = float(obs["budget"][0]), float(obs["budget"][1])
        slo = b_s / b_frac if b_frac != 0 else 1.0
        est = obs["estimates"].astype(np.float64)
        path = max(float(obs["nodes_left"][1]), 1.0)
        sysm = obs["system"].astype(np.float64).reshape(-1, 4)
        # filled in place, in the order of the docstring's state (one-hots set, not sliced from np.eye)
        state = np.zeros(STATE_DIM + 4 * self.num_models)
        state[0], state[1] = b_frac, np.sign(b_s) * np.log1p(abs(b_s))
        state[2:4] = obs["nodes_left"].astype(np.float64) / MAX_NODES
        state[4] = np.log1p(float(obs["prompt_tokens"][0])) / 8.0
        q = obs["query"]
        state[5:5 + len(q)] = q
        i = 5 + len(q)
        state[i + int(obs["role"])] = 1.0
        i += len(ROLE_NAMES)
        state[i + int(obs["step"])] = 1.0
        i += MAX_NODES
        state[i + int(obs["topology"])] = 1.0
        i += len(MODES)
        sys_f = state[i:].reshape(-1, 4)
        sys_f[:, 0], sys_f[:, 1], sys_f[:, 2], sys_f[:, 3] = (np.log1p(sysm[:, 0]), np.log1p(sysm[:, 1]), sysm[:, 2],
                                                              np.log1p(sysm[:, 3]))
        share = b_s / path
        act = self._act
        act[:, 1] = np.log1p(est)
        act[:, 2] = np.clip((share - est) / max(abs(slo), 1e-6), -5.0, 5.0)
        act[:, 3] = np.clip(est / max(b_s, 1e-3), 0.0, 10.0) if b_s > 0 else 10.0
        act[:, 4], act[:, 5] = est <= share, est <= b_s
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
