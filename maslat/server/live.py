"""A simulated world that advances in step with the wall clock, inside an asyncio loop.

The world's clock is tied to the event loop's monotonic clock: simulated time ``s`` happens at wall time
``t0 + s * time_scale`` (``time_scale`` < 1 plays the replicas faster than real time). No thread, no
polling: one ``loop.call_at`` timer is armed for the world's next event; when it fires, the world runs up
to the current wall time and the timer is re-armed. Each HTTP request becomes ``world.open_request`` at
the current simulated time, so queues, batching, preemption and KV saturation are the simulated replica's.

Tokens reach clients at the simulated output-batch times: after every completed engine step the world
calls ``_on_step``, which compares each running request's ``num_output_tokens`` with what its client has
been told and wakes its handler. The world runs without decode-run jumps (``jumps=False``) so that every
step is one event at its own boundary; the fast path is bit-identical to the reference algorithm. When
the process cannot keep up (a CPU-bound burst), steps are processed late and their tokens leave in one
write; ``max_lag_s`` reports how late the timer fired at worst.
"""

from __future__ import annotations

import asyncio
from itertools import chain

from sim import RequestStatus

__all__ = ["LiveRequest", "LiveSim"]

_LOOKAHEAD_S = 1e-9  # run a hair past "now" so an event due exactly now is never left for a busy re-arm


class LiveRequest:
    """What one HTTP handler sees of its simulated request."""

    __slots__ = ("req", "seen", "wake", "record")

    def __init__(self, req):
        self.req = req
        self.seen = 0  # output tokens produced so far (published at step boundaries)
        self.wake = asyncio.Event()
        self.record = None  # the RequestRecord once the client-side response is complete

    def _finish(self, ev) -> None:
        self.record = ev.value
        self.seen = max(self.seen, self.record.output_tokens)
        self.wake.set()

    @property
    def finished(self) -> bool:
        return self.record is not None


class LiveSim:
    """Drive ``world`` in real time and hand out ``LiveRequest``s for ``pool``.

    Args:
        world: a fresh world built with ``jumps=False`` and ``keep_records=True``.
        pool: the pool the server fronts.
        time_scale: wall seconds per simulated second (1 = real time, 0.1 = ten times faster).
    """

    def __init__(self, world, pool: str, *, time_scale: float = 1.0):
        if not time_scale > 0:
            raise ValueError(f"time_scale must be positive, got {time_scale!r}")
        if world.jumps:
            raise ValueError("LiveSim needs a world built with jumps=False (one event per engine step)")
        self.world, self.pool, self.time_scale = world, pool, float(time_scale)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._t0 = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self.max_lag_s = 0.0  # worst lateness of the timer (wall seconds)
        self.late_ticks = 0  # timer firings more than 10 ms late
        self.num_open = 0
        world.step_listener = self._on_step

    # ------------------------------------------------------------------ clock
    def start(self) -> None:
        """Tie simulated time 0 to now; call once from inside the running loop."""
        self._loop = asyncio.get_running_loop()
        self._t0 = self._loop.time() - self.world.now * self.time_scale
        self._rearm()

    def sim_now(self) -> float:
        return (self._loop.time() - self._t0) / self.time_scale

    def wall_at(self, sim_s: float) -> float:
        return self._t0 + sim_s * self.time_scale

    def catch_up(self) -> None:
        """Process every simulated event up to the current wall time."""
        until = self.sim_now() + _LOOKAHEAD_S
        if until > self.world.env.now:
            self.world.run(until=until)

    def _rearm(self) -> None:
        nxt = self.world.env.peek()
        if nxt == self._timer_at and self._timer is not None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = nxt
        if nxt != float("inf"):
            self._timer = self._loop.call_at(self.wall_at(nxt), self._tick)

    def _tick(self) -> None:
        lag = self._loop.time() - self.wall_at(self._timer_at)
        self.max_lag_s = max(self.max_lag_s, lag)
        self.late_ticks += lag > 0.01
        self._timer = None
        self._timer_at = float("inf")
        self.catch_up()
        self._rearm()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # ------------------------------------------------------------------ requests
    def open(self, num_prompt_tokens: int, max_tokens: int, *, prompt_segments=None,
             request_id: str | None = None) -> LiveRequest:
        """Submit a request now (the caller has validated it against ``max_model_len``)."""
        self.catch_up()
        req = self.world.open_request(self.pool, num_prompt_tokens, max_tokens, prompt_segments=prompt_segments,
                                      request_id=request_id)
        live = LiveRequest(req)
        req.tag = live
        if req.status == RequestStatus.REJECTED:  # the caller validated; this is a bug if it happens
            raise RuntimeError(f"simulator rejected a validated request: {req.reject_reason}")
        req.on_finish.callbacks.append(live._finish)
        self.num_open += 1
        self._rearm()
        return live

    def abort(self, live: LiveRequest) -> bool:
        """The client went away: free the request's slot (status ``FINISHED_ABORTED``)."""
        if live.finished:
            return False
        self.catch_up()
        ok = self.world.abort(live.req)
        self.catch_up()  # an abort of a request still in the frontend completes at once
        self._rearm()
        return ok

    def _on_step(self, replica, finished) -> None:
        for r in chain(replica.core.running, finished):
            live = r.tag
            if live is not None:
                n = r.num_output_tokens
                if n > live.seen:
                    live.seen = n
                    live.wake.set()
