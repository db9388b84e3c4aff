"""Plausibility of a measured run as a whole: what a line-by-line check cannot see.

A line of ``requests.jsonl`` can be well-formed and still wrong: one ``queued_ts: -5`` among values near 27,500
moves the replay's origin by 7.6 hours, a ``last_token_ts`` a day late makes one request's E2E a day, a gauge
``running = 1e300`` passes every type check. ``traces.runs.read_run`` runs these checks after the line checks;
each finding names the line and the field, and is refused (or skipped and counted with ``skip_bad``).

Checks (bounds are stated in the messages):

* **The clocks agree.** ``arrival_time`` (wall clock, API frontend) and ``queued_ts`` (monotonic, engine core)
  are read at nearly the same moment, so ``arrival_time - queued_ts`` is nearly the same for every request (the
  frontend's delay varies it by milliseconds to seconds). A request whose offset is more than
  ``60 s + 10 %`` of the run's arrival window away from the median has a ``queued_ts`` from another clock.
* **Inside the run's window.** ``arrival_time`` between ``started_at`` and ``finished_at`` (when recorded), and
  every request's last token (``arrival_time + last_token_ts - queued_ts``) before ``finished_at``; the slack is
  ``60 s + 5 %`` of the window. Without ``finished_at``, a request may not end more than ``max(1 h, 10 x`` the
  arrival window) after the last arrival. A run whose requests all have one and the same timestamp is refused.
* **Gauges within the engine's limits.** ``running`` at most ``max_num_seqs`` x data-parallel engines (vLLM's
  scheduler never runs more); throughputs at most ``max_num_batched_tokens`` x engines x 10,000 steps per second
  (no engine step takes less than 100 us); ``t`` inside the run's window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import INT32_MAX

__all__ = ["RunBounds", "request_problems", "run_bounds", "tick_problem"]

#: slack of the clock-agreement check: seconds, and fraction of the arrival window
CLOCK_SLACK_S, CLOCK_SLACK_FRACTION = 60.0, 0.10
#: slack of the window check: seconds, and fraction of the window
WINDOW_SLACK_S, WINDOW_SLACK_FRACTION = 60.0, 0.05
#: an engine step takes at least this long (a forward pass and its launch overheads)
MIN_STEP_S = 1e-4


@dataclass(frozen=True, slots=True, kw_only=True)
class RunBounds:
    """What the run's ``meta.json`` implies about its lines (``None``: not recorded, not checked)."""

    started_s: float | None = None
    finished_s: float | None = None
    tick_seconds: float = 1.0
    max_running: int | None = None
    max_tokens_per_tick: float | None = None

    @property
    def window_slack_s(self) -> float:
        span = 0.0 if self.started_s is None or self.finished_s is None else self.finished_s - self.started_s
        return WINDOW_SLACK_S + WINDOW_SLACK_FRACTION * max(span, 0.0)


def run_bounds(meta, engine) -> RunBounds:
    """The bounds of a run from its ``RunMeta`` and ``EngineSettings``."""
    ek = meta.engine_kwargs
    dp = ek.get("data_parallel_size")
    if not (isinstance(dp, int) and not isinstance(dp, bool) and 1 <= dp <= 65536):
        per_engine = (meta.kv_cache or {}).get("num_gpu_blocks_per_engine")
        dp = len(per_engine) if isinstance(per_engine, dict) and per_engine else 1
    return RunBounds(started_s=meta.started_at_epoch_s, finished_s=meta.finished_at_epoch_s,
                     tick_seconds=meta.tick_seconds, max_running=engine.max_num_seqs * dp,
                     max_tokens_per_tick=engine.max_num_batched_tokens * dp * meta.tick_seconds / MIN_STEP_S)


