"""The world of ``MASLatency-CMDP-v0``: model pool, prompt strategies and agent roles, with their sources.

Quality model. The task models (``envs.tasks``) give every query a latent difficulty ``d_q`` and solve, per
task, a difficulty spread from gpt-4o-mini's published accuracies. A (model, strategy) pair is one more
attempt mode: its offset ``theta`` is solved (``tasks._theta_for``) so that the mean accuracy over the task's
queries equals a *target accuracy*, and an attempt on query q is right with ``sigmoid(theta - d_q)``. Targets::

    logit acc(m, rho) = logit acc_published(m) + gap(rho)

* ``acc_published(m)``: the model's published accuracy on the benchmark (Meta's Llama 3.1 model card;
  ``MODEL_ACCURACY``). MATH is transferred to the AFlow level-5 split the task model uses by the logit gap
  to gpt-4o-mini measured on the full MATH test set.
* ``gap(rho)``: the strategy's population logit gap against chain of thought, from Chain of Draft
  (arXiv 2502.18600, Table 1, GSM8K; mean of GPT-4o and Claude 3.5 Sonnet) for math tasks, and from AFlow's
  IO vs CoT accuracies (arXiv 2410.10762, gpt-4o-mini) for code, where the answer is the program itself.

Lengths. A role's DeepThink completion is its call kind's mean length in ``envs.operators.LENGTHS``; a
strategy keeps the *answer* part of it (``ANSWER_SHARE``) and a share of the reasoning: Flash none,
Concise 20 % (Chain of Draft cuts output tokens by ~80 %), DeepThink all.

Every number here is an assumption or a published fact with its source; none is fitted to the experiment.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np

import sim
from sim import catalog

from .operators import LENGTHS
from .tasks import TaskSpec, _theta_for, calibrate

__all__ = ["MODELS", "ROLES", "ROLE_NAMES", "STRATEGIES", "STRATEGY_NAMES", "ModelEntry", "Role", "attempt_theta",
           "completion_split", "default_models", "model_accuracy", "role_lengths", "target_accuracy"]


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ------------------------------------------------------------------------------------------ models
_META = ("Meta Llama 3.1 model card (github.com/meta-llama/llama-models, models/llama3_1/MODEL_CARD.md), "
         "instruction-tuned models: GSM-8K 8-shot CoT, MATH 0-shot CoT, HumanEval 0-shot, MBPP EvalPlus base")
_TOGETHER = ("Together AI serverless launch prices for Llama 3.1 Turbo (2024-07): 8B $0.18, 70B $0.88 per million "
             "tokens, input and output alike; one provider for both models so the ratio is consistent")

#: published accuracy (fraction) per model and benchmark
MODEL_ACCURACY: dict[str, dict[str, float]] = {
    "llama-3.1-8b": {"gsm8k": 0.845, "math_full": 0.519, "humaneval": 0.726, "mbpp": 0.728},
    "llama-3.1-70b": {"gsm8k": 0.951, "math_full": 0.680, "humaneval": 0.805, "mbpp": 0.860},
}
#: gpt-4o-mini on the full MATH test set, to transfer MATH accuracies to the AFlow level-5 split
GPT4O_MINI_MATH_FULL = (0.702, "OpenAI, 'GPT-4o mini: advancing cost-efficient intelligence' (2024-07-18)")


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelEntry:
    """One model of the pool: its simulated serving profile, replicas and price.

    The model's *shape* is not restated here: ``model_id`` names the project's one catalogue entry
    (``sim.catalog``, ``sim/data/models.json``), and ``catalogue_entry`` / ``check_profile`` tie the serving
    profile to it. What this pool entry adds is published accuracy (``MODEL_ACCURACY``) and price.

    Attributes:
        model_id: the catalogue id (Hugging Face id) of the served model; ``None`` = the profile's
            ``model.name``.
    """

    name: str
    profile: str
    replicas: int = 2
    price_usd_per_token: float
    model_id: str | None = None
    sources: dict[str, str] = field(default_factory=dict, hash=False, compare=False)

    def __post_init__(self) -> None:
        if self.name not in MODEL_ACCURACY:
            raise ValueError(f"model {self.name!r} has no published accuracies; known: {sorted(MODEL_ACCURACY)} "
                             f"(add its row to envs.cmdp_catalog.MODEL_ACCURACY with a source)")
        if not isinstance(self.replicas, int) or self.replicas < 1:
            raise ValueError(f"model {self.name!r}: replicas must be an integer >= 1, got {self.replicas!r}")
        if not self.price_usd_per_token >= 0:
            raise ValueError(f"model {self.name!r}: price_usd_per_token must be >= 0")

    def catalogue_entry(self, profile: sim.Profile | None = None) -> catalog.ModelEntry:
        """The catalogue entry of the served model (read on use, never at import)."""
        model_id = self.model_id or (profile or sim.load_profile(self.profile)).model.name
        entry = catalog.find_model(model_id)
        if entry is None:
            raise ValueError(f"model {self.name!r}: {model_id!r} is not in the catalogue {sorted(catalog.models())} "
                             "(add it to sim/data/models.json with its config.json source, or set model_id)")
        return entry

    def check_profile(self, profile: sim.Profile) -> None:
        """Raise when the serving profile's model shape differs from the catalogue's (one list of shapes)."""
        spec = self.catalogue_entry(profile).spec
        keys = ("num_layers", "hidden_size", "num_q_heads", "num_kv_heads", "head_dim", "num_experts",
                "num_experts_per_tok", "kv_latent_dim")
        diff = {k: (getattr(profile.model, k), getattr(spec, k)) for k in keys
                if getattr(profile.model, k) != getattr(spec, k)}
        if profile.model.num_params != spec.num_params:
            diff["num_params"] = (profile.model.num_params, spec.num_params)
        if diff:
            raise ValueError(f"model {self.name!r}: profile {self.profile!r} serves a model whose shape differs from "
                             f"the catalogue entry {spec.name!r}: {diff} (profile value, catalogue value); fix the "
                             "profile or model_id")


def default_models(replicas: int = 2) -> tuple[ModelEntry, ...]:
    """Llama-3.1-8B on one H100 and Llama-3.1-70B on four (TP4), ``replicas`` of each."""
    return (
        ModelEntry(name="llama-3.1-8b", profile="h100-llama-3.1-8b", replicas=replicas, price_usd_per_token=0.18e-6,
                   model_id="meta-llama/Llama-3.1-8B", sources={"accuracy": _META, "price": _TOGETHER}),
        ModelEntry(name="llama-3.1-70b", profile="h100-llama-3.1-70b-tp4", replicas=replicas,
                   price_usd_per_token=0.88e-6, model_id="meta-llama/Llama-3.1-70B",
                   sources={"accuracy": _META, "price": _TOGETHER}),
    )


MODELS = default_models()


def model_accuracy(task: TaskSpec, model: str) -> float:
    """The model's accuracy on the task model's split (CoT for math, 0-shot code prompt for code)."""
    acc = MODEL_ACCURACY[model]
    if task.name == "math":   # AFlow's MATH is level 5: shift by the full-MATH logit gap to gpt-4o-mini
        return _sigmoid(_logit(task.acc_cot) + _logit(acc["math_full"]) - _logit(GPT4O_MINI_MATH_FULL[0]))
    if task.name not in acc:
        raise ValueError(f"no published accuracy of {model!r} on {task.name!r}")
    return acc[task.name]


# ------------------------------------------------------------------------------------------ strategies
#: instruction appended to the agent's prompt (docs/system_aware.md#2-hierarchy;
#: the Chain of Draft prompts of docs/system_aware.md#8-strategy-lengths)
STRATEGIES: dict[str, str] = {
    "Flash": "Answer directly, with no preamble, explanation or reasoning. Give the final answer after ####.",
    "Concise": "Think step by step, but keep only a minimum draft of each step, at most five words per step. "
               "Give the final answer after ####.",
    "DeepThink": "Think step by step. Give the final answer after ####.",
}
STRATEGY_NAMES = tuple(STRATEGIES)
#: tokens the instruction adds to the prompt (Llama-3 tokenizer, ~1.3 tokens per word)
STRATEGY_PROMPT_TOKENS = {"Flash": 22, "Concise": 30, "DeepThink": 13}

_COD = "Chain of Draft (arXiv 2502.18600) Table 1, GSM8K: mean of the GPT-4o and Claude 3.5 Sonnet logit gaps to CoT"
_MATH_GAP = {
    "Flash": 0.5 * ((_logit(0.533) - _logit(0.954)) + (_logit(0.646) - _logit(0.958))),
    "Concise": 0.5 * ((_logit(0.911) - _logit(0.954)) + (_logit(0.914) - _logit(0.958))),
    "DeepThink": 0.0,
}
#: share of reasoning tokens a strategy keeps (CoD: ~80 % fewer output tokens; Flash answers only)
REASONING_KEPT = {"Flash": 0.0, "Concise": 0.2, "DeepThink": 1.0}


def strategy_gap(task: TaskSpec, strategy: str) -> float:
    """Population logit gap of ``strategy`` against chain of thought on ``task``."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {STRATEGY_NAMES}")
    if task.kind == "math":
        return _MATH_GAP[strategy]
    # code: a direct program (Flash) vs a reasoned one (DeepThink), AFlow IO vs CoT; Concise halfway
    full = _logit(task.acc_io) - _logit(task.acc_cot)
    return {"Flash": full, "Concise": 0.5 * full, "DeepThink": 0.0}[strategy]


