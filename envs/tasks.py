"""Task models: stand-ins for GSM8K, MATH, HumanEval and MBPP answered by gpt-4o-mini.

A task model is a frozen ``TaskSpec`` (published facts, each with its source) plus pure functions of it:

* ``calibrate(spec)`` solves the latent-difficulty model so that it reproduces the published single-call and
  self-consistency accuracies (nothing else is fitted);
* ``make_queries(spec, split, dataset_seed)`` draws a fixed benchmark instance: per query a latent
  difficulty, a 384-d embedding carrying noisy information about it, and a prompt length.

The correctness model (item-response style)::

    d_q ~ Normal(0, spread)                       latent difficulty of query q
    P(a fresh attempt of mode m is right) = sigmoid(theta_m - d_q)     m in {io, cot, pot}

``theta_m`` is set so that the mean over queries equals the published single-call accuracy of mode m, and
``spread`` so that a plurality vote over five CoT attempts reproduces the published SC(CoT x 5) accuracy:
the gain of self-consistency over one call measures how much attempts on the same query are correlated.
How operators turn attempts into answers (votes, refinement, tests) is in ``envs.operators``.

Extension point (issue 5): ``success_prob(spec, cal, d, mode, capability_logit=0.0)`` takes an additive
model-capability term on the logit scale, and ``envs.operators.completion_mean_tokens`` a length
multiplier, so a (model, strategy) router can reuse queries, embeddings, lengths and quality.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .embeddings import EMBED_DIM, query_embeddings

__all__ = ["TASKS", "Calibration", "QuerySet", "TaskSpec", "calibrate", "make_queries", "make_task", "sigmoid",
           "success_prob", "vote_accuracy"]

SPLITS = ("train", "test")


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskSpec:
    """One benchmark as gpt-4o-mini sees it. Accuracies are fractions in (0, 1)."""

    name: str
    kind: str                       # "math" or "code": decides the operator set and the fixed graph steps
    num_train: int
    num_test: int
    acc_io: float                   # one plain call (Generate)
    acc_cot: float                  # one chain-of-thought call (GenerateCoT)
    acc_sc5: float                  # plurality vote over five CoT calls, SC(CoT x 5)
    acc_self_refine: float          # a CoT answer refined by the model itself
    acc_pot: float                  # one program-of-thought attempt (Programmer), math only
    cot_is_generate: bool = False   # GenerateCoT runs Generate's prompt (MaAS/LAMaS HumanEval)
    query_tokens_mean: float        # prompt length of the problem text itself
    query_tokens_sigma: float = 0.35
    difficulty_info: float = 0.6    # correlation of the embedding's difficulty coordinate with d_q
    length_difficulty: float = 0.15  # log-length slope per unit of standardised difficulty
    sources: dict[str, str] = field(default_factory=dict, hash=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in ("math", "code"):
            raise ValueError(f"task {self.name!r}: kind must be 'math' or 'code', got {self.kind!r}")
        for f in ("acc_io", "acc_cot", "acc_sc5", "acc_self_refine", "acc_pot"):
            v = getattr(self, f)
            if not 0.0 < v < 1.0:
                raise ValueError(f"task {self.name!r}: {f} must be a fraction in (0, 1), got {v!r}")
        if self.acc_sc5 < self.acc_cot:
            raise ValueError(f"task {self.name!r}: acc_sc5 must be >= acc_cot (the vote gain calibrates the "
                             f"difficulty spread), got {self.acc_sc5} < {self.acc_cot}")
        if self.num_train < 1 or self.num_test < 1:
            raise ValueError(f"task {self.name!r}: num_train and num_test must be >= 1")
        if not 0.0 <= self.difficulty_info <= 1.0:
            raise ValueError(f"task {self.name!r}: difficulty_info must be in [0, 1]")
        if self.query_tokens_mean < 1:
            raise ValueError(f"task {self.name!r}: query_tokens_mean must be >= 1")

    def size(self, split: str) -> int:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return self.num_train if split == "train" else self.num_test


# Accuracies of gpt-4o-mini on the AFlow/MaAS splits (the data LAMaS and MaAS use), AFlow Table 1
# (Zhang et al., "AFlow: Automating Agentic Workflow Generation", ICLR 2025, arXiv 2410.10762):
# IO, CoT, CoT SC (5) and Self Refine columns. MATH is the level-5 subset of four categories used there.
_AFLOW = "AFlow (arXiv 2410.10762) Table 1, gpt-4o-mini executor"
_POT = ("no published gpt-4o-mini program-of-thought accuracy on this split was found; taken equal to CoT "
        "(an assumption, not a fit)")
_SPLIT = "docs/lamas.md#6-protocol (logged train-score granularity and test totals)"

TASKS: dict[str, Callable[[], TaskSpec]] = {
    "gsm8k": lambda: TaskSpec(
        name="gsm8k", kind="math", num_train=264, num_test=1055, acc_io=0.927, acc_cot=0.924, acc_sc5=0.927,
        acc_self_refine=0.896, acc_pot=0.924, query_tokens_mean=75.0,
        sources={"acc_*": _AFLOW, "acc_pot": _POT, "num_*": _SPLIT,
                 "query_tokens_mean": "GSM8K questions average ~46 words (Cobbe et al. 2021) ~ 60-75 tokens"}),
    "math": lambda: TaskSpec(
        name="math", kind="math", num_train=119, num_test=486, acc_io=0.486, acc_cot=0.488, acc_sc5=0.504,
        acc_self_refine=0.461, acc_pot=0.488, query_tokens_mean=110.0,
        sources={"acc_*": _AFLOW, "acc_pot": _POT, "num_*": _SPLIT,
                 "query_tokens_mean": "MATH level-5 problem statements, ~80-150 tokens (Hendrycks et al. 2021)"}),
    "humaneval": lambda: TaskSpec(
        name="humaneval", kind="code", num_train=33, num_test=131, acc_io=0.870, acc_cot=0.886, acc_sc5=0.916,
        acc_self_refine=0.878, acc_pot=0.870, cot_is_generate=True, query_tokens_mean=135.0,
        sources={"acc_*": _AFLOW, "num_*": "1:4 of 164 (docs/lamas.md#6-protocol, not confirmed)",
                 "cot_is_generate": "docs/lamas.md#1-operators: in MaAS HumanEval GenerateCoT is identical "
                                    "to Generate",
                 "query_tokens_mean": "HumanEval prompts (signature + docstring) average ~450 characters"}),
    "mbpp": lambda: TaskSpec(
        name="mbpp", kind="code", num_train=86, num_test=341, acc_io=0.718, acc_cot=0.718, acc_sc5=0.736,
        acc_self_refine=0.698, acc_pot=0.718, cot_is_generate=True, query_tokens_mean=110.0,
        sources={"acc_*": _AFLOW, "num_*": "1:4 split of the 427 sanitized MBPP problems (MaAS protocol)",
                 "query_tokens_mean": "MBPP text + three asserts, ~80-140 tokens"}),
}


def make_task(name: str) -> TaskSpec:
    try:
        return TASKS[name]()
    except KeyError:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}") from None


# ------------------------------------------------------------------------------------------ calibration
# Wrong answers: with probability WRONG_SHARED a wrong attempt gives the query's most common wrong answer,
# otherwise an answer no other attempt gives. An assumption (no per-answer data for gpt-4o-mini); it only
# shapes how votes behave, the vote accuracy itself is calibrated.
WRONG_SHARED = 0.5

# E[f(Z)], Z ~ N(0, 1), on a dense grid: with a wide spread the success probability is nearly a step
# function of z, which Gauss-Hermite nodes would miss.
_GH_X = np.linspace(-8.0, 8.0, 8001)
_GH_W = np.exp(-0.5 * _GH_X**2)
_GH_W = _GH_W / _GH_W.sum()


def sigmoid(x):
    from scipy.special import expit

    return expit(x)


def vote_accuracy(p: np.ndarray, n: int, wrong_shared: float = WRONG_SHARED) -> np.ndarray:
    """P(a plurality vote over ``n`` attempts is right) when each is right with probability ``p``.

    Wrong attempts agree on one shared wrong answer with probability ``wrong_shared``, otherwise are unique.
    Ties are broken uniformly at random, as an LLM picking "the most consistent" letter would on average.
    """
    from math import comb

    p = np.asarray(p, dtype=np.float64)
    q = 1.0 - p
    out = np.zeros_like(p)
    for c in range(1, n + 1):
        pc = comb(n, c) * p**c * q ** (n - c)
        for m in range(0, n - c + 1):
            pm = comb(n - c, m) * wrong_shared**m * (1.0 - wrong_shared) ** (n - c - m)
            u = n - c - m                                  # unique wrong answers, one vote each
            top = max(m, 1 if u else 0)
            if c < top:
                continue
            tied = 1 + (m == c) + (u if c == 1 else 0)
            win = 1.0 / tied
            out += pc * pm * win
    return out


@dataclass(frozen=True, slots=True)
class Calibration:
    """The solved latent model of one task: spread of d_q and one logit offset per attempt mode."""

    spread: float
    theta: dict[str, float]

    def mean_accuracy(self, mode: str) -> float:
        return float(np.dot(_GH_W, sigmoid(self.theta[mode] - self.spread * _GH_X)))


def _theta_for(acc: float, spread: float) -> float:
    from scipy.optimize import brentq

    b = 30.0 + 12.0 * spread
    return brentq(lambda t: float(np.dot(_GH_W, sigmoid(t - spread * _GH_X))) - acc, -b, b, xtol=1e-12)


@functools.lru_cache(maxsize=64)
def calibrate(spec: TaskSpec) -> Calibration:
    """Solve ``spread`` from the SC(CoT x 5) gain, then each ``theta`` from its single-call accuracy."""
    from scipy.optimize import brentq

    def sc_gap(spread: float) -> float:
        t = _theta_for(spec.acc_cot, spread)
        return float(np.dot(_GH_W, vote_accuracy(sigmoid(t - spread * _GH_X), 5))) - spec.acc_sc5

    lo, hi = 0.05, 200.0
    if sc_gap(hi) > 0:   # even fully polarised queries vote better than published: take the limit
        spread = hi
    elif sc_gap(lo) < 0:
        spread = lo
    else:
        spread = brentq(sc_gap, lo, hi, xtol=1e-9)
    theta = {m: _theta_for(getattr(spec, f"acc_{m}"), spread) for m in ("io", "cot", "pot")}
    if spec.cot_is_generate:
        theta["cot"] = theta["io"]
    return Calibration(spread=spread, theta=theta)


def success_prob(cal: Calibration, d: np.ndarray | float, mode: str, capability_logit: float = 0.0):
    """P(a fresh attempt of ``mode`` on difficulty ``d`` is right); ``capability_logit`` shifts the model."""
    return sigmoid(cal.theta[mode] + capability_logit - d)


# ------------------------------------------------------------------------------------------ queries
_SPLIT_ID = {"train": 1, "test": 2}
_TASK_ID = {"gsm8k": 11, "math": 12, "humaneval": 13, "mbpp": 14}


@dataclass(frozen=True, slots=True)
class QuerySet:
    """A fixed benchmark instance: arrays indexed by query number within the split."""

    task: str
    split: str
    difficulty: np.ndarray       # d_q (logit units)
    embedding: np.ndarray        # (n, 384) float32, unit norm
    prompt_tokens: np.ndarray    # problem text length, int64

    def __len__(self) -> int:
        return len(self.difficulty)


def task_key(name: str) -> int:
    return _TASK_ID.get(name, 10 + sum(name.encode()) % 1000)


@functools.lru_cache(maxsize=32)
def make_queries(spec: TaskSpec, split: str, dataset_seed: int = 0) -> QuerySet:
    """The queries of ``split``: the same ``dataset_seed`` always gives the same benchmark instance."""
    n = spec.size(split)
    cal = calibrate(spec)
    ss = np.random.SeedSequence([dataset_seed, task_key(spec.name), _SPLIT_ID[split]])
    rng_d, rng_e, rng_p = (np.random.Generator(np.random.PCG64(s)) for s in ss.spawn(3))
    # stratified normal scores (one per 1/n quantile band, shuffled): the instance's accuracy then matches
    # the published one up to the model, not up to the luck of a small sample
    from scipy.special import ndtri

    z = ndtri((rng_d.permutation(n) + rng_d.random(n)) / n)
    d = cal.spread * z
    emb = query_embeddings(spec.name, z, spec.difficulty_info, rng_e).astype(np.float32)
    mu = np.log(spec.query_tokens_mean) - spec.query_tokens_sigma**2 / 2
    toks = np.maximum(8, np.rint(rng_p.lognormal(mu, spec.query_tokens_sigma, n))).astype(np.int64)
    for a in (d, emb, toks):
        a.setflags(write=False)
    assert emb.shape == (n, EMBED_DIM)
    return QuerySet(spec.name, split, d, emb, toks)
