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
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from envs.cmdp_catalog import STRATEGY_NAMES, quality_table

from .cmdp_policies import Featurizer, action_dim, state_dim
from .lagrange import make_lagrange

__all__ = ["PPOLagArgs", "PPOLagPolicy", "RunningNorm", "train_ppo_lagrangian"]


@dataclass(frozen=True, slots=True, kw_only=True)
class PPOLagArgs:
    """PPO-Lagrangian hyperparameters (OmniSafe PPOLag defaults where they fit a 7-step episode).

    Attributes:
        total_steps: environment steps (agent calls) in all.
        steps_per_epoch: rollout length between updates (OmniSafe: 20,000 for 1,000-step episodes).
        update_iters: passes over the rollout per update (OmniSafe: 40).
        minibatch: rows per gradient step (OmniSafe: 64).
        gamma: discount of reward and cost (OmniSafe: 0.99).
        gae_lambda: GAE lambda (OmniSafe: 0.95).
        clip: PPO ratio clip.
        lr: actor and critic learning rate, decayed linearly to 0 (OmniSafe: 3e-4; a 6-way choice with a
            shared action scorer tolerates more).
        entropy_coef: entropy bonus (OmniSafe: 0; a little keeps six actions explored).
        hidden: width of the two tanh layers of each network.
        cost: ``violation`` (default), ``overrun_frac`` or ``overrun_s`` (module docstring).
        reward: the reward advantage. ``counterfactual`` (default): per call, how much its action changes
            the probability that the final answer is right, every other call as made
            (``info["quality_by_action"]``; ``A_r = Q_i(a) - sum_a' pi(a') Q_i(a')``, COMA's counterfactual
            baseline): exact credit per call, no critic noise, the effect of an action on later calls left to
            the cost side. ``expected``: GAE on ``info["quality_expected"]``, the probability that the final
            answer is right given the calls made (same expectation as the sampled answer, less variance).
            ``sampled``: GAE on the 0/1 answer the environment returns.
        adv_norm: ``joint`` (default): the surrogate's advantage is ``A_r - lambda A_c`` standardised as one, so
            lambda is in the natural units (quality per unit of cost) and a precise, small ``A_r`` is not
            blown up to unit variance against a noisy ``A_c``; ``separate``: OmniSafe's ``(std(A_r) - lambda
            std(A_c)) / (1 + lambda)``, with which counterfactual credit left GSM8K busy at 0.87-0.94 training
            attainment after 48 epochs (lambda still climbing).
        cost_limit: d, the bound on the mean episodic cost (0.01: at most 1 % of training episodes late,
            a margin under the 5 % an SLO of 95 % allows, for the gap between the sampling policy trained
            and the greedy one deployed, and for bursts that no policy sees coming).
        lagrangian: ``gradient`` (OmniSafe Lagrange) or ``pid``.
        lambda_init: lambda_0 (OmniSafe: 0.001).
        lambda_lr: eta, Adam's step on lambda (OmniSafe: 0.035 over hundreds of epochs). Adam moves lambda by
            about eta per epoch while the sign of ``J_c - d`` holds, so E epochs reach at most E eta; under
            busy load the multiplier climbs to 5-10 (joint standardisation; HumanEval busy ~10 at 72 epochs),
            which at 0.1 it was still far from when training ended.
        (``total_steps`` and ``steps_per_epoch`` keep one regime's training under 5 minutes on one core:
        the busy regime simulates ~200 background requests per agent call.)
        pid_kp, pid_ki, pid_kd: PID gains (OmniSafe CPPOPID: 0.1, 0.01, 0.01 for navigation costs of ~25 per
            episode; scaled up for a cost that is a rate in [0, 1], else lambda would crawl: with OmniSafe's
            gains it reached 0.06 in 12 epochs on the known-optimum case, with these ~1).
        seed: torch initialisation, minibatch order, action sampling and the environment's seed.
    """

    total_steps: int = 36_000
    steps_per_epoch: int = 500
    update_iters: int = 10
    minibatch: int = 64
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip: float = 0.2
    lr: float = 1e-3
    entropy_coef: float = 0.01
    hidden: int = 64
    cost: str = "violation"
    reward: str = "counterfactual"
    adv_norm: str = "joint"
    cost_limit: float = 0.01
    lagrangian: str = "gradient"
    lambda_init: float = 0.001
    lambda_lr: float = 0.2
    pid_kp: float = 1.0
    pid_ki: float = 0.5
    pid_kd: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.total_steps < self.steps_per_epoch or self.steps_per_epoch < self.minibatch or self.minibatch < 1:
            raise ValueError("need total_steps >= steps_per_epoch >= minibatch >= 1")
        if self.cost not in COSTS:
            raise ValueError(f"cost must be one of {sorted(COSTS)}, got {self.cost!r}")
        if self.adv_norm not in ("joint", "separate"):
            raise ValueError(f"adv_norm must be 'joint' or 'separate', got {self.adv_norm!r}")
        if self.reward not in REWARDS:
            raise ValueError(f"reward must be one of {REWARDS}, got {self.reward!r}")
        if self.cost_limit < 0:
            raise ValueError("cost_limit must be >= 0")
        if not (0 < self.gamma <= 1 and 0 <= self.gae_lambda <= 1 and 0 < self.clip < 1 and self.lr > 0):
            raise ValueError("gamma in (0, 1], gae_lambda in [0, 1], clip in (0, 1) and lr > 0")


