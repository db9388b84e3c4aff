"""The MasRouter-style baseline: a load-blind router trained on quality minus price
(docs/system_aware.md#5-masrouter-baseline).

MasRouter (``MAR/MasRouter/mas_router.py``, ACL 2025) embeds the query and text descriptions of the LLMs
(name, price, benchmark scores) with all-MiniLM-L6-v2 and routes by a cosine softmax between them. Here,
through the same environment as every other policy, it picks each call's model *and* prompt strategy from
semantics only: the query embedding and the call's role. It never sees queues, KV usage, TTFT or the
budget::

    q      = normalise(W_q [query ; one-hot role])              (32-d)
    m_j    = normalise(W_m e(model_j description))             e(): frozen 384-d text embedding
    s_k    = normalise(W_s e(strategy_k description))
    p(m)   = softmax_j(q . m_j / tau),   p(s) = softmax_k(q . s_k / tau),   tau = 0.8

Trained the MasRouter way: per query the utility ``is_solved - cost_rate * $`` (cost_rate per benchmark from
MasRouter's code: GSM8K 200, HumanEval 200, MATH 100, MBPP 400), loss ``-log pi(actions | query) * utility``
with **no baseline**, Adam lr 0.01, batches of 16 queries, 5 epochs over the train split. Its utility has no
latency in it, so it trains on the idle regime (where it is cheapest to simulate) and is evaluated
everywhere; at evaluation it takes the most likely action.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from envs.cmdp import MASROUTER_COST_RATE
from envs.cmdp_catalog import ROLE_NAMES, STRATEGIES, STRATEGY_NAMES, model_accuracy
from envs.embeddings import operator_embedding

__all__ = ["MasRouterArgs", "MasRouterPolicy", "train_masrouter"]


@dataclass(frozen=True, slots=True, kw_only=True)
class MasRouterArgs:
    """Attributes:
        epochs: passes over the train split (MasRouter: 5-10).
        batch_size: queries per Adam step (MasRouter: 16).
        lr: Adam learning rate (MasRouter: 0.01).
        temperature: cosine-softmax temperature.
        cost_rate: $ weight in the utility (default: MasRouter's for the task).
        seed: initialisation and sampling.
    """

    epochs: int = 5
    batch_size: int = 16
    lr: float = 0.01
    temperature: float = 0.8
    cost_rate: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0 or not self.temperature > 0:
            raise ValueError("epochs and batch_size must be >= 1, lr and temperature > 0")


def model_description(env, i: int) -> str:
    m = env.models[i]
    return (f"{m.name}: an open large language model served by vLLM; price ${m.price_usd_per_token * 1e6:.2f} per "
            f"million tokens; {env.task.name} accuracy {100 * model_accuracy(env.task, m.name):.1f}%.")


class _Router(torch.nn.Module):
    def __init__(self, model_emb: np.ndarray, strat_emb: np.ndarray, hidden: int, temperature: float,
                 gen: torch.Generator):
        super().__init__()
        self.register_buffer("models", torch.tensor(model_emb, dtype=torch.float32))
        self.register_buffer("strategies", torch.tensor(strat_emb, dtype=torch.float32))
        d = model_emb.shape[1]
        self.q = torch.nn.Linear(d + len(ROLE_NAMES), hidden)
        self.m = torch.nn.Linear(d, hidden)
        self.s = torch.nn.Linear(d, hidden)
        self.temperature = temperature
        with torch.no_grad():
            for lin in (self.q, self.m, self.s):
                bound = 1.0 / np.sqrt(lin.in_features)
                lin.weight.uniform_(-bound, bound, generator=gen)
                lin.bias.uniform_(-bound, bound, generator=gen)

    def forward(self, query: torch.Tensor, role: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probabilities over models (B, M) and strategies (B, 3)."""
        q = F.normalize(self.q(torch.cat([query, F.one_hot(role, len(ROLE_NAMES)).float()], -1)), dim=-1)
        m = F.normalize(self.m(self.models), dim=-1)
        s = F.normalize(self.s(self.strategies), dim=-1)
        return (torch.log_softmax(q @ m.T / self.temperature, -1), torch.log_softmax(q @ s.T / self.temperature, -1))


class MasRouterPolicy:
    name = "masrouter"

    def __init__(self, router: _Router, stochastic: bool = False, seed: int = 0):
        self.router, self.stochastic = router, stochastic
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.trace: list[tuple[np.ndarray, int, int, int]] = []

    def act(self, obs: dict) -> tuple[int, int]:
        with torch.no_grad():
            lm, ls = self.router(torch.as_tensor(obs["query"][None]), torch.as_tensor([int(obs["role"])]))
        pm, ps = lm[0].exp().numpy(), ls[0].exp().numpy()
        if self.stochastic:
            m = int(self.rng.choice(len(pm), p=pm / pm.sum()))
            s = int(self.rng.choice(len(ps), p=ps / ps.sum()))
        else:
            m, s = int(np.argmax(pm)), int(np.argmax(ps))
        self.trace.append((obs["query"].copy(), int(obs["role"]), m, s))
        return m, s

    def state_dict(self) -> dict:
        return {"router": self.router.state_dict(), "temperature": self.router.temperature}

    @classmethod
    def from_state(cls, state: dict) -> MasRouterPolicy:
        sd = state["router"]
        router = _Router(sd["models"].numpy(), sd["strategies"].numpy(), sd["q.weight"].shape[0], state["temperature"],
                         torch.Generator().manual_seed(0))
        router.load_state_dict(sd)
        return cls(router)


def make_router(env, args: MasRouterArgs) -> _Router:
    gen = torch.Generator().manual_seed(args.seed)
    me = np.stack([operator_embedding(model_description(env, i)) for i in range(len(env.models))])
    se = np.stack([operator_embedding(f"{n}: {STRATEGIES[n]}") for n in STRATEGY_NAMES])
    return _Router(me, se, 32, args.temperature, gen)


def train_masrouter(env, args: MasRouterArgs = MasRouterArgs(), *, progress: Callable[[int], None] | None = None
                    ) -> tuple[MasRouterPolicy, list[dict]]:
    """REINFORCE without baseline on ``is_solved - cost_rate * $`` over ``env``'s split (module docstring)."""
    torch.manual_seed(args.seed)
    router = make_router(env, args)
    opt = torch.optim.Adam(router.parameters(), lr=args.lr)
    rate = args.cost_rate if args.cost_rate is not None else MASROUTER_COST_RATE.get(env.task.name, 200.0)
    pol = MasRouterPolicy(router, stochastic=True, seed=args.seed)
    n = len(env.queries)
    order_rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([args.seed, 5])))
    env.reset(seed=args.seed, options={"query": 0})
    history = []
    for epoch in range(args.epochs):
        order = order_rng.permutation(n)
        for i in range(0, n, args.batch_size):
            batch = []
            for q in order[i:i + args.batch_size]:
                pol.trace = []
                obs, _ = env.reset(options={"query": int(q)})
                while True:
                    obs, _, term, _, info = env.step(env.encode_action(*pol.act(obs)))
                    if term:
                        break
                batch.append((list(pol.trace), info["quality"] - rate * info["cost_usd"], info))
                if progress is not None:
                    progress(1)
            loss = torch.zeros(())
            for trace, u, _ in batch:
                qs = torch.as_tensor(np.stack([t[0] for t in trace]))
                lm, ls = router(qs, torch.as_tensor([t[1] for t in trace]))
                lp = lm.gather(1, torch.as_tensor([[t[2]] for t in trace]))[:, 0].sum() + \
                    ls.gather(1, torch.as_tensor([[t[3]] for t in trace]))[:, 0].sum()
                loss = loss - lp * u
            loss = loss / len(batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            history.append({"epoch": epoch, "train/utility": float(np.mean([b[1] for b in batch])),
                            "train/quality": float(np.mean([b[2]["quality"] for b in batch])),
                            "train/cost_usd": float(np.mean([b[2]["cost_usd"] for b in batch])), "losses/loss": loss.item()})
    out = MasRouterPolicy(router, stochastic=False)
    out.args = {**asdict(args), "cost_rate": rate}
    return out, history
