"""The time-free core of one query in ``MASLatency-CMDP-v0``: call lengths, answers and their randomness.

A ``QueryState`` knows the query (difficulty, prompt length), its topology and the random draws of this
attempt; given a node and the Executor's (model, strategy) it says what the call sends and generates
(``call``), and, once the call is back, what the node's answer is (``finish``). The SimPy shell
(``envs.cmdp``) runs the calls on the simulated cluster in between.

Answers are labels as in ``envs.supernet``: 0 is right, 1 the query's most common wrong answer, larger
numbers other wrong answers. Per node:

* ``solve``: a fresh attempt, right with ``sigmoid(theta(m, rho) - d_q)`` (``envs.cmdp_catalog``);
* ``refine``: revise the plurality of its inputs (a right base breaks with the task's refinement break rate,
  a wrong one is fixed with the fix share times the attempt's probability: ``envs.operators.quality``);
* ``decide``: the same, as the final decision over all candidates;
* ``plan``: no answer; its output is context for the branches.

Draws are indexed by node and purpose, and a call's length noise is the same whatever the strategy or
model, so two policies that choose differently on the same query differ only by their choices.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from .cmdp_catalog import (
    ROLES,
    STRATEGY_NAMES,
    STRATEGY_PROMPT_TOKENS,
    attempt_theta,
    role_lengths,
    strategy_length_factor,
)
from .embeddings import text_seed
from .operators import LENGTH_SIGMA, MAX_COMPLETION_TOKENS, Quality
from .tasks import WRONG_SHARED, TaskSpec, sigmoid
from .topologies import MAX_NODES, Node, Topology

__all__ = ["CallPlan", "QueryState"]

_U_RIGHT, _U_WRONG, _U_TIE = 0, 1, 2
#: tokens of formatting around each predecessor's output carried into a prompt (assumption)
CONTEXT_OVERHEAD_TOKENS = 12


@functools.lru_cache(maxsize=256)
def _instruction_id(task: str, role: str) -> int:
    return text_seed(f"maslatency/cmdp-instruction/{task}/{role}") & 0x3FFFFFFFFFFF


@dataclass(frozen=True, slots=True)
class CallPlan:
    prompt_tokens: int
    completion_tokens: int
    segments: tuple[tuple[int, int], ...]
    context_tokens: int


@dataclass(slots=True)
class QueryState:
    task: TaskSpec
    quality: Quality
    models: tuple[str, ...]
    topology: Topology
    difficulty: float
    query_tokens: int
    query_content_id: int
    seed_words: list[int]
    labels: list[int | None] = field(default_factory=list)
    out_tokens: list[int] = field(default_factory=list)
    clipped_tokens: int = 0
    _u: np.ndarray = field(init=False, repr=False)
    _z: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        g = np.random.Generator(np.random.PCG64(np.random.SeedSequence(self.seed_words)))
        self._u = g.random((MAX_NODES, 3))
        self._z = g.standard_normal(MAX_NODES)
        n = len(self.topology)
        self.labels = [None] * n
        self.out_tokens = [0] * n

    @property
    def z_difficulty(self) -> float:
        return self.difficulty / self.quality.cal.spread

    # ------------------------------------------------------------------ calls
    def context_tokens(self, node: Node) -> int:
        return sum(self.out_tokens[d] + CONTEXT_OVERHEAD_TOKENS for d in node.deps)

    def base_prompt_tokens(self, node: Node) -> int:
        """The prompt without the strategy instruction: role instructions, the query, the inputs' outputs."""
        _, instr = role_lengths(self.task, node.role)
        return int(instr) + self.query_tokens + self.context_tokens(node)

    def prompt_tokens(self, node: Node, strategy: int) -> int:
        return self.base_prompt_tokens(node) + STRATEGY_PROMPT_TOKENS[STRATEGY_NAMES[strategy]]

    def mean_completion(self, node: Node, strategy: int) -> float:
        """Expected completion tokens of the call (noise averaged out, difficulty included)."""
        mean, _ = role_lengths(self.task, node.role)
        f = strategy_length_factor(self.task, node.role, STRATEGY_NAMES[strategy])
        return mean * f * float(np.exp(self.task.length_difficulty * self.z_difficulty))

    def call(self, node: Node, strategy: int) -> CallPlan:
        s = LENGTH_SIGMA
        x = self.mean_completion(node, strategy) * np.exp(s * self._z[node.index] - s * s / 2)
        n = int(round(float(x)))
        if n < 1 or n > MAX_COMPLETION_TOKENS:
            self.clipped_tokens += 1
            n = min(max(n, 1), MAX_COMPLETION_TOKENS)
        _, instr = role_lengths(self.task, node.role)
        p = self.prompt_tokens(node, strategy)
        head = ((_instruction_id(self.task.name, node.role), int(instr)), (self.query_content_id, self.query_tokens))
        rest = p - int(instr) - self.query_tokens
        return CallPlan(p, n, head, rest)

    # ------------------------------------------------------------------ answers
    def p_right(self, model: int, strategy: int) -> float:
        theta = attempt_theta(self.task, self.models[model], STRATEGY_NAMES[strategy])
        return float(sigmoid(theta - self.difficulty))

    def _wrong(self, i: int) -> int:
        return 1 if self._u[i, _U_WRONG] < WRONG_SHARED else 2 + i

    def _vote(self, i: int, labels: list[int]) -> int:
        counts = Counter(labels)
        top = max(counts.values())
        tied = sorted(lab for lab, c in counts.items() if c == top)
        return tied[int(self._u[i, _U_TIE] * len(tied))]

    def finish(self, node: Node, model: int, strategy: int, completion_tokens: int, served: bool = True) -> None:
        """Record the node's output; a call that was not served gives no answer (counted as wrong)."""
        i = node.index
        self.out_tokens[i] = completion_tokens if served else 0
        fn = ROLES[node.role].function
        if fn == "plan":
            return
        if not served:
            self.labels[i] = 2 + i
            return
        u, p = self._u[i, _U_RIGHT], self.p_right(model, strategy)
        inputs = [self.labels[d] for d in node.deps if self.labels[d] is not None]
        if fn == "solve" or not inputs:
            self.labels[i] = 0 if u < p else self._wrong(i)
            return
        base = self._vote(i, inputs)
        q = self.quality
        if base == 0:
            self.labels[i] = self._wrong(i) if u < q.refine_break else 0
        else:
            self.labels[i] = 0 if u < q.refine_fix_share * p else base

    @property
    def answer(self) -> int | None:
        return self.labels[-1]

    @property
    def score(self) -> float:
        return 1.0 if self.answer == 0 else 0.0