REWARDS = ("counterfactual", "expected", "sampled")

COSTS: dict[str, Callable[[dict, bool], float]] = {
    "overrun_frac": lambda info, done: info["cost"] / info["slo_s"],
    "overrun_s": lambda info, done: info["cost"],
    "violation": lambda info, done: float(done and info["slo_violated"]),
}


class RunningNorm:
    """Online mean/variance of observations (Welford over batches); frozen at evaluation."""

    def __init__(self, dim: int):
        self.mean, self.var, self.count = np.zeros(dim), np.ones(dim), 1e-4

    def update(self, x: np.ndarray) -> None:
        bm, bv, n = x.mean(0), x.var(0), len(x)
        d = bm - self.mean
        tot = self.count + n
        self.mean = self.mean + d * n / tot
        self.var = (self.var * self.count + bv * n + d * d * self.count * n / tot) / tot
        self.count = tot

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.clip((x - self.mean) / np.sqrt(self.var + 1e-8), -10.0, 10.0).astype(np.float32)


def _orthogonal(lin: torch.nn.Linear, gain: float, gen: torch.Generator) -> None:
    """Orthogonal init (CleanRL) from an explicit generator."""
    w = lin.weight
    q, r = torch.linalg.qr(torch.randn(max(w.shape), min(w.shape), generator=gen))
    q = q * torch.sign(torch.diagonal(r))
    with torch.no_grad():
        w.copy_(gain * (q if q.shape == w.shape else q.T))
        lin.bias.zero_()


def _mlp(n_in: int, n_out: int, hidden: int, gen: torch.Generator, out_gain: float) -> torch.nn.Sequential:
    net = torch.nn.Sequential(torch.nn.Linear(n_in, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, hidden),
                              torch.nn.Tanh(), torch.nn.Linear(hidden, n_out))
    for i, m in enumerate(x for x in net if isinstance(x, torch.nn.Linear)):
        _orthogonal(m, out_gain if i == 2 else np.sqrt(2.0), gen)
    return net


