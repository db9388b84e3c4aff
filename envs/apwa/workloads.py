"""APWA workloads: data tables of N items, the subtask contracts that expand over them, and the task models.

APWA (Rose, Mallick, Laws, Nita-Rotaru and Oprea, "A Distributed Architecture for Parallelizable Agentic
Workflows", arXiv 2605.15132; docs/system_aware.md#10-apwa-architecture) evaluates PII redaction, schema extraction and
hierarchical summarisation over corpora of items. Each workload here is one such job over an immutable table
of N rows. What an LLM call costs follows from token counts; what it is worth follows from how long its
context is. Every constant is a published fact or a labelled assumption, none fitted to an outcome:

=====================  =============================================================================  ==========
constant               value and source                                                               kind
=====================  =============================================================================  ==========
summarise row          781 tokens in, 56 out: CNN/DailyMail articles and their summaries (See, Liu     fact
                       and Manning, "Get To The Point", ACL 2017, s.4: 781 tokens, 3.75 sentences /
                       56 tokens on average)
extract row            the same 781-token articles; one JSON record of 8 fields x 10 tokens            assumption
redact row             200-token free-text records (PII-masking corpora hold short messages and       assumption
                       forms); redaction rewrites the text with spans masked, so output = input        fact (task)
row spread             lognormal, log-sd 0.5, mean kept                                               assumption
template tokens        instruction + output contract: 200 per worker call, 150 per merge call          assumption
manager call           ``cmdp_catalog.PLANNER_LENGTHS`` (150 instruction, 100 completion) plus 20     assumption
                       tokens per table column and 30 per registered capability (metadata only)
merge output           summaries merge into at most 512 tokens; records and redactions are            assumption
                       concatenated by a table operation, no LLM
malformed output       2 % of served calls break their output contract and are retried                assumption
context quality        RULER (Hsieh et al., arXiv 2404.06654, github.com/hsiehjackson/RULER README):   fact
                       Llama-3.1-8B-Instruct 95.5/93.8/91.6/87.4/84.7/77.0 and 70B 96.5/95.8/95.4/
                       94.8/88.4/66.6 at 4K..128K; an item handled in a context of L tokens keeps
                       RULER(L)/RULER(4K) of its value (linear in log2 L, 1 below 4K)
=====================  =============================================================================  ==========

The paper's own figures (2 min 23 s for 10 topics; semantic utility 0.995 at 100 topics) are outcomes to
compare with, never inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..cmdp_catalog import PLANNER_LENGTHS

__all__ = ["CONTEXT_QUALITY", "DataTable", "SubtaskContract", "TableMeta", "WORKLOADS", "Workload",
           "context_quality", "make_table", "manager_prompt_tokens"]

#: RULER average score (%) at 4K, 8K, 16K, 32K, 64K, 128K tokens (README of hsiehjackson/RULER)
CONTEXT_QUALITY: dict[str, tuple[float, ...]] = {
    "llama-3.1-8b": (95.5, 93.8, 91.6, 87.4, 84.7, 77.0),
    "llama-3.1-70b": (96.5, 95.8, 95.4, 94.8, 88.4, 66.6),
}
_RULER_LOG2 = np.log2([4096, 8192, 16384, 32768, 65536, 131072])


def context_quality(model: str, context_tokens: float) -> float:
    """Share of an item's value kept when it is handled in a context of ``context_tokens`` (see above)."""
    row = CONTEXT_QUALITY.get(model)
    if row is None:
        raise ValueError(f"no long-context scores for model {model!r}; known: {sorted(CONTEXT_QUALITY)} "
                         "(add its RULER row to envs.apwa.workloads.CONTEXT_QUALITY with a source)")
    x = math.log2(max(float(context_tokens), 1.0))
    return float(np.interp(x, _RULER_LOG2, np.asarray(row)) / row[0])


@dataclass(frozen=True, slots=True, kw_only=True)
class SubtaskContract:
    """What one worker call promises: its capability, the columns it reads and one output row per input row.

    The manager instantiates the contract per group of rows; ``instruction_tokens`` is the template's text
    (instruction and output schema), the only part of a worker prompt that is not the group's own data.
    """

    capability: str
    input_column: str
    instruction_tokens: int
    merge: str                      # "llm": an aggregator call per fan-in node; "concat": a table operation
    merge_instruction_tokens: int = 150
    merge_cap_tokens: int = 512

    def __post_init__(self) -> None:
        if self.merge not in ("llm", "concat"):
            raise ValueError(f"contract {self.capability!r}: merge must be 'llm' or 'concat', got {self.merge!r}")
        if self.instruction_tokens < 1 or self.merge_cap_tokens < 1:
            raise ValueError(f"contract {self.capability!r}: token counts must be >= 1")


