"""PPO-Lagrangian with a categorical actor for ``MASLatency-CMDP-v0`` (CleanRL's ``ppo.py`` layout).

OmniSafe's PPOLag (``algorithms/on_policy/naive_lagrange/ppo_lag.py``) supports only ``Box`` actions, so
this is the same algorithm in-house for the joint (model, strategy) choice: one categorical over the
``M x 3`` actions, a reward critic and a separate cost critic, GAE for both, and per epoch, *before* the
policy update, the multiplier step ``lambda <- proj(lambda + eta (J_c - d))`` (``agents.lagrange``;
``lagrangian="pid"`` for the PID variant). The surrogate is clipped PPO on ``A_r - lambda A_c``, standardised
as one (``adv_norm="separate"``: OmniSafe's ``(A_r - lambda A_c) / (1 + lambda)`` with each advantage
standardised). Observations are normalised online.

Reward credit (``reward``): the episode pays one 0/1 answer, and the qualities of the actions differ by 1-10
points per call, so GAE on that answer is mostly noise (HumanEval, idle load: the policy stopped 1-2 points
short of always-70B-DeepThink however long it trained). ``counterfactual`` (default) gives every call the
exact effect of its action on the probability that the final answer is right, the other calls as made
(``info["quality_by_action"]``, the answer draws re-simulated; COMA's counterfactual baseline); its effect on
later calls through the latency it spends is the cost advantage's business. ``expected`` is GAE on that
probability, ``sampled`` GAE on the answer itself.

Costs (``cost``): ``violation`` (default) is 1 at the end of an episode that missed its SLO, so ``J_c`` is the
violation rate and the limit reads as an SLO-attainment target; ``overrun_frac`` is ``info["cost"] / SLO``, the
share of the budget the episode overran; ``overrun_s`` is ``info["cost"]`` itself (seconds). On the busy
regime (GSM8K, 36k steps) ``violation`` at d = 0.02 gave 95-100 % greedy attainment at SLO factors 0.75-2,
``overrun_frac`` at d = 0.002 only 80-100 %: a mean-overrun bound lets many small misses through. On the
bursty regime d = 0.02 left 94 % (pooled), d = 0.01 with 48k steps 97.5 %.

Layout (CleanRL's ``ppo.py``): ``PPOLagArgs`` holds every hyper-parameter; ``train_ppo_lagrangian`` is the
loop: per epoch ``collect_rollout`` (``agents.ppo_rollout``: a named ``Rollout`` record), the multiplier step,
``compute_advantages``, then ``ppo_update``; one metrics row per epoch, named ``train/``, ``constraint/``,
``latency/``, ``losses/``, ``time/``, optionally also written to TensorBoard (``tensorboard_dir``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Literal, get_args

import numpy as np
import torch

from envs.cmdp_catalog import quality_table

from .cmdp_policies import Featurizer, action_dim, state_dim
from .lagrange import make_lagrange
from .ppo_nets import ActorCritics, PPOLagPolicy, RunningNorm
from .ppo_rollout import EpisodeCursor, Rollout, collect_rollout, compute_advantages

__all__ = ["COSTS", "COST_LIMIT_BY_COST", "ENV_COST", "check_env_cost", "REWARDS", "PPOLagArgs", "PPOLagPolicy", "RunningNorm", "ppo_update", "train_ppo_lagrangian"]

CostKind = Literal["violation", "overrun_frac", "overrun_s"]
RewardKind = Literal["counterfactual", "expected", "sampled"]

#: the sampling generator's stream is ``SeedSequence([seed, ACTION_STREAM])``, apart from torch's
ACTION_STREAM = 17


@dataclass(frozen=True, slots=True, kw_only=True)
class PPOLagArgs:
    """PPO-Lagrangian hyper-parameters (OmniSafe PPOLag defaults where they fit a 7-step episode).

    ``total_steps`` and ``steps_per_epoch`` keep one regime's training under 5 minutes on one core: the busy
    regime simulates ~200 background requests per agent call.
    """

    total_steps: int = 36_000
    """environment steps (agent calls) in all"""
    steps_per_epoch: int = 500
    """rollout length between updates (OmniSafe: 20,000 for 1,000-step episodes)"""
    update_iters: int = 10
    """passes over the rollout per update (OmniSafe: 40)"""
    minibatch: int = 64
    """rows per gradient step (OmniSafe: 64)"""
    gamma: float = 0.99
    """discount of reward and cost (OmniSafe: 0.99)"""
    gae_lambda: float = 0.95
    """GAE lambda (OmniSafe: 0.95)"""
    clip: float = 0.2
    """PPO ratio clip"""
    lr: float = 1e-3
    """actor and critic learning rate (OmniSafe: 3e-4; a 6-way choice with a shared action scorer tolerates
    more)"""
    anneal_lr: bool = True
    """decay the learning rate linearly to 0 over the epochs (CleanRL's ``anneal_lr``)"""
    adam_eps: float = 1e-5
    """Adam's epsilon (CleanRL: 1e-5)"""
    entropy_coef: float = 0.01
    """entropy bonus (OmniSafe: 0; a little keeps six actions explored)"""
    vf_coef: float = 0.5
    """weight of the two critics' squared errors in the loss (CleanRL: 0.5)"""
    max_grad_norm: float = 40.0
    """clip of the global gradient norm (OmniSafe: 40)"""
    hidden: int = 64
    """width of the two tanh layers of each network"""
    cost: CostKind = "violation"
    """the constrained cost, read from ``info["cost"]`` of an env built with the matching kind
    (``ENV_COST``: ``MASLatencyCMDPEnv(cost=...)``): 1 per episode that misses its SLO (``violation``, so the
    limit is a violation rate), the overrun as a fraction of the SLO (``overrun_frac``) or in seconds
    (``overrun_s``); both overrun kinds need ``cost="overrun"``"""
    reward: RewardKind = "counterfactual"
    """the reward advantage. ``counterfactual``: per call, how much its action changes the probability that the
    final answer is right, every other call as made (``info["quality_by_action"]``; ``A_r = Q_i(a) - sum_a'
    pi(a') Q_i(a')``, COMA's counterfactual baseline): exact credit per call, no critic noise, the effect of an
    action on later calls left to the cost side. ``expected``: GAE on ``info["quality_expected"]``, the
    probability that the final answer is right given the calls made (less variance than the answer).
    ``sampled``: GAE on the 0/1 answer the environment returns"""
    adv_norm: Literal["joint", "separate"] = "joint"
    """``joint``: the surrogate's advantage is ``A_r - lambda A_c`` standardised as one, so lambda is in the
    units of quality per unit of cost and a precise, small ``A_r`` is not blown up to unit variance against a
    noisy ``A_c``; ``separate``: OmniSafe's ``(std(A_r) - lambda std(A_c)) / (1 + lambda)``, with which
    counterfactual credit left GSM8K busy at 0.87-0.94 training attainment after 48 epochs"""
    cost_limit: float | None = None
    """d, the bound on the mean episodic cost; not given: the cost kind's (``COST_LIMIT_BY_COST``: violation
    0.01, at most 1 % of training episodes late, a margin under the 5 % an SLO of 95 % allows, for the gap
    between the sampling policy trained and the greedy one deployed and for bursts no policy sees coming;
    overrun_frac 0.002 and overrun_s 0.02, the overrun limits that gave comparable attainment)"""
    lagrangian: Literal["gradient", "pid"] = "gradient"
    """the multiplier's update: OmniSafe's gradient ascent (``gradient``) or the PID Lagrangian (``pid``)"""
    lambda_init: float = 0.001
    """lambda_0 of the gradient Lagrangian (OmniSafe: 0.001)"""
    lambda_lr: float = 0.2
    """eta, Adam's step on lambda (OmniSafe: 0.035 over hundreds of epochs). Adam moves lambda by about eta per
    epoch while the sign of ``J_c - d`` holds, so E epochs reach at most E eta; under busy load the multiplier
    climbs to 5-10, which at 0.1 it was still far from when training ended"""
    pid_kp: float = 1.0
    """PID Lagrangian's proportional gain (OmniSafe CPPOPID: 0.1 for costs of ~25 per episode; scaled up for a
    cost that is a rate in [0, 1], else lambda would crawl)"""
    pid_ki: float = 0.5
    """PID Lagrangian's integral gain (OmniSafe CPPOPID: 0.01)"""
    pid_kd: float = 1.0
    """PID Lagrangian's derivative gain (OmniSafe CPPOPID: 0.01)"""
    seed: int = 0
    """torch initialisation, minibatch order, action sampling and the environment's seed"""
    tensorboard_dir: str | None = None
    """also write each epoch's metrics to TensorBoard event files in this folder (needs the ``tensorboard``
    package: ``pip install 'maslatency[tensorboard]'``); none: only the returned rows"""

    def __post_init__(self) -> None:
        if self.total_steps < self.steps_per_epoch or self.steps_per_epoch < self.minibatch or self.minibatch < 1:
            raise ValueError("need total_steps >= steps_per_epoch >= minibatch >= 1")
        if self.cost not in COSTS:
            raise ValueError(f"cost must be one of {sorted(COSTS)}, got {self.cost!r}")
        if self.adv_norm not in ("joint", "separate"):
            raise ValueError(f"adv_norm must be 'joint' or 'separate', got {self.adv_norm!r}")
        if self.reward not in REWARDS:
            raise ValueError(f"reward must be one of {REWARDS}, got {self.reward!r}")
        if self.cost_limit is None:
            object.__setattr__(self, "cost_limit", COST_LIMIT_BY_COST[self.cost])
        if self.cost_limit < 0:
            raise ValueError("cost_limit must be >= 0")
        if not (0 < self.gamma <= 1 and 0 <= self.gae_lambda <= 1 and 0 < self.clip < 1 and self.lr > 0):
            raise ValueError("gamma in (0, 1], gae_lambda in [0, 1], clip in (0, 1) and lr > 0")
        if not (self.adam_eps > 0 and self.vf_coef >= 0 and self.max_grad_norm > 0 and self.hidden >= 1):
            raise ValueError("need adam_eps > 0, vf_coef >= 0, max_grad_norm > 0 and hidden >= 1")


REWARDS: tuple[str, ...] = get_args(RewardKind)

#: per cost kind, a call's cost from its step's ``info`` (of an env built with ``cost=ENV_COST[kind]``) and
#: whether it ended the episode
COSTS: dict[str, Callable[[dict, bool], float]] = {
    "overrun_frac": lambda info, done: info["cost"] / info["slo_s"],
    "overrun_s": lambda info, done: info["cost"],
    "violation": lambda info, done: info["cost"],
}
#: the ``MASLatencyCMDPEnv(cost=...)`` kind each of the trainer's costs reads
ENV_COST: dict[str, str] = {"overrun_frac": "overrun", "overrun_s": "overrun", "violation": "violation"}
#: the limit d per cost kind when ``cost_limit`` is not given
COST_LIMIT_BY_COST: dict[str, float] = {"violation": 0.01, "overrun_frac": 0.002, "overrun_s": 0.02}
assert set(COSTS) == set(get_args(CostKind))


def check_env_cost(env, cost: str) -> None:
    """Raise unless ``env`` hands out ``info["cost"]`` of the kind PPO-Lagrangian's ``cost`` reads."""
    kind = getattr(env, "cost_kind", None)
    if kind != ENV_COST[cost]:
        raise ValueError(f"PPO-Lagrangian's cost {cost!r} reads info['cost'] of an env built with "
                         f"cost={ENV_COST[cost]!r}; this env has cost={kind!r}: build it with "
                         f"MASLatencyCMDPEnv(..., cost={ENV_COST[cost]!r})")


def train_ppo_lagrangian(env, args: PPOLagArgs = PPOLagArgs(), *, progress: Callable[[int], None] | None = None,
                         log: Callable[[dict], None] | None = None) -> tuple[PPOLagPolicy, list[dict]]:
    """Train on ``env`` (an unwrapped ``MASLatencyCMDPEnv``); returns the greedy policy and per-epoch metrics.

    ``progress`` is called with 1 per environment step, ``log`` with each epoch's metrics row."""
    writer = open_tensorboard(args) if args.tensorboard_dir is not None else None
    check_env_cost(env, args.cost)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([args.seed, ACTION_STREAM])))
    nm = len(env.models)
    featurizer = Featurizer(quality_table(env.task, env.models))
    nets = ActorCritics(state_dim(nm), action_dim(nm), args.hidden, gen)
    optimizer = torch.optim.Adam(nets.parameters(), lr=args.lr, eps=args.adam_eps, foreach=True)  # same bits, fewer calls
    lagrange = make_multiplier(args)
    norm_s, norm_a = RunningNorm(state_dim(nm)), RunningNorm(action_dim(nm))
    num_epochs = args.total_steps // args.steps_per_epoch
    if args.reward == "counterfactual":
        env.counterfactual_quality = True                      # info["quality_by_action"] at episode ends
    cursor = EpisodeCursor(next_obs=env.reset(seed=args.seed)[0])
    history: list[dict] = []
    clock = {"time/simulate_s": 0.0, "time/learn_s": 0.0}
    try:
        for epoch in range(num_epochs):
            t0 = time.perf_counter()
            ro = collect_rollout(env, nets, featurizer, norm_s, norm_a, rng, cursor, args.steps_per_epoch,
                                 cost_fn=COSTS[args.cost], reward=args.reward, progress=progress)
            t1 = time.perf_counter()
            clock["time/simulate_s"] += t1 - t0
            # the multiplier steps on this rollout's J_c *before* the policy update (OmniSafe's order)
            episode_cost = float(np.mean([e.cost for e in ro.episodes])) if ro.episodes else float(ro.costs.sum())
            lam = lagrange.update(episode_cost)
            adv = compute_advantages(ro, lam, gamma=args.gamma, gae_lambda=args.gae_lambda, reward=args.reward,
                                     adv_norm=args.adv_norm)
            norm_s.update(ro.obs)
            norm_a.update(ro.action_features.reshape(-1, ro.action_features.shape[-1]))
            if args.anneal_lr:
                for group in optimizer.param_groups:
                    group["lr"] = args.lr * (1.0 - epoch / num_epochs)
            losses = ppo_update(nets, optimizer, _batch(ro, adv, norm_s, norm_a), args, gen)
            clock["time/learn_s"] += time.perf_counter() - t1
            row = epoch_metrics(epoch, args, ro, episode_cost, lam, losses, clock)
            history.append(row)
            if writer is not None:
                write_tensorboard(writer, row)
            if log is not None:
                log(row)
    finally:
        if writer is not None:
            writer.close()
    policy = PPOLagPolicy(nets.actor, featurizer, norm_s, norm_a)
    policy.args = asdict(args)
    return policy, history


