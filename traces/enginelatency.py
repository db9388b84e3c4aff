"""The engine's own latency sums from ``/metrics``, and the client-side constant they measure.

A client measures TTFT from the moment it sends a request to the first output chunk it reads. The engine core
measures its part of the same interval itself and publishes it as Prometheus histograms whose ``_sum`` series are
exact (the buckets are not needed): per finished request, vLLM v1 (``vllm/v1/metrics/stats.py``,
``IterationStats.update_from_finished_request``; ``vllm/v1/metrics/loggers.py``, ``PrometheusStatLogger``)
observes

* ``vllm:request_queue_time_seconds``   = ``scheduled_ts - queued_ts`` (engine-core clock),
* ``vllm:request_prefill_time_seconds`` = ``first_token_ts - scheduled_ts``,
* ``vllm:request_decode_time_seconds``  = ``last_token_ts - first_token_ts``,
* ``vllm:e2e_request_latency_seconds``  = frontend arrival to finish.

So over the requests of one collection, ``mean(client TTFT) - (sum(queue) + sum(prefill)) / count`` is the mean
time a request spends outside the engine core's clock before its first token reaches the client: HTTP, the API
server's frontend, the stream's delivery, and the wait for the step in flight when it arrived (the engine core
adds new requests only between steps). Less that wait (which the simulator models itself; ``client_offset``
takes it from a reconstruction), it is exactly the client-side constant
(``overheads.frontend_s``) that a fit on client-side TTFTs can only estimate jointly with the prefill cost, and
on queued CPU runs cannot separate from it (``traces.stepfit``). The collector (``traces.collect``) records the
sums' growth over the run in ``meta.json`` (``collector.engine_latency``); ``client_offset`` turns them into the
engine's mean TTFT (``engine_ttft``), or says why not (no such series, counts that do not match the run's
requests, a restart).
"""

from __future__ import annotations

import math
import re

import numpy as np

__all__ = ["ENGINE_HISTOGRAMS", "client_offset", "engine_phase_sums",
           "engine_phase_sums_per_engine", "engine_ttft", "histogram_sums", "histogram_sums_by_engine",
           "latency_deltas", "per_engine_deltas", "pooled_offset",
           "run_engine_ttfts"]

#: key in ``meta.json`` -> the vLLM v1 histogram (``vllm/v1/metrics/loggers.py``)
ENGINE_HISTOGRAMS = {"queue_s": "vllm:request_queue_time_seconds", "prefill_s": "vllm:request_prefill_time_seconds",
                     "decode_s": "vllm:request_decode_time_seconds", "e2e_s": "vllm:e2e_request_latency_seconds",
                     "ttft_s": "vllm:time_to_first_token_seconds"}


def _histogram_values(text: str):
    """``(key, 0 for _sum | 1 for _count, engine label or None, value)`` of every ``ENGINE_HISTOGRAMS`` series."""
    want = {f"{name}{part}": (key, i) for key, name in ENGINE_HISTOGRAMS.items()
            for i, part in enumerate(("_sum", "_count"))}
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        head, _, value = line.rpartition(" ")
        hit = want.get(head.split("{", 1)[0])
        if hit is None:
            continue
        try:
            v = float(value)
        except ValueError:
            continue
        m = _ENGINE_LABEL.search(head)
        yield hit[0], hit[1], (m.group(1) if m else None), v


_ENGINE_LABEL = re.compile(r'[{,]engine="([^"]*)"')


def _finite(acc: dict[str, list[float]]) -> dict[str, tuple[float, float]]:
    return {k: (s, c) for k, (s, c) in acc.items() if math.isfinite(s) and math.isfinite(c)}


def histogram_sums(text: str) -> dict[str, tuple[float, float]]:
    """``key -> (sum, count)`` of every ``ENGINE_HISTOGRAMS`` series on a ``/metrics`` page, summed over its
    label sets (engines, models); keys whose series are absent are left out."""
    acc: dict[str, list[float]] = {}
    for key, i, _, v in _histogram_values(text):
        acc.setdefault(key, [0.0, 0.0])[i] += v
    return _finite(acc)