def target_accuracy(task: TaskSpec, model: str, strategy: str) -> float:
    """Mean accuracy of one attempt of ``model`` with ``strategy`` on the task (see the module docstring)."""
    base = model_accuracy(task, model)
    if task.kind == "code":   # the published code numbers are direct (Flash-like) prompts
        base = _sigmoid(_logit(base) - strategy_gap(task, "Flash"))
    return _sigmoid(_logit(base) + strategy_gap(task, strategy))


@functools.lru_cache(maxsize=256)
def attempt_theta(task: TaskSpec, model: str, strategy: str) -> float:
    """Offset of the (model, strategy) attempt mode: mean_q sigmoid(theta - d_q) = target accuracy."""
    return _theta_for(target_accuracy(task, model, strategy), calibrate(task).spread)


# ------------------------------------------------------------------------------------------ roles
@dataclass(frozen=True, slots=True)
class Role:
    """An agent role: what the node does with its inputs and which call kind sets its lengths.

    ``function``: ``solve`` (a fresh attempt), ``refine`` (revise the plurality of its inputs), ``decide``
    (vote over its inputs, then revise), ``plan`` (decompose the task: context only, no answer).
    """

    name: str
    function: str
    call_kind: str | None          # a key of LENGTHS[task]; None for the planner's own lengths
    description: str