def make_multiplier(args: PPOLagArgs):
    """The Lagrange multiplier of ``args.lagrangian`` with its hyper-parameters from ``args``."""
    if args.lagrangian == "gradient":
        return make_lagrange("gradient", args.cost_limit, init=args.lambda_init, lr=args.lambda_lr)
    return make_lagrange(args.lagrangian, args.cost_limit, kp=args.pid_kp, ki=args.pid_ki, kd=args.pid_kd)


def _batch(ro: Rollout, adv, norm_s: RunningNorm, norm_a: RunningNorm) -> dict[str, torch.Tensor]:
    """The rollout as update tensors, observations normalised with the just-updated statistics."""
    steps, num_actions, da = ro.action_features.shape
    flat = ro.action_features.reshape(-1, da)
    return {"obs": torch.as_tensor(norm_s(ro.obs)),
            "action_features": torch.as_tensor(norm_a(flat).reshape(steps, num_actions, da)),
            "actions": torch.as_tensor(ro.actions), "logprobs": torch.as_tensor(ro.logprobs, dtype=torch.float32),
            "advantages": torch.as_tensor(adv.advantages, dtype=torch.float32),
            "reward_returns": torch.as_tensor(adv.reward_returns, dtype=torch.float32),
            "cost_returns": torch.as_tensor(adv.cost_returns, dtype=torch.float32)}


