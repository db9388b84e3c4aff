"""PPO-Lagrangian's networks and trained policy: an action-in categorical actor, reward and cost critics.

The actor scores each of the ``M x 3`` (model, strategy) actions with one shared scorer over ``[g(state),
features(action)]`` (``agents.cmdp_policies.Featurizer``), so a new model or strategy is one more row, not
one more output unit. Layers are orthogonally initialised as in CleanRL's ``layer_init`` (gain sqrt(2), 0.01
for the actor's output, 1 for the critics'), from an explicit ``torch.Generator`` so a seed fixes them.
Observations are standardised online by ``RunningNorm`` and frozen with the policy.
"""

from __future__ import annotations

import numpy as np
import torch

from envs.cmdp_catalog import STRATEGY_NAMES

from .cmdp_policies import Featurizer, action_dim, state_dim

__all__ = ["Actor", "ActorCritics", "NumpyActorCritics", "PPOLagPolicy", "RunningNorm"]

#: standardised observations are clipped to +-10 (OmniSafe's ``obs_normalize`` clip, SB3's ``clip_obs``)
OBS_CLIP = 10.0


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
        return np.clip((x - self.mean) / np.sqrt(self.var + 1e-8), -OBS_CLIP, OBS_CLIP).astype(np.float32)


def _orthogonal(lin: torch.nn.Linear, gain: float, gen: torch.Generator) -> None:
    """Orthogonal init (CleanRL's ``layer_init``) from an explicit generator."""
    w = lin.weight
    q, r = torch.linalg.qr(torch.randn(max(w.shape), min(w.shape), generator=gen))
    q = q * torch.sign(torch.diagonal(r))
    with torch.no_grad():
        w.copy_(gain * (q if q.shape == w.shape else q.T))
        lin.bias.zero_()


def _mlp(n_in: int, n_out: int, hidden: int, gen: torch.Generator, out_gain: float) -> torch.nn.Sequential:
    """Two tanh layers of ``hidden`` units and a linear output (CleanRL's actor and critic shape)."""
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


class ActorCritics(torch.nn.Module):
    """The actor, the reward critic V_r and the cost critic V_c (separate networks, OmniSafe's layout),
    initialised in that order from ``gen``."""

    def __init__(self, ds: int, da: int, hidden: int, gen: torch.Generator):
        super().__init__()
        self.actor = Actor(ds, da, hidden, gen)
        self.reward_critic = _mlp(ds, 1, hidden, gen, 1.0)
        self.cost_critic = _mlp(ds, 1, hidden, gen, 1.0)


def _layers(seq: torch.nn.Sequential) -> list[tuple[np.ndarray, np.ndarray]]:
    """(W^T, b) of each ``Linear`` of ``seq`` as float32 numpy arrays (copies: the nets train on)."""
    return [(m.weight.detach().numpy().T.copy(), m.bias.detach().numpy().copy())
            for m in seq if isinstance(m, torch.nn.Linear)]


def _mlp_np(layers: list[tuple[np.ndarray, np.ndarray]], x: np.ndarray) -> np.ndarray:
    """The ``_mlp`` shape (tanh between linear layers, none after the last) in numpy."""
    for i, (wt, b) in enumerate(layers):
        x = x @ wt + b
        if i < len(layers) - 1:
            x = np.tanh(x)
    return x


class NumpyActorCritics:
    """A frozen numpy copy of ``ActorCritics`` for one observation at a time (the rollout's forward pass).

    Same layers and float32 maths as the torch modules; for a batch of one, torch's per-call dispatch costs
    ~10x the arithmetic, so the rollout samples from this copy (taken after each update) and the update runs
    in torch. Results agree with torch's to float32 rounding, not to the bit (different GEMM kernels)."""

    def __init__(self, nets: ActorCritics):
        (self.ws, self.bs), = _layers(nets.actor.state)
        self.score, self.reward, self.cost = (_layers(nets.actor.score), _layers(nets.reward_critic),
                                              _layers(nets.cost_critic))

    def __call__(self, state: np.ndarray, actions: np.ndarray) -> tuple[np.ndarray, float, float]:
        """``state`` (ds,) and ``actions`` (A, da), normalised: (logits (A,), V_r, V_c)."""
        h = np.tanh(state @ self.ws + self.bs)
        x = np.concatenate([np.broadcast_to(h, (len(actions), len(h))), actions], 1)
        logits = _mlp_np(self.score, x)[:, 0]
        return logits, float(_mlp_np(self.reward, state)[0]), float(_mlp_np(self.cost, state)[0])


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