def histogram_sums_by_engine(text: str) -> dict[str, dict[str, tuple[float, float]]]:
    """``engine label -> histogram_sums`` of that engine's series (summed over its other labels): a
    data-parallel vLLM labels every engine core's series ``engine="<DP rank>"``. Series without the label are
    left out; a page without any gives ``{}``."""
    acc: dict[str, dict[str, list[float]]] = {}
    for key, i, engine, v in _histogram_values(text):
        if engine is not None:
            acc.setdefault(engine, {}).setdefault(key, [0.0, 0.0])[i] += v
    return {e: _finite(a) for e, a in acc.items()}


def latency_deltas(first: dict[str, tuple[float, float]],
                   last: dict[str, tuple[float, float]]) -> dict[str, dict[str, float]]:
    """The growth of each histogram between two scrapes: ``key -> {"sum_s", "count"}`` (keys in both)."""
    return {k: {"sum_s": last[k][0] - first[k][0], "count": last[k][1] - first[k][1]} for k in first if k in last}


def per_engine_deltas(first: dict[str, dict[str, tuple[float, float]]],
                      last: dict[str, dict[str, tuple[float, float]]]) -> dict[str, dict[str, dict[str, float]]]:
    """``latency_deltas`` per engine label (labels in both scrapes)."""
    return {e: latency_deltas(first[e], last[e]) for e in sorted(first, key=lambda e: (len(e), e)) if e in last}


def engine_ttft(meta_collector: dict | None, *, num_requests: int) -> tuple[float | None, str]:
    """The engine core's own mean TTFT (queue + prefill) over a client-side run's requests, from its latency sums.

    Args:
        meta_collector: the run's ``meta.json`` ``collector`` section.
        num_requests: the run's completed requests (the histograms must have counted exactly these).

    Returns:
        ``(mean_s, how)``, or ``(None, why not)``.
    """
    el = (meta_collector or {}).get("engine_latency")
    if not el:
        return None, ("the run records no engine latency sums (collector.engine_latency: a collector older than "
                      "this one, or a server without vllm:request_queue_time_seconds / "
                      "vllm:request_prefill_time_seconds)")
    if (meta_collector or {}).get("counter_resets"):
        return None, "the server restarted during the run (its latency sums started again)"
    q, p = el.get("queue_s"), el.get("prefill_s")
    if not q or not p:
        return None, "collector.engine_latency lacks queue_s or prefill_s"
    if not (q["count"] == p["count"] == num_requests):
        return None, (f"the engine's latency histograms counted {q['count']:g} / {p['count']:g} requests during the "
                      f"run, not its {num_requests} completed ones (other traffic on the server?)")
    mean = (q["sum_s"] + p["sum_s"]) / num_requests
    return mean, (f"(vllm:request_queue_time_seconds + vllm:request_prefill_time_seconds sums) / {num_requests} = "
                  f"{1e3 * mean:.2f} ms")


def engine_phase_sums(meta_collector: dict | None, *, num_requests: int) -> dict[str, float] | None:
    """The engine core's own summed prefill and decode times over a client-side run's requests (``{"prefill_s",
    "decode_s"}``, seconds), or ``None`` when the run does not record both over exactly its ``num_requests``
    completed requests (or the server restarted). Per request, vLLM observes ``first_token_ts - scheduled_ts`` and
    ``last_token_ts - first_token_ts`` on the engine core's clock (module docstring): each is a sum of whole engine
    steps, untouched by how late the server delivered the tokens to the client (``traces.stepfit`` fits them)."""
    el = (meta_collector or {}).get("engine_latency")
    if not el or (meta_collector or {}).get("counter_resets"):
        return None
    p, d = el.get("prefill_s"), el.get("decode_s")
    if not p or not d or not (p["count"] == d["count"] == num_requests):
        return None
    return {"prefill_s": float(p["sum_s"]), "decode_s": float(d["sum_s"])}