def ppo_update(nets: ActorCritics, optimizer: torch.optim.Optimizer, b: dict[str, torch.Tensor], args: PPOLagArgs,
               gen: torch.Generator) -> np.ndarray:
    """``update_iters`` shuffled passes of clipped-surrogate minibatch steps (CleanRL's "optimizing the policy
    and value network" block) on ``A_r - lambda A_c``; both critics regress on their GAE returns. Returns the
    mean (policy loss, reward value loss, cost value loss, entropy)."""
    steps = len(b["actions"])
    stats = []
    for _ in range(args.update_iters):
        perm = torch.randperm(steps, generator=gen)
        for start in range(0, steps, args.minibatch):
            mb = perm[start:start + args.minibatch]
            logp_all = torch.log_softmax(nets.actor(b["obs"][mb], b["action_features"][mb]), -1)
            ratio = torch.exp(logp_all.gather(1, b["actions"][mb, None])[:, 0] - b["logprobs"][mb])
            mb_adv = b["advantages"][mb]
            pg_loss = -torch.min(ratio * mb_adv, torch.clamp(ratio, 1 - args.clip, 1 + args.clip) * mb_adv).mean()
            entropy = -(logp_all.exp() * logp_all).sum(-1).mean()
            v_loss = ((nets.reward_critic(b["obs"][mb])[:, 0] - b["reward_returns"][mb]) ** 2).mean()
            vc_loss = ((nets.cost_critic(b["obs"][mb])[:, 0] - b["cost_returns"][mb]) ** 2).mean()
            loss = pg_loss - args.entropy_coef * entropy + args.vf_coef * (v_loss + vc_loss)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(nets.parameters(), args.max_grad_norm)
            optimizer.step()
            stats.append((pg_loss.item(), v_loss.item(), vc_loss.item(), entropy.item()))
    return np.mean(stats, axis=0)


