"""PPO-Lagrangian's rollout and advantages: the named rollout record, its collection, GAE and the surrogate's
advantage (the "storage setup", rollout and "bootstrap value" blocks of CleanRL's ``ppo.py``).

One rollout is ``T = steps_per_epoch`` agent calls of one ``MASLatencyCMDPEnv``; episodes run across rollout
boundaries (``EpisodeCursor`` carries the running episode), as CleanRL's ``next_obs`` does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from envs.cmdp_catalog import STRATEGY_NAMES

from .cmdp_policies import Featurizer
from .ppo_nets import ActorCritics, NumpyActorCritics, RunningNorm

__all__ = ["Advantages", "EpisodeCursor", "EpisodeStats", "Rollout", "collect_rollout", "compute_advantages", "gae"]

#: added to the sampled action's probability before its log (a probability rounded to 0 stays finite)
LOGPROB_EPS = 1e-12
#: added to a standard deviation before dividing by it (CleanRL's advantage normalisation)
STD_EPS = 1e-8


class EpisodeStats(NamedTuple):
    """One finished episode, for the epoch's metrics and ``J_c``."""

    ret: float               # undiscounted return (the reward the trainer used)
    cost: float              # episodic cost of the trainer's cost kind
    slo_violated: bool
    latency_over_slo: float  # end-to-end latency / SLO
    quality: float           # the 0/1 answer


@dataclass(slots=True)
class EpisodeCursor:
    """Where the environment is between rollouts: its next observation and the running episode's sums."""

    next_obs: dict
    ret: float = 0.0
    cost: float = 0.0


@dataclass(slots=True)
class Rollout:
    """One rollout, row ``t`` per agent call (CleanRL's storage; numpy, float64 unless noted).

    ``obs`` and ``action_features`` are the featurised, *unnormalised* state and per-action features (the
    normaliser is updated from them after the rollout); ``values`` and ``cost_values`` are V_r and V_c at
    ``obs``; ``next_value``/``next_cost_value`` bootstrap the row after the last.
    """

    obs: np.ndarray                    # (T, state_dim) float32
    action_features: np.ndarray        # (T, actions, action_dim) float32
    actions: np.ndarray                # (T,) int64, index of the joint (model, strategy) action
    logprobs: np.ndarray               # log pi_old(action)
    rewards: np.ndarray
    costs: np.ndarray
    dones: np.ndarray                  # 1.0 where the call ended its episode
    values: np.ndarray
    cost_values: np.ndarray
    probs: np.ndarray                  # (T, actions) pi_old, the counterfactual baseline's weights
    quality_by_action: np.ndarray      # (T, actions) P(answer right | this call's action), NaN until known
    nodes: np.ndarray                  # (T,) int64, the call's index in its episode (``obs["step"]``)
    episodes: list[EpisodeStats] = field(default_factory=list)
    next_value: float = 0.0
    next_cost_value: float = 0.0

    @classmethod
    def empty(cls, steps: int, state_dim: int, num_actions: int, action_dim: int) -> Rollout:
        return cls(obs=np.zeros((steps, state_dim), np.float32),
                   action_features=np.zeros((steps, num_actions, action_dim), np.float32),
                   actions=np.zeros(steps, np.int64), logprobs=np.zeros(steps), rewards=np.zeros(steps),
                   costs=np.zeros(steps), dones=np.zeros(steps), values=np.zeros(steps),
                   cost_values=np.zeros(steps), probs=np.zeros((steps, num_actions)),
                   quality_by_action=np.full((steps, num_actions), np.nan), nodes=np.zeros(steps, np.int64))


def _policy_step(fwd: NumpyActorCritics, norm_s: RunningNorm, norm_a: RunningNorm, ro: Rollout, t: int):
    """pi(.|s_t) (numpy probabilities), V_r(s_t), V_c(s_t) from the normalised row ``t``."""
    logits, value, cost_value = fwd(norm_s(ro.obs[t]), norm_a(ro.action_features[t]))
    p = np.exp(logits - logits.max())
    p /= p.sum()
    return p, value, cost_value


