"""The time-free core of one query through the supernet: operator semantics, answers, CP tokens, cost.

A ``QueryRun`` holds the state LAMaS's graph holds (the list of solutions in hand and the current solution)
and turns an operator into an ``OpPlan``: the LLM calls and tool runs it makes (grouped into stages that run
one after another; calls inside a stage run concurrently), the answer it produces and its CP tokens c(op).
The SimPy shell (``envs.mas_latency``) executes the plans on the simulated cluster and calls ``apply``.

Answers are labels: 0 is right, 1 is the query's most common wrong answer, larger numbers are other wrong
answers. All randomness comes from ``Draws``, arrays keyed by (slot, operator, call, purpose), so an
operator run at the same place on the same query gives the same result whatever else runs, and whatever the
timing: common random numbers across methods.

Fixed graph steps (docs/lamas.md#2-fixed-steps) are chosen by ``GraphConfig``; CP tokens follow
docs/lamas.md#4-cp-length-and-cost exactly: completion tokens only, MultiGenerateCoT / 3, 50 virtual tokens
per tool second where the LAMaS code captures tool time, the per-layer max (sum in sequential mode) plus
post-processing tokens.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from .embeddings import text_seed
from .operators import (
    CONSTANTS,
    LENGTH_SIGMA,
    LENGTHS,
    MAX_COMPLETION_TOKENS,
    OPERATOR_NAMES,
    PRICES_USD_PER_TOKEN,
    Quality,
)
from .supernet_graph import GraphConfig
from .tasks import WRONG_SHARED

__all__ = ["Call", "Draws", "GraphConfig", "OpPlan", "QueryRun", "Solution", "ToolRun", "VIRTUAL_TOKENS_PER_S"]

VIRTUAL_TOKENS_PER_S = 50.0
PRE, POST = 4, 5                  # draw slots of the fixed steps; 0-3 are the layers
_N_SLOTS, _N_OPS, _N_CALLS, _N_PURPOSES = 6, len(OPERATOR_NAMES), 6, 4
_OP = {n: i for i, n in enumerate(OPERATOR_NAMES)}
_IMPROVE = _OP["Generate"]        # the post-processing improve-code call draws from Generate's cell


@functools.lru_cache(maxsize=256)
def _instruction_id(task: str, kind: str) -> int:
    """A stable prefix-cache content id for one instruction template (str hashes are salted per process)."""
    return text_seed(f"maslatency/instruction/{task}/{kind}") & 0x3FFFFFFFFFFF


@dataclass(frozen=True, slots=True)
class Solution:
    label: int        # 0 right, >= 1 a wrong answer
    tokens: int       # its length, carried as context into later prompts


@dataclass(frozen=True, slots=True)
class Call:
    kind: str
    prompt_tokens: int
    completion_tokens: int
    segments: tuple[tuple[int, int], ...] | None = None


@dataclass(frozen=True, slots=True)
class ToolRun:
    seconds: float


@dataclass(slots=True)
class OpPlan:
    name: str
    stages: list[list[Call | ToolRun]]
    effect: str                        # "append" | "extend" | "ensemble" | "replace_final" | "noop"
    out: tuple[Solution, ...] = ()
    cp_tokens: float = 0.0
    raises: bool = False               # ScEnsemble over an empty list: LAMaS's graph raises, the query retries
    passed: bool = True                # Test: did the public tests pass at the end

    @property
    def calls(self) -> list[Call]:
        return [c for s in self.stages for c in s if isinstance(c, Call)]

    @property
    def cost_usd(self) -> float:
        return sum(c.prompt_tokens * PRICES_USD_PER_TOKEN["prompt"] + c.completion_tokens *
                   PRICES_USD_PER_TOKEN["completion"] for c in self.calls)


class Draws:
    """Uniforms ``u`` and normals ``z`` of one query attempt, shape (slot, operator, call, purpose).

    Purposes: 0 right/wrong, 1 which wrong answer / tie break, 2 length noise (z), 3 misc (z: tool time;
    u: duplicates, execution errors, test coverage).
    """

    __slots__ = ("u", "z")

    def __init__(self, seed_words: list[int]):
        g = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed_words)))
        shape = (_N_SLOTS, _N_OPS, _N_CALLS, _N_PURPOSES)
        self.u = g.random(shape)
        self.z = g.standard_normal(shape)


@dataclass(slots=True)
class QueryRun:
    """One attempt at one query: state, plans, CP and cost bookkeeping."""

    cfg: GraphConfig
    quality: Quality
    difficulty: float
    query_tokens: int
    query_content_id: int
    draws: Draws
    solutions: list[Solution] = field(default_factory=list)
    current: Solution | None = None
    layer_cp: list[list[float]] = field(default_factory=list)     # c(op) per layer, in list order
    post_cp: float = 0.0
    clipped_tokens: int = 0
    final: Solution | None = None

    # ------------------------------------------------------------------ helpers
    @property
    def z_difficulty(self) -> float:
        return self.difficulty / self.quality.cal.spread

    def _tokens(self, kind: str, slot: int, op: int, call: int) -> int:
        mean, _ = LENGTHS[self.cfg.task.name][kind]
        s = LENGTH_SIGMA
        x = mean * np.exp(self.cfg.task.length_difficulty * self.z_difficulty + s * self.draws.z[slot, op, call, 2]
                          - s * s / 2)
        n = int(round(x))
        if n < 1 or n > MAX_COMPLETION_TOKENS:
            self.clipped_tokens += 1
            n = min(max(n, 1), MAX_COMPLETION_TOKENS)
        return n

    def _call(self, kind: str, slot: int, op: int, call: int, context_tokens: int = 0) -> Call:
        instr = int(LENGTHS[self.cfg.task.name][kind][1])
        prompt = instr + self.query_tokens + context_tokens
        # shared instruction + query prefix: identical prompts hit the prefix cache
        segs = ((_instruction_id(self.cfg.task.name, kind), instr), (self.query_content_id, self.query_tokens))
        return Call(kind, prompt, self._tokens(kind, slot, op, call), segs)

    def _tool(self, slot: int, op: int, call: int) -> ToolRun:
        mean = CONSTANTS["tool_s"][0]
        return ToolRun(float(mean * np.exp(0.5 * self.draws.z[slot, op, call, 3] - 0.125)))

    def _wrong(self, slot: int, op: int, call: int) -> int:
        if self.draws.u[slot, op, call, 1] < WRONG_SHARED:
            return 1
        return 2 + (slot * _N_OPS + op) * _N_CALLS + call

    def _attempt(self, mode: str, slot: int, op: int, call: int) -> int:
        """The label of a fresh attempt in ``mode`` (io, cot, pot)."""
        if self.draws.u[slot, op, call, 0] < self.quality.p(mode, self.difficulty):
            return 0
        return self._wrong(slot, op, call)

    def _revise(self, base: Solution | None, mode: str, brk: float, fix: float, slot: int, op: int, call: int) -> int:
        """Refinement of ``base``: right stays right unless it breaks, wrong is fixed with ``fix`` x p."""
        if base is None:
            return self._attempt(mode, slot, op, call)
        u = self.draws.u[slot, op, call, 0]
        if base.label == 0:
            return self._wrong(slot, op, call) if u < brk else 0
        return 0 if u < fix * self.quality.p(mode, self.difficulty) else base.label

    def _caught(self, label: int) -> bool:
        """Public tests reject wrong program ``label``: a fixed property of that program."""
        if label == 0:
            return False
        frac = (label * 0.6180339887498949 + self.draws.u[POST, _OP["Test"], _N_CALLS - 1, 3]) % 1.0
        return frac < CONSTANTS["test_catch"][0]

    def _vote(self, sols: list[Solution], slot: int, op: int) -> Solution:
        counts = Counter(s.label for s in sols)
        top = max(counts.values())
        tied = sorted(lab for lab, c in counts.items() if c == top)
        pick = tied[int(self.draws.u[slot, op, 0, 1] * len(tied))]
        return next(s for s in sols if s.label == pick)

    # ------------------------------------------------------------------ operators
    def plan(self, name: str, slot: int) -> OpPlan:
        """The plan of operator ``name`` run at ``slot`` on the current state."""
        return getattr(self, f"_plan_{name}")(slot)

    def _plan_Generate(self, slot: int) -> OpPlan:
        op = _OP["Generate"]
        c = self._call("generate", slot, op, 0)
        return OpPlan("Generate", [[c]], "append", (Solution(self._attempt("io", slot, op, 0), c.completion_tokens),),
                      float(c.completion_tokens))

    def _plan_GenerateCoT(self, slot: int) -> OpPlan:
        op = _OP["GenerateCoT"]
        c = self._call("cot", slot, op, 0)
        return OpPlan("GenerateCoT", [[c]], "append", (Solution(self._attempt("cot", slot, op, 0), c.completion_tokens),),
                      float(c.completion_tokens))

    def _plan_MultiGenerateCoT(self, slot: int) -> OpPlan:
        op = _OP["MultiGenerateCoT"]
        calls = [self._call("cot", slot, op, k) for k in range(3)]
        first = self._attempt("cot", slot, op, 0)
        labels = [first] + [first if self.draws.u[slot, op, k, 3] < CONSTANTS["duplicate_prob"][0]
                            else self._attempt("cot", slot, op, k) for k in (1, 2)]
        stages = [calls] if self.cfg.mgcot_concurrent else [[c] for c in calls]
        out = tuple(Solution(lab, c.completion_tokens) for lab, c in zip(labels, calls, strict=True))
        return OpPlan("MultiGenerateCoT", stages, "extend", out, sum(c.completion_tokens for c in calls) / 3.0)

    def _plan_ScEnsemble(self, slot: int, sols: list[Solution] | None = None) -> OpPlan:
        op = _OP["ScEnsemble"]
        sols = self.solutions if sols is None else sols
        c = self._call("sc_ensemble", slot, op, 0, sum(s.tokens for s in sols))
        if not sols:   # answer_mapping[letter] fails on an empty list: the graph raises after the call
            return OpPlan("ScEnsemble", [[c]], "noop", (), float(c.completion_tokens), raises=True)
        return OpPlan("ScEnsemble", [[c]], "ensemble", (self._vote(sols, slot, op),), float(c.completion_tokens))

    def _plan_SelfRefine(self, slot: int) -> OpPlan:
        op, q = _OP["SelfRefine"], self.quality
        base = self.current
        c = self._call("refine", slot, op, 0, base.tokens if base else 0)
        lab = self._revise(base, "cot", q.refine_break, q.refine_fix_share, slot, op, 0)
        return OpPlan("SelfRefine", [[c]], "append", (Solution(lab, c.completion_tokens),), float(c.completion_tokens))

    def _program(self, slot: int, analysis: Solution | None) -> tuple[list, int, float, bool]:
        """Up to three code calls, each executed; returns (stages, code tokens, tool seconds, has output)."""
        op = _OP["Programmer"]
        stages, toks, tool_s, ctx = [], 0, 0.0, analysis.tokens if analysis else 0
        for a in range(3):
            c = self._call("code", slot, op, a, ctx)
            t = self._tool(slot, op, a)
            stages += [[c], [t]]
            toks += c.completion_tokens
            tool_s += t.seconds
            if self.draws.u[slot, op, a, 3] >= CONSTANTS["exec_error"][0]:
                return stages, toks, tool_s, True
            ctx += c.completion_tokens + 40      # the failed code and its traceback go into the retry
        return stages, toks, tool_s, False

    def _program_label(self, slot: int, analysis: Solution | None) -> int:
        return self._revise(analysis, "pot", CONSTANTS["pot_break"][0], self.quality.refine_fix_share, slot,
                            _OP["Programmer"], 4)

    def _plan_Programmer(self, slot: int, *, tool_in_cp: bool | None = None) -> OpPlan:
        op = _OP["Programmer"]
        stages, toks, tool_s, ok = self._program(slot, self.current)
        ans = self._call("answer", slot, op, 5, 40)
        stages.append([ans])
        lab = self._program_label(slot, self.current) if ok else self._attempt("io", slot, op, 5)
        counted = self.cfg.programmer_tool_in_cp if tool_in_cp is None else tool_in_cp
        cp = toks + ans.completion_tokens + (VIRTUAL_TOKENS_PER_S * tool_s if counted else 0.0)
        return OpPlan("Programmer", stages, "append", (Solution(lab, ans.completion_tokens),), float(cp))

    def _plan_Test(self, slot: int) -> OpPlan:
        op, q = _OP["Test"], self.quality
        sol = self.current
        stages: list = []
        toks, tool_s = 0, 0.0
        for r in range(4):
            t = self._tool(slot, op, r)
            stages.append([t])
            tool_s += t.seconds
            if sol is not None and not self._caught(sol.label):
                break
            if r == 3:
                break
            c = self._call("reflect", slot, op, r, (sol.tokens if sol else 0) + 100)
            stages.append([c])
            toks += c.completion_tokens
            lab = (self._attempt("io", slot, op, r) if sol is None else
                   (0 if self.draws.u[slot, op, r, 0] < q.test_fix_round else sol.label))
            sol = Solution(lab, c.completion_tokens)
        passed = sol is not None and not self._caught(sol.label)
        cp = toks + VIRTUAL_TOKENS_PER_S * tool_s
        out = (sol,) if sol is not None else ()
        return OpPlan("Test", stages, "append" if out else "noop", out, float(cp), passed=passed)

    def _plan_EarlyStop(self, slot: int) -> OpPlan:
        return OpPlan("EarlyStop", [], "noop")

    # ------------------------------------------------------------------ state
    def apply(self, plan: OpPlan) -> None:
        """Merge one operator's result, as LAMaS's graph does (in list order in a parallel layer)."""
        if plan.effect == "append" or plan.effect == "extend":
            self.solutions.extend(plan.out)
            self.current = plan.out[-1]
        elif plan.effect == "ensemble":
            self.solutions = [plan.out[0]]
            self.current = plan.out[0]
        elif plan.effect == "replace_final":
            self.final = plan.out[0]

    def record_layer(self, cps: list[float]) -> float:
        self.layer_cp.append(cps)
        return self.layer_contribution(cps)

    def layer_contribution(self, cps: list[float]) -> float:
        if not cps:
            return 0.0
        return max(cps) if self.cfg.parallel else sum(cps)

    @property
    def cp_layers(self) -> float:
        """Sum over layers of the max (sum when sequential): LAMaS's training penalty uses this."""
        return sum(self.layer_contribution(c) for c in self.layer_cp)

    @property
    def cp_tokens(self) -> float:
        """The reported CP length (``cp_token``): layers plus post-processing."""
        return self.cp_layers + self.post_cp

    # ------------------------------------------------------------------ fixed steps
    def pre_steps(self):
        """Plans before the layers (MATH: Programmer + refine, not counted in CP)."""
        if self.cfg.pre_programmer:
            yield self._plan_Programmer(PRE, tool_in_cp=False)

    def post_steps(self):
        """Plans after the layers; the caller executes each and calls ``apply_post`` before the next."""
        cfg = self.cfg
        if cfg.task.kind == "math" and len(self.solutions) > 1:
            yield self._plan_ScEnsemble(POST)
        if cfg.task.name == "gsm8k":
            yield self._verification()
        elif cfg.task.kind == "code":
            test = self._plan_Test(POST)
            yield test
            if not test.passed:
                c = self._call("improve", POST, _IMPROVE, 0)
                yield OpPlan("ImproveCode", [[c]], "replace_final",
                             (Solution(self._attempt("io", POST, _IMPROVE, 0), c.completion_tokens),),
                             float(c.completion_tokens))

    def _verification(self) -> OpPlan:
        """GSM8K: a Programmer checks the final answer; a non-empty printed output becomes the answer."""
        analysis = self.current
        stages, toks, tool_s, ok = self._program(POST, analysis)
        cp = toks + (VIRTUAL_TOKENS_PER_S * tool_s if self.cfg.verify_tool_in_cp else 0.0)
        if not ok:
            return OpPlan("Programmer", stages, "noop", (), float(cp))
        return OpPlan("Programmer", stages, "replace_final", (Solution(self._program_label(POST, analysis), 0),),
                      float(cp))

    def apply_post(self, plan: OpPlan) -> None:
        self.post_cp += plan.cp_tokens
        if plan.name == "Test" and plan.passed:
            self.final = plan.out[0] if plan.out else None
            return
        self.apply(plan)

    @property
    def answer(self) -> Solution | None:
        return self.final if self.final is not None else self.current

    @property
    def score(self) -> float:
        a = self.answer
        return 1.0 if a is not None and a.label == 0 else 0.0