def epoch_metrics(epoch: int, args: PPOLagArgs, ro: Rollout, episode_cost: float, lam: float, losses: np.ndarray,
                  clock: dict[str, float]) -> dict:
    """One epoch's row (the CSV columns, in this order; NaN where no episode ended in the rollout)."""
    eps = ro.episodes
    nan = float("nan")

    def mean(name: str) -> float:
        return float(np.mean([getattr(e, name) for e in eps])) if eps else nan

    steps = len(ro.actions)
    return {"epoch": epoch, "steps": (epoch + 1) * steps, "episodes": len(eps), "train/return": mean("ret"),
            "train/quality": mean("quality"), "constraint/episode_cost": episode_cost, "constraint/lambda": lam,
            "constraint/cost_limit": args.cost_limit, "constraint/cost_rate": float(ro.costs.sum() / steps),
            "latency/slo_attainment": 1.0 - mean("slo_violated") if eps else nan,
            "latency/over_slo_p95": float(np.percentile([e.latency_over_slo for e in eps], 95)) if eps else nan,
            "losses/policy": float(losses[0]), "losses/reward_value": float(losses[1]),
            "losses/cost_value": float(losses[2]), "losses/entropy": float(losses[3]), **clock}


def open_tensorboard(args: PPOLagArgs):
    """A ``SummaryWriter`` on ``args.tensorboard_dir`` with the hyper-parameters as text (CleanRL's table);
    torch's writer needs the ``tensorboard`` package, imported only here."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError(f"tensorboard_dir={args.tensorboard_dir!r} needs the tensorboard package, which is not "
                          "installed: pip install 'maslatency[tensorboard]' (or pip install tensorboard), or leave "
                          "tensorboard_dir unset") from e
    writer = SummaryWriter(args.tensorboard_dir)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items()))
    return writer


def write_tensorboard(writer, row: dict) -> None:
    """Every metric of the row as a scalar at x = environment steps so far."""
    for name, value in row.items():
        if name not in ("epoch", "steps"):
            writer.add_scalar(name, value, global_step=row["steps"])
    writer.flush()
