"""The record of one step in flight, shared by every scheduling path of ``sim.engine.EngineCore``.

``begin`` returns a ``_Plan`` (kept on the engine until ``complete``): a single step (``_SINGLE``, from the
fast or the reference path) or a decode run (``_RUN``, see ``sim.engine_runs``). vLLM has no such object: its
``Scheduler.schedule`` returns a ``SchedulerOutput`` (``vllm/v1/core/sched/output.py``) that the model runner
executes at once; here the step's outcome waits for the SimPy shell to advance time to its end tick.
"""

from __future__ import annotations

from .request import RequestStatus

_SINGLE, _RUN = 0, 1
# enum members as module constants: a class-attribute lookup on an Enum costs ~10x a global lookup
_WAITING, _RUNNING, _PREEMPTED = RequestStatus.WAITING, RequestStatus.RUNNING, RequestStatus.PREEMPTED
_LENGTH_CAPPED = RequestStatus.FINISHED_LENGTH_CAPPED


class _Plan:
    """The step (``_SINGLE``) or decode run (``_RUN``) in flight between ``begin`` and ``complete``.

    ``t0_s`` is ``t0`` in seconds (a big tick count divides slowly: computed once). ``k``, ``k_fin``, ``P``,
    ``g`` and ``used0`` are only set on runs.
    """

    __slots__ = ("kind", "t0", "t0_s", "end", "fast", "sched", "n_dec", "ctx", "k", "k_fin", "P", "g", "used0")

    def __init__(self, kind: int, t0: int, t0_s: float, fast: bool = False):
        self.kind, self.t0, self.t0_s, self.fast = kind, t0, t0_s, fast
        self.sched: list = []
        self.n_dec = self.ctx = 0