def collect_rollout(env, nets: ActorCritics, featurizer: Featurizer, norm_s: RunningNorm, norm_a: RunningNorm,
                    rng: np.random.Generator, cursor: EpisodeCursor, steps: int, *,
                    cost_fn: Callable[[dict, bool], float], reward: str,
                    progress: Callable[[int], None] | None = None) -> Rollout:
    """``steps`` calls sampled from pi_old; the cursor moves on. ``reward="expected"`` pays the episode's
    ``info["quality_expected"]`` instead of its 0/1 answer; ``"counterfactual"`` fills ``quality_by_action``
    for the rows of every episode that ends inside this rollout."""
    num_strategies = len(STRATEGY_NAMES)
    num_actions = len(env.models) * num_strategies
    ro = Rollout.empty(steps, norm_s.mean.shape[0], num_actions, norm_a.mean.shape[0])
    episode_rows: list[int] = []                           # the running episode's rows in this rollout
    fwd = NumpyActorCritics(nets)                          # pi_old: the nets do not change during a rollout
    for t in range(steps):
        obs = cursor.next_obs
        ro.obs[t], ro.action_features[t] = featurizer(obs)
        p, ro.values[t], ro.cost_values[t] = _policy_step(fwd, norm_s, norm_a, ro, t)
        a = int(rng.choice(num_actions, p=p))
        ro.actions[t], ro.logprobs[t] = a, float(np.log(p[a] + LOGPROB_EPS))
        ro.probs[t], ro.nodes[t] = p, int(obs["step"])
        episode_rows.append(t)
        cursor.next_obs, r, term, trunc, info = env.step(env.encode_action(*divmod(a, num_strategies)))
        done = term or trunc
        if term and reward == "expected":
            r = info["quality_expected"]
        c = cost_fn(info, done)
        ro.rewards[t], ro.costs[t], ro.dones[t] = r, c, float(done)
        cursor.ret += r
        cursor.cost += c
        if done:
            if reward == "counterfactual":
                ro.quality_by_action[episode_rows] = info["quality_by_action"][ro.nodes[episode_rows]]
            episode_rows = []
            ro.episodes.append(EpisodeStats(cursor.ret, cursor.cost, info["slo_violated"],
                                            info["latency_s"] / info["slo_s"], info["quality"]))
            cursor.ret = cursor.cost = 0.0
            cursor.next_obs, _ = env.reset()
        if progress is not None:
            progress(1)
    s_next, a_next = featurizer(cursor.next_obs)
    _, ro.next_value, ro.next_cost_value = fwd(norm_s(s_next), norm_a(a_next))
    return ro


def gae(rewards: np.ndarray, values: np.ndarray, dones: np.ndarray, next_value: float, gamma: float,
        gae_lambda: float) -> tuple[np.ndarray, np.ndarray]:
    """Generalised advantage estimation (Schulman et al. 2016; CleanRL's loop): ``(advantages, returns)``."""
    advantages = np.zeros_like(rewards)
    next_values, last_gae = next_value, 0.0
    for t in range(len(rewards) - 1, -1, -1):
        nonterminal = 1.0 - dones[t]
        delta = rewards[t] + gamma * next_values * nonterminal - values[t]
        last_gae = delta + gamma * gae_lambda * nonterminal * last_gae
        advantages[t] = last_gae
        next_values = values[t]
    return advantages, advantages + values


def standardise(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / (x.std() + STD_EPS)


class Advantages(NamedTuple):
    """The surrogate's advantage per row and the two critics' regression targets."""

    advantages: np.ndarray
    reward_returns: np.ndarray
    cost_returns: np.ndarray


def counterfactual_advantages(ro: Rollout) -> np.ndarray:
    """COMA's counterfactual credit ``Q_i(a) - sum_a' pi(a') Q_i(a')``; rows of an episode still running at
    the end of the rollout (``quality_by_action`` unknown) get no reward credit."""
    known = ~np.isnan(ro.quality_by_action[:, 0])
    adv = np.zeros(len(ro.actions))
    q = ro.quality_by_action[known]
    adv[known] = q[np.arange(len(q)), ro.actions[known]] - (ro.probs[known] * q).sum(1)
    return adv


def compute_advantages(ro: Rollout, lam: float, *, gamma: float, gae_lambda: float, reward: str,
                       adv_norm: str) -> Advantages:
    """A_r (GAE, or counterfactual credit), A_c (GAE), combined with the multiplier ``lam``: ``joint``
    standardises ``A_r - lam A_c`` as one, ``separate`` is OmniSafe's ``(std(A_r) - lam std(A_c)) / (1 + lam)``."""
    adv_r, ret_r = gae(ro.rewards, ro.values, ro.dones, ro.next_value, gamma, gae_lambda)
    if reward == "counterfactual":
        adv_r = counterfactual_advantages(ro)
    adv_c, ret_c = gae(ro.costs, ro.cost_values, ro.dones, ro.next_cost_value, gamma, gae_lambda)
    if adv_norm == "separate":
        adv = (standardise(adv_r) - lam * standardise(adv_c)) / (1.0 + lam)
    else:
        adv = standardise(adv_r - lam * adv_c)
    return Advantages(adv, ret_r, ret_c)