@dataclass(frozen=True, slots=True, kw_only=True)
class Workload:
    """A job over a table: the rows' mean lengths and the contract that expands over them."""

    name: str
    row_tokens: float
    output_tokens: float
    contract: SubtaskContract
    columns: tuple[str, ...] = ("id", "text", "source", "date")
    log_sd: float = 0.5
    source: str = ""

    def __post_init__(self) -> None:
        if not (self.row_tokens >= 1 and self.output_tokens >= 1 and self.log_sd >= 0):
            raise ValueError(f"workload {self.name!r}: row_tokens and output_tokens must be >= 1, log_sd >= 0")
        if self.contract.input_column not in self.columns:
            raise ValueError(f"workload {self.name!r}: the contract reads column {self.contract.input_column!r}, "
                             f"which is not among {self.columns}")


_SEE = "See, Liu and Manning, ACL 2017 (CNN/DailyMail: 781-token articles, 56-token summaries)"
WORKLOADS: dict[str, Workload] = {w.name: w for w in (
    Workload(name="summarise", row_tokens=781.0, output_tokens=56.0, source=_SEE,
             contract=SubtaskContract(capability="summarise", input_column="text", instruction_tokens=200,
                                      merge="llm")),
    Workload(name="extract", row_tokens=781.0, output_tokens=80.0, source=_SEE + "; 8 fields x 10 tokens (assumption)",
             contract=SubtaskContract(capability="extract", input_column="text", instruction_tokens=200,
                                      merge="concat")),
    Workload(name="redact", row_tokens=200.0, output_tokens=200.0, source="assumption; output = input (masking)",
             contract=SubtaskContract(capability="redact", input_column="text", instruction_tokens=200,
                                      merge="concat")),
)}


@dataclass(frozen=True, slots=True)
class TableMeta:
    """All the manager ever sees of a table: its name, size and columns (never the rows)."""

    name: str
    num_rows: int
    columns: tuple[str, ...]
    mean_row_tokens: float


@dataclass(frozen=True, slots=True)
class DataTable:
    """An immutable table of ``num_rows`` items: per row, its input and expected output lengths (tokens)."""

    name: str
    row_tokens: np.ndarray
    output_tokens: np.ndarray
    columns: tuple[str, ...]

    @property
    def num_rows(self) -> int:
        return len(self.row_tokens)

    def meta(self) -> TableMeta:
        return TableMeta(self.name, self.num_rows, self.columns, float(np.mean(self.row_tokens)))


def _lognormal(mean: float, log_sd: float, n: int, rng: np.random.Generator) -> np.ndarray:
    mu = math.log(mean) - 0.5 * log_sd * log_sd
    return np.maximum(1, np.rint(rng.lognormal(mu, log_sd, n))).astype(np.int64)


def make_table(workload: Workload, num_rows: int, rng: np.random.Generator) -> DataTable:
    """N rows of ``workload`` with lognormal lengths from ``rng`` (the stream decides the data, nothing else)."""
    if not isinstance(num_rows, (int, np.integer)) or num_rows < 1:
        raise ValueError(f"num_rows must be an integer >= 1, got {num_rows!r}")
    rows = _lognormal(workload.row_tokens, workload.log_sd, int(num_rows), rng)
    out = _lognormal(workload.output_tokens, workload.log_sd, int(num_rows), rng)
    if workload.name == "redact":
        out = rows.copy()
    return DataTable(workload.name, rows, out, workload.columns)


def manager_prompt_tokens(meta: TableMeta, num_capabilities: int) -> tuple[int, int]:
    """(prompt, completion) tokens of the manager's planning call: instruction + metadata, never rows.

    The plan names one contract and its expansion parameters; the executor expands it over the rows, so
    neither number depends on ``meta.num_rows``.
    """
    completion, instruction = PLANNER_LENGTHS
    return int(instruction + 20 * len(meta.columns) + 30 * num_capabilities + 10), int(completion)
