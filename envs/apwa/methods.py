"""The methods compared on the same worlds: APWA and three baselines, each a process on an ``Executor``.

======================  ===================================================================================
``apwa``                the manager plans from metadata (one call on the ``plan`` capability), the contract
                        expands into groups (``Decomposition``, default ``auto_decomposition``), workers run
                        concurrently with retries and split-on-refusal, merges fan in hierarchically
``centralised``         one agent, one conversation: row k is appended to a context holding every earlier
                        row and answer (automatic prefix caching reuses it); the context grows with N until
                        the server refuses it (``max_model_len``) or KV pressure preempts it; for an ``llm``
                        contract a last turn writes the merged answer
``chain``               a sequential chain: one call per row with a fresh context (the row and the previous
                        answer), one after another, then one flat merge
``fixed_map``           a parallel map of fixed width 4 (the CMDP env's ``ParallelMap``): four calls, each
                        with a quarter of the rows in its prompt, one flat merge; no manager, no splitting
======================  ===================================================================================
"""

from __future__ import annotations

import math

import numpy as np

from .executor import Executor
from .manager import Decomposition, auto_decomposition, make_plan

__all__ = ["METHODS", "run_apwa", "run_centralised", "run_chain", "run_fixed_map"]

FIXED_MAP_WIDTH = 4


def run_apwa(ex: Executor, decomposition: Decomposition | None = None):
    """Process: manager call, then the plan; returns ``(merged rows, width, depth)``."""
    meta = ex.table.meta()
    if decomposition is None:
        decomposition = auto_decomposition(ex.workload, meta)
    plan = make_plan(ex.workload, meta, decomposition, len(ex.registry.names()))
    outcome, _ = yield ex.be.process(ex.call_with_retries("plan", *plan.manager_tokens))
    if outcome != "ok":
        return np.zeros(0, np.int64), plan.width, plan.depth
    rows = yield ex.be.process(ex.execute(plan))
    return rows, plan.width, plan.depth


def run_fixed_map(ex: Executor, decomposition: Decomposition | None = None):
    """Process: width-4 map, one flat merge, no manager call, no splitting."""
    n = ex.table.num_rows
    d = Decomposition(group_size=math.ceil(n / min(FIXED_MAP_WIDTH, n)), fan_in=None, max_in_flight=None)
    plan = make_plan(ex.workload, ex.table.meta(), d, len(ex.registry.names()))
    ex.split_on_reject = False
    rows = yield ex.be.process(ex.execute(plan))
    return rows, plan.width, plan.depth


def _final_merge(ex: Executor, rows: np.ndarray, out_tokens: int, context: int, segments=None):
    """Process: the last turn that merges answers (``llm`` contracts); returns the rows it kept."""
    c = ex.workload.contract
    if c.merge == "concat" or len(rows) == 0:
        return rows
    prompt, n = context + c.merge_instruction_tokens, min(out_tokens, c.merge_cap_tokens)
    if segments is not None:
        segments = (*segments, (ex.content_id(), c.merge_instruction_tokens))
    outcome, pool = yield ex.be.process(ex.call_with_retries("merge", prompt, n, segments))
    if outcome != "ok":
        return np.zeros(0, np.int64)
    ex.keep(rows, pool, prompt + n)
    return rows


def run_chain(ex: Executor, decomposition: Decomposition | None = None):
    """Process: one fresh-context call per row, in sequence (each sees the previous answer), then a merge."""
    t, c = ex.table, ex.workload.contract
    rows, carry, outs = [], 0, 0
    for k in range(t.num_rows):
        prompt = c.instruction_tokens + int(t.row_tokens[k]) + carry
        o = int(t.output_tokens[k])
        outcome, pool = yield ex.be.process(ex.call_with_retries(c.capability, prompt, o))
        if outcome == "ok":
            ex.keep(np.array([k]), pool, prompt + o)
            rows.append(k)
            carry, outs = o, outs + o
    rows = np.asarray(rows, np.int64)
    kept = yield ex.be.process(_final_merge(ex, rows, outs, outs))
    return kept, t.num_rows, 1


def run_centralised(ex: Executor, decomposition: Decomposition | None = None):
    """Process: one growing conversation over all rows; stops at the first refusal (context too long)."""
    t, c = ex.table, ex.workload.contract
    segs = [(ex.content_id(), c.instruction_tokens)]
    context, rows, outs = c.instruction_tokens, [], 0
    for k in range(t.num_rows):
        d, o = int(t.row_tokens[k]), int(t.output_tokens[k])
        turn = (*segs, (ex.content_id(), d))
        outcome, pool = yield ex.be.process(ex.call_with_retries(c.capability, context + d, o, turn))
        if outcome == "rejected":
            break      # the conversation cannot go on: every later turn is longer still
        if outcome == "ok":
            ex.keep(np.array([k]), pool, context + d + o)
            rows.append(k)
            segs = [*turn, (ex.content_id(), o)]
            context, outs = context + d + o, outs + o
    rows = np.asarray(rows, np.int64)
    kept = yield ex.be.process(_final_merge(ex, rows, outs, context, tuple(segs)))
    return kept, 1, 1


#: name -> process factory ``(executor, decomposition) -> (merged rows, width, depth)``
METHODS = {"apwa": run_apwa, "centralised": run_centralised, "chain": run_chain, "fixed_map": run_fixed_map}
