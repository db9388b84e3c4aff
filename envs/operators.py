"""Operators of the LAMaS/MaAS supernet and the parameters of their LLM calls.

Operator order is the controller's output order (``benchmark/experiment_configs.py`` in LAMaS):

* math (GSM8K, MATH): Generate, GenerateCoT, MultiGenerateCoT, ScEnsemble, Programmer, SelfRefine, EarlyStop
* code (HumanEval, MBPP): the same with Test in place of Programmer

An operator is a short program of LLM calls (and tool runs); its semantics live in ``envs.supernet``. Here
are the numbers: per task and per *call kind* the mean completion length and the instruction part of the
prompt, and the quality constants that are not accuracies. Lengths scale with a query's difficulty
(``length_difficulty`` in the task spec) and with a ``length_scale`` argument, the hook through which a
(model, strategy) router (issue 5) can shorten or lengthen calls.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from .embeddings import operator_embedding
from .tasks import Calibration, TaskSpec, calibrate, sigmoid

__all__ = ["CALL_KINDS", "CONSTANTS", "DESCRIPTIONS", "GENERATE_TYPE", "LENGTHS", "OPERATOR_NAMES", "PRICES_USD_PER_TOKEN",
           "Quality", "completion_mean_tokens", "operator_descriptions", "operator_embeddings", "operator_set",
           "quality"]

OPERATOR_NAMES = ("Generate", "GenerateCoT", "MultiGenerateCoT", "ScEnsemble", "Programmer", "SelfRefine", "Test",
                  "EarlyStop")
GENERATE_TYPE = frozenset({"Generate", "GenerateCoT", "MultiGenerateCoT"})

_MATH_OPS = ("Generate", "GenerateCoT", "MultiGenerateCoT", "ScEnsemble", "Programmer", "SelfRefine", "EarlyStop")
_CODE_OPS = ("Generate", "GenerateCoT", "MultiGenerateCoT", "ScEnsemble", "Test", "SelfRefine", "EarlyStop")


def operator_set(kind: str) -> tuple[str, ...]:
    """The selectable operators of a task kind, in controller order."""
    if kind == "math":
        return _MATH_OPS
    if kind == "code":
        return _CODE_OPS
    raise ValueError(f"task kind must be 'math' or 'code', got {kind!r}")


# (description, interface) in the spirit of LAMaS's template/operator.json
DESCRIPTIONS: dict[str, tuple[str, str]] = {
    "Generate": ("Generates anything based on customized input and instruction.",
                 "generate(input: str, instruction: str) -> dict with key 'response' of type str"),
    "GenerateCoT": ("Generates an answer using a chain-of-thought approach, providing step-by-step reasoning "
                    "before producing the final answer.",
                    "generate_cot(input: str, instruction: str) -> dict with key 'response' of type str"),
    "MultiGenerateCoT": ("Generates multiple answers using diverse chain-of-thought reasoning processes to "
                         "increase answer variety and robustness.",
                         "multi_generate_cot(input: str, instruction: str) -> dict with key 'response' of type "
                         "List[str]"),
    "ScEnsemble": ("Uses self-consistency to select the answer that appears most frequently in the candidate list.",
                   "sc_ensemble(solutions: List[str], problem: str) -> dict with key 'response' of type str"),
    "Programmer": ("Writes and executes Python code to solve the problem, using the analysis as guidance.",
                   "programmer(problem: str, analysis: str) -> dict with keys 'code' and 'output' of type str"),
    "SelfRefine": ("Refines the generated answer by analyzing errors or unsupported claims and making iterative "
                   "improvements.", "self_refine(problem: str, solution: str) -> dict with key 'response' of type str"),
    "Test": ("Tests the solution with public test cases and reflects on failures to revise the code.",
             "test(problem: str, solution: str, entry_point: str) -> dict with keys 'result' and 'solution'"),
    "EarlyStop": ("Stops adding operators: the architecture ends after this layer.", "early_stop() -> None"),
}


def operator_descriptions(kind: str) -> list[str]:
    """``"<i>. <Name>: <description>, with interface <interface>."`` for each operator, as LAMaS embeds them."""
    return [f"{i}. {n}: {DESCRIPTIONS[n][0]}, with interface {DESCRIPTIONS[n][1]}." for i, n in
            enumerate(operator_set(kind), start=1)]


@functools.lru_cache(maxsize=4)
def operator_embeddings(kind: str) -> np.ndarray:
    """(num_ops, 384) frozen operator embeddings, computed once per kind."""
    e = np.stack([operator_embedding(d) for d in operator_descriptions(kind)])
    e.setflags(write=False)
    return e


# ------------------------------------------------------------------------------------------ call lengths
CALL_KINDS = ("generate", "cot", "sc_ensemble", "refine", "code", "answer", "reflect", "improve")

#: task -> call kind -> (mean completion tokens, instruction tokens of the prompt).
#: GSM8K CoT: 205 tokens for GPT-4o (Chain of Draft, arXiv 2502.18600, Table 1) + ~25 tokens of the XML
#: fields (<thought>, <answer>) the operators ask for. MATH level 5: reference solutions are ~2.5-3x
#: longer than GSM8K's, hence ~600. Code: a HumanEval function body with docstring ~200 tokens (MBPP
#: shorter). ScEnsemble writes a short comparison and a letter; Programmer writes a solve() function; the
#: refine-answer call words the program's output. Instructions: MaAS/LAMaS prompt templates (the CoT
#: prompt carries two worked examples). All assumptions anchored as stated, then checked (not fitted)
#: against the per-query totals of docs/lamas.md#8-calibration-targets.
LENGTHS: dict[str, dict[str, tuple[float, float]]] = {
    "gsm8k": {"generate": (230, 180), "cot": (230, 420), "sc_ensemble": (120, 160), "refine": (230, 150),
              "code": (160, 230), "answer": (60, 110)},
    "math": {"generate": (600, 180), "cot": (600, 420), "sc_ensemble": (150, 160), "refine": (600, 150),
             "code": (260, 230), "answer": (120, 110)},
    "humaneval": {"generate": (200, 120), "cot": (200, 120), "sc_ensemble": (120, 160), "refine": (220, 150),
                  "reflect": (320, 200), "improve": (200, 150)},
    "mbpp": {"generate": (150, 120), "cot": (150, 120), "sc_ensemble": (110, 160), "refine": (170, 150),
             "reflect": (260, 200), "improve": (150, 150)},
}

LENGTH_SIGMA = 0.4          # log-sd of a call's completion length (assumption)
MAX_COMPLETION_TOKENS = 4096  # lamas/configs/llm_config.py max_token

#: gpt-4o-mini list prices (docs/lamas.md#4-cp-length-and-cost, utils/cost_manager.py)
PRICES_USD_PER_TOKEN = {"prompt": 0.15e-6, "completion": 0.60e-6}


def completion_mean_tokens(task: str, call_kind: str, length_scale: float = 1.0) -> float:
    """Mean completion tokens of one call; ``length_scale`` is the hook for strategies and models."""
    try:
        return LENGTHS[task][call_kind][0] * length_scale
    except KeyError:
        raise ValueError(f"task {task!r} has no call kind {call_kind!r}; kinds: {sorted(LENGTHS.get(task, {}))}") from None


# ------------------------------------------------------------------------------------------ quality
#: Constants other than accuracies, each an assumption with its anchor.
CONSTANTS: dict[str, tuple[float, str]] = {
    "duplicate_prob": (0.9, "MultiGenerateCoT's calls share one prompt at temperature 0: a later call repeats the "
                            "first call's answer with this probability (Atil et al. 2024, arXiv 2408.04667: parsed "
                            "answers of repeated T=0 calls agree 80-100 % for GPT-4o-class models)"),
    "refine_fix_share": (0.5, "a refinement of a wrong answer succeeds with this fraction of a fresh attempt's "
                              "probability (assumption; the break rate is then solved from the Self-Refine accuracy)"),
    "test_catch": (0.8, "public (docstring) tests reject a wrong program with this probability (assumption)"),
    "debug_recovery": (0.28, "share of wrong programs that debugging against visible tests repairs: "
                             "Self-Debugging on HumanEval with GPT-3.5, 73.8 -> 81.1 (LDB, arXiv 2402.16906)"),
    "exec_error": (0.10, "a generated program raises and is regenerated (Programmer retries, up to 3 attempts)"),
    "tool_s": (0.10, "mean seconds of one subprocess run of generated code (interpreter start + run)"),
    "pot_break": (0.0, "code that follows a correct analysis reproduces its answer (assumption)"),
    "retry_wait_s": (1.0, "tenacity wait_fixed(1) between retries of a failed query (benchmark/gsm8k.py)"),
}


@dataclass(frozen=True, slots=True)
class Quality:
    """Derived quality parameters of one task (a pure function of its spec and ``CONSTANTS``)."""

    cal: Calibration
    refine_break: float
    refine_fix_share: float
    test_fix_round: float

    def p(self, mode: str, d: float, capability_logit: float = 0.0) -> float:
        return float(sigmoid(self.cal.theta[mode] + capability_logit - d))


@functools.lru_cache(maxsize=32)
def quality(spec: TaskSpec) -> Quality:
    """Solve the refinement break rate from the published Self-Refine accuracy, and the per-round repair rate
    of Test from the debugging recovery share."""
    from .tasks import _GH_W, _GH_X

    cal = calibrate(spec)
    p = sigmoid(cal.theta["cot"] - cal.spread * _GH_X)
    ep, ep1p = float(np.dot(_GH_W, p)), float(np.dot(_GH_W, p * (1 - p)))
    phi = CONSTANTS["refine_fix_share"][0]
    beta = (ep + phi * ep1p - spec.acc_self_refine) / ep
    if beta < 0.0:   # refinement helps on this task: no breaks, solve the fix share instead
        beta, phi = 0.0, min(1.0, (spec.acc_self_refine - ep) / max(ep1p, 1e-9))
    catch, rec = CONSTANTS["test_catch"][0], CONSTANTS["debug_recovery"][0]
    fix_round = 1.0 - (1.0 - min(rec / catch, 0.999)) ** (1.0 / 3.0)
    return Quality(cal=cal, refine_break=min(beta, 1.0), refine_fix_share=phi, test_fix_round=fix_round)