def engine_phase_sums_per_engine(meta_collector: dict | None, *, num_requests: int,
                                 num_engines: int) -> list[dict[str, float]] | None:
    """Per data-parallel engine (DP rank 0..``num_engines``-1), its own summed prefill and decode times and the
    requests its histograms counted (``{"prefill_s", "decode_s", "count"}``), from ``collector.
    engine_latency_per_engine`` (``maslat collect``: vLLM labels each engine core's series ``engine="<rank>"``);
    ``None`` unless every engine is there, each counted its prefill and decode alike, their counts add up to the
    run's ``num_requests`` completed requests, and the server did not restart (``engine_phase_sums``)."""
    per = (meta_collector or {}).get("engine_latency_per_engine")
    if not per or (meta_collector or {}).get("counter_resets") or set(per) != {str(i) for i in range(num_engines)}:
        return None
    out = []
    for i in range(num_engines):
        p, d = per[str(i)].get("prefill_s"), per[str(i)].get("decode_s")
        if not p or not d or p["count"] != d["count"]:
            return None
        out.append({"prefill_s": float(p["sum_s"]), "decode_s": float(d["sum_s"]), "count": float(p["count"])})
    return out if sum(e["count"] for e in out) == num_requests else None


def client_offset(client_ttft_s: np.ndarray, engine_ttft_s: float, step_wait_s: np.ndarray) -> float:
    """The client-side constant: the mean client TTFT less the engine core's mean TTFT and less the mean wait
    from a request's arrival to the start of the next engine step (``step_wait_s``, from a reconstruction).

    vLLM's engine core takes new requests from its input queue only between steps and stamps ``queued_ts`` then
    (``vllm/v1/engine/core.py``, ``EngineCoreProc.run_busy_loop`` -> ``_process_input_queue``;
    ``vllm/v1/core/sched/scheduler.py``, ``Scheduler.add_request`` records ``EngineCoreEventType.QUEUED``), so the
    time a request spends waiting for the step in flight is in neither the engine's sums nor the constant: the
    simulator models it (a request arriving during a step is scheduled at the next one). Never negative.
    """
    return max(0.0, float(np.mean(client_ttft_s)) - engine_ttft_s - float(np.mean(step_wait_s)))


def run_engine_ttfts(runs) -> dict[str, tuple[float | None, str]]:
    """Per client-side ``traces.runs.MeasuredRun``, its engine-core mean TTFT (``engine_ttft``) or ``None`` and why
    not; when any client-side run lacks it, every value is ``None`` (the constant is then fitted for all, one
    unknown shared by every client-side row, rather than measured for some and fitted for others)."""
    out = {r.name: engine_ttft(r.meta.extra.get("collector"), num_requests=len(r)) for r in runs if r.client_side}
    if any(v is None for v, _ in out.values()):
        out = {k: (None, h) for k, (_, h) in out.items()}
    return out


def pooled_offset(runs, measured_offsets_s: dict[str, float | None]) -> float | None:
    """The request-weighted mean of the runs' measured client-side constants (the profile has one
    ``frontend_s``), when every client-side run has one."""
    vals = [(measured_offsets_s.get(r.name), len(r)) for r in runs if r.client_side]
    if not vals or any(v is None for v, _ in vals):
        return None
    return sum(v * n for v, n in vals) / sum(n for _, n in vals)


#: measured client-side constants of one calibration's runs may differ by this much before they are distrusted
OFFSET_AGREEMENT_S = 0.1


def offsets_disagree(measured_offsets_s: dict[str, float | None]) -> str | None:
    """Why the runs' measured client-side constants cannot be used, or ``None`` when they can.

    The constant (frontend, HTTP) does not depend on load, so runs of one server measure it alike (the real CPU
    engine: 28 and 33 ms at two loads). When they differ by more than ``max(OFFSET_AGREEMENT_S, half the
    largest)``, the engine's sums do not cover what the client waited for (a server whose engine lags the wall
    clock, a proxy queueing in front of it) and the constant must be fitted instead."""
    vals = {k: v for k, v in measured_offsets_s.items() if v is not None}
    if vals and not any(vals.values()):
        return ("every run's measured client-side constant is <= 0 (clamped): the server's latency sums include "
                "waits the client did not see (a server that stamps QUEUED on arrival rather than at the next step, "
                "as vLLM does), so it is fitted")
    if len(vals) < 2:
        return None
    lo, hi = min(vals.values()), max(vals.values())
    if hi - lo <= max(OFFSET_AGREEMENT_S, 0.5 * hi):
        return None
    return ("the runs' measured client-side constants disagree (" + ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in
            vals.items()) + "): the engine's latency sums do not cover what the client waited for, so it is fitted")
