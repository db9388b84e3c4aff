"""The SimPy event loop: ``SimEnv``, absolute-time callbacks (``_Tick``) and the SimPy version pin.

The shell only advances time, and at a million requests its event loop is a large part of the cost. ``SimEnv``
is a ``simpy.Environment`` that can schedule at an absolute time without float round-off (a step boundary is
an integer tick count converted once) and runs plain callbacks (``_Tick``: a replica's step boundary, the
sampler) straight off SimPy's heap, without building an ``Event`` and walking its callback list. Because it
reads and writes SimPy internals, construction checks the installed release against ``SIMPY_TESTED``.

``LATE`` is the priority of step boundaries: after SimPy's ``URGENT`` and ``NORMAL`` events at the same
instant, so that requests arriving at that instant are queued before the engine schedules, as in vLLM's busy
loop (``vllm/v1/engine/core.py``, ``EngineCoreProc.run_busy_loop``: inputs are drained before each step).
"""

from __future__ import annotations

from heapq import heappop, heappush

import simpy
from simpy.core import EmptySchedule, StopSimulation
from simpy.events import URGENT

__all__ = ["LATE", "SIMPY_TESTED", "SimEnv", "check_simpy_version"]

LATE = 2  # after simpy's URGENT (0) and NORMAL (1) events at the same instant


class _Tick:
    """A pre-triggered event with one callback, run by ``SimEnv.step`` without SimPy's callback list.

    ``gen`` lets a replica ignore a boundary superseded by a truncation.
    """

    __slots__ = ("fn", "gen")

    def __init__(self, fn, gen: int = 0):
        self.fn = fn
        self.gen = gen


#: SimPy releases ``SimEnv`` was checked against (``tests/test_simenv.py`` compares event orders with plain
#: ``simpy.Environment``): it reads and writes SimPy's private ``_queue``, ``_now``, ``_eid``, ``Event._ok`` and
#: ``_value``, and re-implements ``Environment.run``. Keep ``pyproject.toml``'s simpy pin the same.
SIMPY_TESTED = ((4, 1), (4, 2))  # >= 4.1, < 4.2
_simpy_checked = False


def check_simpy_version(version: str) -> None:
    """Raise if ``version`` lies outside ``SIMPY_TESTED``, naming the range and what to do."""
    lo, hi = SIMPY_TESTED
    parts = version.split(".")
    try:
        major_minor = (int(parts[0]), int(parts[1]))
    except (ValueError, IndexError):
        major_minor = None
    if major_minor is None or not lo <= major_minor < hi:
        raise RuntimeError(
            f"simpy {version} is installed, but sim.SimEnv relies on SimPy internals tested only with simpy "
            f">={lo[0]}.{lo[1]},<{hi[0]}.{hi[1]}: install that (pip install 'simpy>={lo[0]}.{lo[1]},"
            f"<{hi[0]}.{hi[1]}'), or re-run tests/test_simenv.py on {version} and widen sim.simenv.SIMPY_TESTED")


class SimEnv(simpy.Environment):
    """A SimPy environment that can schedule at an absolute time without float round-off.

    Plain callbacks (``call_at``, replica step boundaries) are queue entries holding a ``_Tick``; ``step``
    calls them directly, which is what SimPy would do for a triggered event with one callback and no
    failure, without building and walking a callback list. Construction fails on a SimPy release outside
    ``SIMPY_TESTED``.
    """

    def __init__(self, initial_time: float = 0) -> None:
        global _simpy_checked
        if not _simpy_checked:
            check_simpy_version(simpy.__version__)
            _simpy_checked = True
        super().__init__(initial_time)

    def schedule_at(self, event, t: float, priority: int = 1) -> None:
        if t < self._now:
            raise ValueError(f"cannot schedule at {t} before now={self._now}")
        heappush(self._queue, (t, priority, next(self._eid), event))

    def call_at(self, t: float, fn, priority: int = 1) -> None:
        """Call ``fn(event)`` at simulated time ``t``."""
        heappush(self._queue, (t, priority, next(self._eid), _Tick(fn)))

    def call_again(self, tick: _Tick, t: float, priority: int = 1) -> None:
        """Call a tick that has just fired (the ``event`` its function got) once more, at time ``t``."""
        heappush(self._queue, (t, priority, next(self._eid), tick))

    def step(self) -> None:
        queue = self._queue
        if queue and queue[0][3].__class__ is _Tick:
            self._now, _, _, tick = heappop(queue)
            tick.fn(tick)
        else:
            super().step()

    def run(self, until: float | simpy.Event | None = None):
        """``simpy.Environment.run`` (SimPy 4.1, same semantics) with ``step`` inlined: one Python call less
        per event, and the ``_Tick`` fast path."""
        if until is not None:
            if not isinstance(until, simpy.Event):
                at = until if isinstance(until, int) else float(until)
                if at <= self._now:
                    raise ValueError(f"until ({at}) must be greater than the current simulation time")
                until = simpy.Event(self)
                until._ok, until._value = True, None
                self.schedule(until, URGENT, at - self._now)
            elif until.callbacks is None:
                return until.value  # already processed
            until.callbacks.append(StopSimulation.callback)
        queue, env_step = self._queue, simpy.Environment.step
        try:
            while True:
                if queue and queue[0][3].__class__ is _Tick:
                    self._now, _, _, tick = heappop(queue)
                    tick.fn(tick)
                else:
                    env_step(self)
        except StopSimulation as exc:
            return exc.args[0]  # == until.value
        except EmptySchedule:
            if until is not None:
                assert not until.triggered
                raise RuntimeError(
                    f'No scheduled events left but "until" event was not triggered: {until}') from None
        return None