#: MasRouter's role pools (MAR/Roles) reduced to what changes latency and answers here
ROLES: dict[str, Role] = {r.name: r for r in (
    Role("MathSolver", "solve", "cot", "Solves the math problem step by step."),
    Role("MathAnalyst", "solve", "cot", "Analyses the problem and derives the answer."),
    Role("Inspector", "refine", "refine", "Checks the solutions in hand and corrects errors."),
    Role("ProgrammingExpert", "solve", "generate", "Writes a complete Python function for the task."),
    Role("AlgorithmDesigner", "solve", "generate", "Designs the algorithm and writes its code."),
    Role("TestAnalyst", "refine", "reflect", "Reviews the code against the tests and repairs it."),
    Role("BugFixer", "refine", "improve", "Fixes bugs in the code in hand."),
    Role("TaskPlanner", "plan", None, "Decomposes the task into independent subtasks (APWA manager)."),
    Role("FinalDecision", "decide", "sc_ensemble", "Compares the candidate answers and gives the final one."),
)}
ROLE_NAMES = tuple(ROLES)
FUNCTIONS = ("solve", "refine", "decide", "plan")

#: the planner's call (a list of subtasks): mean completion and instruction tokens (assumption)
PLANNER_LENGTHS = (100.0, 150.0)
#: share of a DeepThink completion that is the answer itself, kept by every strategy (assumptions:
#: a math answer is "#### 42" plus tags, ~5 of ~230 tokens; a program is ~60 % of a reasoned answer)
ANSWER_SHARE = {("math", "solve"): 0.02, ("math", "refine"): 0.02, ("math", "decide"): 0.04, ("math", "plan"): 0.2,
                ("code", "solve"): 0.6, ("code", "refine"): 0.5, ("code", "decide"): 0.04, ("code", "plan"): 0.2}


def role_lengths(task: TaskSpec, role: str) -> tuple[float, float]:
    """(mean DeepThink completion tokens, instruction tokens) of ``role`` on ``task``."""
    r = ROLES[role]
    if r.call_kind is None:
        return PLANNER_LENGTHS
    try:
        return LENGTHS[task.name][r.call_kind]
    except KeyError:
        raise ValueError(f"role {role!r} has no call kind {r.call_kind!r} on task {task.name!r}") from None


def completion_split(task: TaskSpec, role: str) -> tuple[float, float]:
    """(answer tokens, reasoning tokens) of a mean DeepThink completion of ``role``."""
    mean, _ = role_lengths(task, role)
    a = ANSWER_SHARE[(task.kind, ROLES[role].function)] * mean
    return a, mean - a


def strategy_length_factor(task: TaskSpec, role: str, strategy: str) -> float:
    """Mean completion of ``strategy`` relative to DeepThink for ``role``."""
    a, r = completion_split(task, role)
    return (a + REASONING_KEPT[strategy] * r) / (a + r)


def quality_table(task: TaskSpec, models=MODELS) -> np.ndarray:
    """(models, strategies) target accuracies: the ranking a policy can know from published numbers."""
    return np.array([[target_accuracy(task, m.name, s) for s in STRATEGY_NAMES] for m in models])
