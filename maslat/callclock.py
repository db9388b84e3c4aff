"""Where a validation's call seconds went: the client's clock next to the engine core's, live and simulated.

``maslat validate-policy`` compares critical-path seconds, which mix three things: the engine's speed (its queue,
prefill and decode phases), the serving path around it (HTTP, the API server, tokens the server hands to the client
late: ``traces.delivery``) and the policy's own work between calls. This module sums, over every LLM call of the
run, the client's seconds (send to the end of the response) and the engine core's phases:

* **live**, from the growth of the server's own latency histograms over the run (``traces.enginelatency``:
  ``vllm:request_queue_time_seconds``, ``..._prefill_...``, ``..._decode_...``, ``vllm:e2e_request_latency_seconds``;
  vLLM v1 ``vllm/v1/metrics/loggers.py``), which the server's delivery to the client does not touch;
* **simulated**, from each call's request in the simulator (``queued_ts`` .. ``last_token_ts``).

The simulator's error on each phase sum says whether a critical-path miss is the engine's speed (the profile's step
times against the engine as it ran during the validation) or the path around it (``serving_s_per_call``: client
seconds less the engine phases, per call; the simulator's is ``overheads.frontend_s`` and its post-decode terms).
Measured against the real vLLM CPU engine (2026-12-03, ``tests/test_real_vllm.py``), the engine phases decided it:
the decode sum was off by as much as the critical paths, and the path around the engine cost 0.09-0.12 s per call
against the simulator's 0.04 s, about 1 % of a call.

The live sums are reported only when the histograms counted exactly the run's calls (no other traffic on the
server); otherwise ``engine`` says why not.
"""

from __future__ import annotations

import urllib.request
from typing import Any

from envs.backend import SimBackend
from traces.enginelatency import histogram_sums, latency_deltas

from .livebackend import LiveBackend

__all__ = ["PHASES", "CallTally", "TalliedLiveBackend", "TalliedSimBackend", "call_clock", "scrape_sums"]

#: the engine core's phases of a request (keys of ``traces.enginelatency.ENGINE_HISTOGRAMS``)
PHASES = ("queue_s", "prefill_s", "decode_s")


class CallTally:
    """Sums over served calls: count, client seconds and (simulated side) the engine phases."""

    def __init__(self) -> None:
        self.calls, self.client_s = 0, 0.0
        self.phases = dict.fromkeys(PHASES, 0.0)

    def add(self, client_s: float, phases: dict[str, float] | None = None) -> None:
        self.calls += 1
        self.client_s += client_s
        for k, v in (phases or {}).items():
            self.phases[k] += v


class TalliedSimBackend(SimBackend):
    """``SimBackend`` that tallies every served call's client seconds and engine phases (``CallTally``)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.tally = CallTally()

    def submit(self, pool: str, prompt_tokens: int, max_tokens: int, prompt_segments) -> Any:
        ev, sent = super().submit(pool, prompt_tokens, max_tokens, prompt_segments), self.world.env.now

        def done(e) -> None:
            r = e.value
            if getattr(r, "reject_reason", None) is None:
                q, s = _ts(r, "queued"), _ts(r, "scheduled")
                f, last = _ts(r, "first_token"), _ts(r, "last_token")
                self.tally.add(self.world.env.now - sent, {"queue_s": s - q, "prefill_s": f - s, "decode_s": last - f})

        ev.callbacks.append(done)
        return ev


def _ts(r, name: str) -> float:
    """A request's timestamp (``sim.Request``: ``*_ts``; ``sim.RequestRecord``: ``*_s``)."""
    v = getattr(r, f"{name}_ts", None)
    return float(v if v is not None else getattr(r, f"{name}_s"))


class TalliedLiveBackend(LiveBackend):
    """``LiveBackend`` that tallies every served call's client seconds (server clock)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.tally = CallTally()

    def submit(self, pool: str, prompt_tokens: int, max_tokens: int, prompt_segments) -> Any:
        task = super().submit(pool, prompt_tokens, max_tokens, prompt_segments)

        def done(t) -> None:
            if not t.cancelled() and t.exception() is None and t.result().reject_reason is None:
                self.tally.add(t.result().latency_s / (self.time_scale or 1.0))

        task.add_done_callback(done)
        return task


def scrape_sums(url: str, timeout_s: float = 10.0) -> dict[str, tuple[float, float]] | None:
    """The engine latency histograms' ``(sum, count)`` on the Prometheus page ``url``; ``None`` when unreachable."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:  # noqa: S310 (the user's own endpoint)
            return histogram_sums(r.read().decode("utf-8", "replace"))
    except (OSError, ValueError):
        return None


def call_clock(live: CallTally, before: dict | None, after: dict | None, simulated: CallTally) -> dict:
    """The ``call_clock`` block of ``maslat validate-policy --json`` (module docstring); ``before`` and ``after``
    are ``scrape_sums`` of the server's page around the live run (its own seconds, as the stand-in's are)."""
    sim = {"calls": simulated.calls, "client_s": simulated.client_s, **simulated.phases,
           "serving_s_per_call": _per_call(simulated.client_s - sum(simulated.phases.values()), simulated.calls)}
    out = {"live": {"calls": live.calls, "client_s": live.client_s}, "simulated": sim, "error_pct": {
        "client_s": _pct(simulated.client_s, live.client_s)}}
    if before is None or after is None:
        out["engine"] = "the server's /metrics could not be read before and after the run"
        return out
    d = latency_deltas(before, after)
    missing = [k for k in PHASES if k not in d]
    if missing:
        out["engine"] = f"the server's /metrics has no {', '.join(missing)} histogram (traces.enginelatency)"
        return out
    if any(d[k]["count"] != live.calls for k in PHASES):
        out["engine"] = (f"the server counted {d['decode_s']['count']:g} requests during the run, not its "
                         f"{live.calls} served calls (other traffic, or failed calls): no engine sums")
        return out
    eng = {k: d[k]["sum_s"] for k in PHASES}
    out["engine"] = "measured"
    out["live"].update(eng, serving_s_per_call=_per_call(live.client_s - sum(eng.values()), live.calls))
    if "e2e_s" in d:
        out["live"]["server_e2e_s"] = d["e2e_s"]["sum_s"]
    out["error_pct"].update({k: _pct(simulated.phases[k], eng[k]) for k in PHASES})
    return out


def _per_call(x: float, n: int) -> float | None:
    return x / n if n else None


def _pct(sim: float, live: float) -> float | None:
    return 100.0 * (sim - live) / live if live else None