class Actor(torch.nn.Module):
    """Action-in scorer: logit_a = f([g(state), action_a]), one shared f for every action."""

    def __init__(self, ds: int, da: int, hidden: int, gen: torch.Generator):
        super().__init__()
        self.state = torch.nn.Sequential(torch.nn.Linear(ds, hidden), torch.nn.Tanh())
        _orthogonal(self.state[0], np.sqrt(2.0), gen)
        self.score = _mlp(hidden + da, 1, hidden, gen, 0.01)

    def forward(self, state: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        h = self.state(state)                                   # (B, H)
        h = h.unsqueeze(1).expand(-1, actions.shape[1], -1)     # (B, A, H)
        return self.score(torch.cat([h, actions], -1))[..., 0]  # (B, A)


class _Nets(torch.nn.Module):
    def __init__(self, ds: int, da: int, hidden: int, gen: torch.Generator):
        super().__init__()
        self.actor = Actor(ds, da, hidden, gen)
        self.reward_critic = _mlp(ds, 1, hidden, gen, 1.0)
        self.cost_critic = _mlp(ds, 1, hidden, gen, 1.0)


class PPOLagPolicy:
    """The trained actor: greedy (argmax) by default, sampling with ``stochastic=True``."""

    def __init__(self, actor: Actor, featurizer: Featurizer, norm_s: RunningNorm, norm_a: RunningNorm,
                 name: str = "ppo_lagrangian", stochastic: bool = False, seed: int = 0):
        self.actor, self.featurizer, self.norm_s, self.norm_a = actor, featurizer, norm_s, norm_a
        self.name, self.stochastic = name, stochastic
        self.rng = np.random.Generator(np.random.PCG64(seed))

    def logits(self, obs: dict) -> np.ndarray:
        s, a = self.featurizer(obs)
        with torch.no_grad():
            return self.actor(torch.as_tensor(self.norm_s(s[None])), torch.as_tensor(self.norm_a(a)[None])).numpy()[0]

    def act(self, obs: dict) -> tuple[int, int]:
        z = self.logits(obs)
        if self.stochastic:
            p = np.exp(z - z.max())
            a = int(self.rng.choice(len(z), p=p / p.sum()))
        else:
            a = int(np.argmax(z))
        return divmod(a, len(STRATEGY_NAMES))

    def state_dict(self) -> dict:
        return {"actor": self.actor.state_dict(), "quality": self.featurizer.quality.reshape(self.featurizer.num_models, -1),
                "norm_s": (self.norm_s.mean, self.norm_s.var, self.norm_s.count),
                "norm_a": (self.norm_a.mean, self.norm_a.var, self.norm_a.count), "hidden": self.actor.state[0].out_features}

    @classmethod
    def from_state(cls, state: dict, name: str = "ppo_lagrangian") -> PPOLagPolicy:
        fz = Featurizer(np.asarray(state["quality"]))
        nm = fz.num_models
        actor = Actor(state_dim(nm), action_dim(nm), int(state["hidden"]), torch.Generator().manual_seed(0))
        actor.load_state_dict(state["actor"])
        ns, na = RunningNorm(state_dim(nm)), RunningNorm(action_dim(nm))
        (ns.mean, ns.var, ns.count), (na.mean, na.var, na.count) = state["norm_s"], state["norm_a"]
        return cls(actor, fz, ns, na, name=name)


def _gae(rew: np.ndarray, val: np.ndarray, done: np.ndarray, last_val: float, gamma: float, lam: float):
    adv = np.zeros_like(rew)
    nxt, run = last_val, 0.0
    for t in range(len(rew) - 1, -1, -1):
        nonterm = 1.0 - done[t]
        delta = rew[t] + gamma * nxt * nonterm - val[t]
        run = delta + gamma * lam * nonterm * run
        adv[t] = run
        nxt = val[t]
    return adv, adv + val


def _standardise(a: np.ndarray) -> np.ndarray:
    return (a - a.mean()) / (a.std() + 1e-8)


def train_ppo_lagrangian(env, args: PPOLagArgs = PPOLagArgs(), *, progress: Callable[[int], None] | None = None,
                         log: Callable[[dict], None] | None = None) -> tuple[PPOLagPolicy, list[dict]]:
    """Train on ``env`` (an unwrapped ``MASLatencyCMDPEnv``); returns the greedy policy and per-epoch metrics."""
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([args.seed, 17])))
    nm, ns = len(env.models), len(STRATEGY_NAMES)
    fz = Featurizer(quality_table(env.task, env.models))
    ds, da, na = state_dim(nm), action_dim(nm), nm * ns
    nets = _Nets(ds, da, args.hidden, gen)
    opt = torch.optim.Adam(nets.parameters(), lr=args.lr, eps=1e-5)
    lag = make_lagrange(args.lagrangian, args.cost_limit,
                        **({"init": args.lambda_init, "lr": args.lambda_lr} if args.lagrangian == "gradient" else
                           {"kp": args.pid_kp, "ki": args.pid_ki, "kd": args.pid_kd}))
    norm_s, norm_a = RunningNorm(ds), RunningNorm(da)
    cost_fn = COSTS[args.cost]
    T = args.steps_per_epoch
    epochs = args.total_steps // T
    cf = args.reward == "counterfactual"
    if cf:
        env.counterfactual_quality = True                      # info["quality_by_action"] at episode ends
    obs, _ = env.reset(seed=args.seed)
    history: list[dict] = []
    t_sim = t_learn = 0.0
    ep_ret = ep_cost = 0.0
    for epoch in range(epochs):
        # ---------------------------------------------------------------- rollout
        t0 = time.perf_counter()
        S = np.zeros((T, ds), np.float32)
        AF = np.zeros((T, na, da), np.float32)
        A = np.zeros(T, np.int64)
        LP, VR, VC, R, C, D = (np.zeros(T) for _ in range(6))
        PI, QA = np.zeros((T, na)), np.full((T, na), np.nan)
        NODE = np.zeros(T, np.int64)
        ep_steps: list[int] = []                               # this episode's rows of this rollout
        finished = []
        for t in range(T):
            S[t], AF[t] = fz(obs)
            with torch.no_grad():
                st = torch.as_tensor(norm_s(S[t][None]))
                logits = nets.actor(st, torch.as_tensor(norm_a(AF[t])[None]))[0].numpy()
                VR[t] = float(nets.reward_critic(st)[0, 0])
                VC[t] = float(nets.cost_critic(st)[0, 0])
            p = np.exp(logits - logits.max())
            p /= p.sum()
            a = int(rng.choice(na, p=p))
            A[t], LP[t] = a, float(np.log(p[a] + 1e-12))
            PI[t], NODE[t] = p, int(obs["step"])
            ep_steps.append(t)
            obs, r, term, trunc, info = env.step(env.encode_action(*divmod(a, ns)))
            done = term or trunc
            if term and args.reward == "expected":
                r = info["quality_expected"]
            c = cost_fn(info, done)
            R[t], C[t], D[t] = r, c, float(done)
            ep_ret += r
            ep_cost += c
            if done:
                if cf:
                    QA[ep_steps] = info["quality_by_action"][NODE[ep_steps]]
                ep_steps = []
                finished.append((ep_ret, ep_cost, info["slo_violated"], info["latency_s"] / info["slo_s"],
                                 info["quality"]))
                ep_ret = ep_cost = 0.0
                obs, _ = env.reset()
            if progress is not None:
                progress(1)
        with torch.no_grad():
            st = torch.as_tensor(norm_s(fz(obs)[0][None]))
            last_r, last_c = float(nets.reward_critic(st)[0, 0]), float(nets.cost_critic(st)[0, 0])
        t_sim += time.perf_counter() - t0
        # ---------------------------------------------------------------- multiplier, then policy
        t0 = time.perf_counter()
        jc = float(np.mean([f[1] for f in finished])) if finished else float(C.sum())
        lam = lag.update(jc)
        adv_r, ret_r = _gae(R, VR, D, last_r, args.gamma, args.gae_lambda)
        if cf:       # rows of an episode still running at the end of the rollout get no reward credit
            known = ~np.isnan(QA[:, 0])
            adv_r = np.zeros(T)
            adv_r[known] = QA[known, A[known]] - (PI[known] * QA[known]).sum(1)
        adv_c, ret_c = _gae(C, VC, D, last_c, args.gamma, args.gae_lambda)
        if args.adv_norm == "separate":
            adv = (_standardise(adv_r) - lam * _standardise(adv_c)) / (1.0 + lam)
        else:
            adv = _standardise(adv_r - lam * adv_c)
        norm_s.update(S)
        norm_a.update(AF.reshape(-1, da))
        Sn, AFn = torch.as_tensor(norm_s(S)), torch.as_tensor(norm_a(AF.reshape(-1, da)).reshape(T, na, da))
        At, LPt = torch.as_tensor(A), torch.as_tensor(LP, dtype=torch.float32)
        ADV = torch.as_tensor(adv, dtype=torch.float32)
        RR, RC = torch.as_tensor(ret_r, dtype=torch.float32), torch.as_tensor(ret_c, dtype=torch.float32)
        for g in opt.param_groups:
            g["lr"] = args.lr * (1.0 - epoch / epochs)
        stats = []
        for _ in range(args.update_iters):
            perm = torch.randperm(T, generator=gen)
            for i in range(0, T, args.minibatch):
                b = perm[i:i + args.minibatch]
                logp_all = torch.log_softmax(nets.actor(Sn[b], AFn[b]), -1)
                logp = logp_all.gather(1, At[b, None])[:, 0]
                ratio = torch.exp(logp - LPt[b])
                pg = -torch.min(ratio * ADV[b], torch.clamp(ratio, 1 - args.clip, 1 + args.clip) * ADV[b]).mean()
                ent = -(logp_all.exp() * logp_all).sum(-1).mean()
                vr = ((nets.reward_critic(Sn[b])[:, 0] - RR[b]) ** 2).mean()
                vc = ((nets.cost_critic(Sn[b])[:, 0] - RC[b]) ** 2).mean()
                loss = pg - args.entropy_coef * ent + 0.5 * (vr + vc)
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(nets.parameters(), 40.0)
                opt.step()
                stats.append((pg.item(), vr.item(), vc.item(), ent.item()))
        t_learn += time.perf_counter() - t0
        row = _epoch_row(epoch, T, finished, jc, lam, args, C, np.mean(stats, axis=0), t_sim, t_learn)
        history.append(row)
        if log is not None:
            log(row)
    policy = PPOLagPolicy(nets.actor, fz, norm_s, norm_a)
    policy.args = asdict(args)
    return policy, history


def _epoch_row(epoch, T, finished, jc, lam, args, C, st, t_sim, t_learn) -> dict:
    def mean(i):
        return float(np.mean([f[i] for f in finished])) if finished else float("nan")

    return {"epoch": epoch, "steps": (epoch + 1) * T, "episodes": len(finished), "train/return": mean(0),
            "train/quality": mean(4), "constraint/episode_cost": jc, "constraint/lambda": lam,
            "constraint/cost_limit": args.cost_limit, "constraint/cost_rate": float(C.sum() / T),
            "latency/slo_attainment": 1.0 - mean(2) if finished else float("nan"),
            "latency/over_slo_p95": float(np.percentile([f[3] for f in finished], 95)) if finished else float("nan"),
            "losses/policy": float(st[0]), "losses/reward_value": float(st[1]), "losses/cost_value": float(st[2]),
            "losses/entropy": float(st[3]), "time/simulate_s": t_sim, "time/learn_s": t_learn}
