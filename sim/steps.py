"""The public per-step record of an engine, mirroring ``vllm/v1/core/sched/output.py`` (``SchedulerOutput``).

``EngineCore.step_records`` (``None`` by default: recording costs a pass over the running requests per step)
collects one ``StepRecord`` per engine step when set to a list, in every engine mode: a decode run jumped in
closed form is written as the k steps it stands for, so the three modes give identical lists.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["StepRecord"]


@dataclass(frozen=True, slots=True, kw_only=True)
class StepRecord:
    """One engine step: what the scheduler gave each request, who was preempted, who finished.

    ``num_scheduled_tokens`` is vLLM's ``SchedulerOutput.num_scheduled_tokens`` (a dict there), as
    ``(request_id, tokens)`` pairs in schedule order: the running requests in admission order, then the ones
    admitted this step. A *decode* token is one scheduled to a request that has sampled at least one output
    token and has computed all but its last token; every other token is a *prefill* token (prompt chunks,
    and the recomputation of a preempted request's prompt and outputs). ``preempted_req_ids`` are in
    preemption order (newest admitted first, vLLM's ``_preempt_request`` order); ``finished_req_ids`` are
    sorted (vLLM keeps a set).
    """

    step: int  # 0-based index among the engine's steps (``EngineCore.num_steps`` before it)
    start_s: float
    end_s: float
    num_scheduled_tokens: tuple[tuple[str, int], ...]
    num_prefill_tokens: int
    num_decode_tokens: int
    preempted_req_ids: tuple[str, ...]
    finished_req_ids: tuple[str, ...]

    @property
    def total_num_scheduled_tokens(self) -> int:
        """``SchedulerOutput.total_num_scheduled_tokens``: never above ``max_num_batched_tokens``."""
        return self.num_prefill_tokens + self.num_decode_tokens


def scheduled_tokens(running, sched) -> tuple[tuple[tuple[str, int], ...], int, int]:
    """``(num_scheduled_tokens, prefill tokens, decode tokens)`` of a step just planned by ``EngineCore``.

    ``running``: the engine's running requests (admission order, this step's admissions last); ``sched``: the
    plan's ``(request, tokens, computed before)`` entries. A request absent from ``sched`` is scheduled one
    token when it decodes inside the engine's aggregate (the fast path schedules those implicitly), else none
    (the token budget ran out before it).
    """
    given = {r: (n, c) for r, n, c in sched}
    pairs, prefill, decode = [], 0, 0
    for r in running:
        entry = given.get(r)
        if entry is None:
            if not r._is_decoding:
                continue
            n, is_decode = 1, True
        else:
            n, c = entry
            is_decode = n == 1 and r._num_output_tokens >= 1 and c == r.num_prompt_tokens + r._num_output_tokens - 1
        pairs.append((r.request_id, n))
        if is_decode:
            decode += n
        else:
            prefill += n
    return tuple(pairs), prefill, decode
