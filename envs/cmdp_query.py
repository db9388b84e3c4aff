"""The time-free core of one query in ``MASLatency-CMDP-v0``: call lengths, answers and their randomness.

A ``QueryState`` knows the query (difficulty, prompt length), its topology and the random draws of this
attempt; given a node and the Executor's (model, strategy) it says what the call sends and generates
(``call``), and, once the call is back, records what it ran (``finish``); the answers follow from the choices
and the draws by one set of rules, vectorised (``_final_labels``): the live answer (``score``), its
expectation over resampled draws (``expected_score``) and the counterfactuals (``counterfactual_scores``) all
read them. The SimPy shell (``envs.cmdp``) runs the calls on the simulated cluster in between.

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
from dataclasses import dataclass, field

import numpy as np

from .cmdp_catalog import (
    STRATEGY_NAMES,
    STRATEGY_PROMPT_TOKENS,
    attempt_theta,
    role_lengths,
    strategy_length_factor,
)
from .embeddings import text_seed
from .operators import LENGTH_SIGMA, MAX_COMPLETION_TOKENS, Quality
from .seeding import entropy
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
    out_tokens: list[int] = field(default_factory=list)
    choices: list[tuple[int, int, bool] | None] = field(default_factory=list)
    clipped_tokens: int = 0
    _u: np.ndarray = field(init=False, repr=False)
    _z: np.ndarray = field(init=False, repr=False)
    _lhs: dict[int, np.ndarray] = field(default_factory=dict, init=False, repr=False)  # _draws by size (read-only arrays)

    def __post_init__(self) -> None:
        g = np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy(self.seed_words))))
        self._u = g.random((MAX_NODES, 3))
        self._z = g.standard_normal(MAX_NODES)
        n = len(self.topology)
        self.out_tokens = [0] * n
        self.choices = [None] * n

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

    def finish(self, node: Node, model: int, strategy: int, completion_tokens: int, served: bool = True) -> None:
        """Record the node's output and the action it ran; a call that was not served gives no answer
        (counted as wrong). The answers follow from the choices and the query's draws (``answer``)."""
        i = node.index
        self.out_tokens[i] = completion_tokens if served else 0
        self.choices[i] = (model, strategy, served)

    @property
    def answer(self) -> int | None:
        """The final node's answer label with this attempt's draws; ``None`` until every answering node has
        finished."""
        if any(c is None and n.function != "plan" for c, n in zip(self.choices, self.topology.nodes, strict=True)):
            return None
        return int(self._final_labels(self._p_taken_all()[None], self._u[None, :len(self.topology)])[0, 0])

    @property
    def score(self) -> float:
        return 1.0 if self.answer == 0 else 0.0

    def expected_score(self, draws: int = 256, u: np.ndarray | None = None) -> float:
        """P(the final answer is right | the calls made): the answer draws resampled ``draws`` times.

        The answers' randomness (``_u``) touches nothing else in the episode (lengths and latency use their
        own draws), so this is the conditional expectation of ``score`` given the trajectory: a reward with
        the same expectation and far less variance (Rao-Blackwellised). Deterministic: the resamples come
        from a stream keyed by the query's seed words. ``u`` (shape ``(K, nodes, 3)``) replaces the resamples;
        ``u = self._u[None]`` gives ``score``. Every node must have finished."""
        u = self._draws(draws) if u is None else u
        return float((self._final_labels(self._p_taken_all()[None], u) == 0).mean())

    def counterfactual_scores(self, draws: int = 256) -> np.ndarray:
        """``Q[i, a]``: ``expected_score`` had node ``i`` run action ``a = model * 3 + strategy`` and every other
        node what it ran (same resampled draws for every entry, so differences are exact up to the shared
        resample). A node without an answer (``plan``) or whose call was rejected has a constant row. Shape
        ``(nodes, models * 3)``."""
        n, na, ns = len(self.topology), len(self.models) * len(STRATEGY_NAMES), len(STRATEGY_NAMES)
        taken = self._p_taken_all()
        alt = np.array([self.p_right(*divmod(a, ns)) for a in range(na)])
        p = np.repeat(taken[None], n * na, 0).reshape(n, na, n)
        for i in range(n):
            if self.choices[i] is not None and self.choices[i][2]:
                p[i, :, i] = alt
        right = self._final_labels(p.reshape(n * na, n), self._draws(draws)) == 0
        return right.mean(1).reshape(n, na)

    def _p_taken_all(self) -> np.ndarray:
        """Each node's probability of a right fresh attempt with the action it ran (0 for plan nodes and
        rejected calls, which the rules never read)."""
        out = np.zeros(len(self.topology))
        for i, (c, node) in enumerate(zip(self.choices, self.topology.nodes, strict=True)):
            if c is None:
                if node.function != "plan":
                    raise RuntimeError("answers need every answering node finished")
            elif c[2]:
                out[i] = self.p_right(c[0], c[1])
        return out

    def _draws(self, draws: int) -> np.ndarray:
        """A Latin hypercube of ``draws`` points per (node, purpose): each column hits every 1/draws stratum
        once, so the share of draws under a probability is exact to 1/draws (differences between actions
        that move a probability by 1 point are not lost in sampling noise); unbiased like plain draws."""
        if (cached := self._lhs.get(draws)) is not None:      # expected_score and counterfactual_scores share it
            return cached
        g = np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy([*self.seed_words, 0x5EED]))))
        shape = (draws, len(self.topology), 3)
        strata = np.argsort(g.random(shape), axis=0)                     # an independent permutation per column
        u = self._lhs[draws] = (strata + g.random(shape)) / draws
        u.flags.writeable = False
        return u

    def _final_labels(self, p: np.ndarray, u: np.ndarray) -> np.ndarray:
        """The answer rules (module docstring), for every row of ``p`` (V, nodes: each node's probability of
        a right fresh attempt) and every draw of ``u`` (K, nodes, 3: right, which wrong, tie-break) at once:
        the final node's label, shape (V, K). The live answer is the case V = K = 1 with the query's draws."""
        v, k = p.shape[0], u.shape[0]
        q = self.quality
        labels: list[np.ndarray | None] = [None] * len(self.topology)
        for node in self.topology.nodes:
            i = node.index
            if node.function == "plan":
                continue
            if not self.choices[i][2]:
                labels[i] = np.full((v, k), 2 + i)
                continue
            ur, uw, ut = u[None, :, i, _U_RIGHT], u[None, :, i, _U_WRONG], u[:, i, _U_TIE]
            wrong = np.where(uw < WRONG_SHARED, 1, 2 + i)
            pi = p[:, i, None]
            inputs = [labels[d] for d in node.deps if labels[d] is not None]
            if node.function == "solve" or not inputs:
                labels[i] = np.where(ur < pi, 0, wrong)
                continue
            stacked = np.stack(inputs, -1).reshape(v * k, len(inputs))
            base = _vote_many(stacked, np.broadcast_to(ut, (v, k)).reshape(-1)).reshape(v, k)
            labels[i] = np.where(base == 0, np.where(ur < q.refine_break, wrong, 0),
                                 np.where(ur < q.refine_fix_share * pi, 0, base))
        return labels[-1]


def _vote_many(inputs: np.ndarray, u_tie: np.ndarray) -> np.ndarray:
    """The vote of a refine/decide node on every row of ``inputs`` (R, n) at once: the plurality label, ties
    broken by ``u_tie`` among the tied labels in ascending order (the ``int(u * len(tied))``-th)."""
    r = inputs.shape[0]
    counts = np.zeros((r, int(inputs.max()) + 1), np.int16)
    rows = np.arange(r)
    for j in range(inputs.shape[1]):
        counts[rows, inputs[:, j]] += 1                                 # one increment per row: no clashes
    tied = counts == counts.max(1, keepdims=True)
    pick = (u_tie * tied.sum(1)).astype(np.int64)                      # the pick-th tied label
    return np.argmax(np.cumsum(tied, 1) > pick[:, None], axis=1)