def tick_problem(vals: list[float], bounds: RunBounds) -> tuple[str | None, str | None]:
    """``(column, problem)`` of an implausible tick (values already finite or nan, >= 0), or ``(None, None)``."""
    t, prompt, gen, running, waiting = vals[:5]
    if bounds.started_s is not None and bounds.finished_s is not None:
        end = bounds.finished_s - bounds.started_s + bounds.window_slack_s + bounds.tick_seconds
        if t * bounds.tick_seconds > end:
            return "t", (f"tick {t!r} ({t * bounds.tick_seconds:g} s) is after the run's end (finished_at is "
                         f"{bounds.finished_s - bounds.started_s:g} s after started_at); expected ticks inside the run")
    if bounds.max_running is not None and running > bounds.max_running:
        return "running", (f"{running!r} requests running is more than the engine's max_num_seqs x engines "
                           f"({bounds.max_running}); vLLM's scheduler never runs more")
    if waiting > INT32_MAX:
        return "waiting", f"{waiting!r} waiting requests is no queue length (expected at most {INT32_MAX:,})"
    if bounds.max_tokens_per_tick is not None:
        for name, v in (("prompt_throughput", prompt), ("gen_throughput", gen)):
            if v > bounds.max_tokens_per_tick:
                return name, (f"{v!r} tokens per tick is more than max_num_batched_tokens x engines at "
                              f"{1 / MIN_STEP_S:,.0f} steps per second ({bounds.max_tokens_per_tick:.4g})")
    return None, None


def request_problems(rows: list[dict], bounds: RunBounds) -> tuple[str | None, list[tuple[int, str, str]]]:
    """``(whole-run problem, [(row index, field, problem), ...])`` of well-formed request rows."""
    if not rows:
        return None, []
    q = np.array([r["queued_ts"] for r in rows], np.float64)
    last = np.array([r["last_token_ts"] for r in rows], np.float64)
    arr = np.array([r["arrival_time"] for r in rows], np.float64)
    if len(rows) > 1 and last.max() == q.min():
        return (f"every request has the same timestamps ({float(q.min())!r}): the run spans 0 s, which no engine "
                "serves in; expected measured times"), []
    found: dict[int, tuple[str, str]] = {}
    lo, hi = np.percentile(arr, [10, 90])
    arrival_window = (hi - lo) / 0.8 if len(rows) > 4 else arr.max() - arr.min()
    _arrivals_in_window(arr, bounds, found)
    off = arr - q
    med = float(np.median(off))
    tol = CLOCK_SLACK_S + CLOCK_SLACK_FRACTION * arrival_window
    for i in np.flatnonzero(np.abs(off - med) > tol):
        if int(i) not in found:
            found[int(i)] = ("queued_ts", f"{float(q[i])!r} is {abs(off[i] - med):.4g} s away from where the other "
                                          f"requests put the engine clock (arrival_time - queued_ts = {off[i]:.6g} "
                                          f"s, median {med:.6g} s); expected within {tol:.4g} s: a timestamp from "
                                          "another clock?")
    _ends_in_window(arr, last - q, bounds, arrival_window, found)
    return None, sorted((i, f, p) for i, (f, p) in found.items())


def _arrivals_in_window(arr: np.ndarray, bounds: RunBounds, found: dict[int, tuple[str, str]]) -> None:
    slack = bounds.window_slack_s
    start, end = bounds.started_s, bounds.finished_s
    for i in range(len(arr)):
        if start is not None and arr[i] < start - slack:
            found[i] = ("arrival_time", f"{float(arr[i])!r} is {start - arr[i]:.4g} s before started_at; expected within "
                                        f"the run's window (slack {slack:.4g} s)")
        elif end is not None and arr[i] > end + slack:
            found[i] = ("arrival_time", f"{float(arr[i])!r} is {arr[i] - end:.4g} s after finished_at; expected within "
                                        f"the run's window (slack {slack:.4g} s)")


def _ends_in_window(arr: np.ndarray, e2e: np.ndarray, bounds: RunBounds, arrival_window: float,
                    found: dict[int, tuple[str, str]]) -> None:
    slack, end = bounds.window_slack_s, bounds.finished_s
    done = arr + e2e
    if end is not None:
        limit, what = end + slack, f"finished_at (slack {slack:.4g} s)"
    else:
        good = np.array([i not in found for i in range(len(arr))])
        last_arrival = float(arr[good].max()) if good.any() else float(arr.max())
        limit = last_arrival + max(3600.0, 10.0 * arrival_window)
        what = "the last arrival + max(1 h, 10 x the arrival window) (the run records no finished_at)"
    for i in np.flatnonzero(done > limit):
        if int(i) not in found and math.isfinite(done[i]):
            found[int(i)] = ("last_token_ts", f"puts the request's end {done[i] - limit:.4g} s after {what} "
                                              f"(E2E {e2e[i]:.6g} s); expected inside the run's window")
