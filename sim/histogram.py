"""Cumulative-bucket histograms with vLLM's bucket bounds (``vllm/v1/metrics/loggers.py``)."""

from __future__ import annotations

import math
from bisect import bisect_left

__all__ = ["Histogram", "TTFT_BUCKETS_S", "ITL_BUCKETS_S", "REQUEST_LATENCY_BUCKETS_S", "token_buckets"]

TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                  20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS_S = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0)
REQUEST_LATENCY_BUCKETS_S = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                             120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


def token_buckets(max_value: int) -> tuple[float, ...]:
    """vLLM's 1-2-5 series up to ``max_value`` (``build_1_2_5_buckets``)."""
    out, exp = [], 0
    while True:
        for m in (1, 2, 5):
            v = m * 10**exp
            if v > max_value:
                return tuple(float(x) for x in out)
            out.append(v)
        exp += 1


class Histogram:
    """Counts per bucket (``value <= bound``), plus +Inf, sum and count."""

    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float, weight: int = 1) -> None:
        self.counts[bisect_left(self.bounds, value)] += weight
        self.sum += value * weight
        self.count += weight

    def observe_linear(self, first: float, step: float, n: int, weight: int = 1) -> None:
        """Observe ``first + step*j`` for j in 0..n-1, each ``weight`` times, in O(buckets crossed)."""
        if n <= 0:
            return
        bounds, counts = self.bounds, self.counts
        last = first + step * (n - 1)
        i = bisect_left(bounds, first)
        k = bisect_left(bounds, last)
        if i == k or step <= 0:
            counts[i] += n * weight
        else:
            done = 0  # values placed so far: those <= bounds[i - 1]
            for b in bounds[i:k]:
                upto = min(n, max(done, math.floor((b - first) / step) + 1))
                while upto < n and first + step * upto <= b:  # settle float round-off at the bound
                    upto += 1
                while upto > done and first + step * (upto - 1) > b:
                    upto -= 1
                counts[i] += (upto - done) * weight
                done = upto
                i += 1
            counts[k] += (n - done) * weight
        self.sum += weight * (n * first + step * n * (n - 1) / 2)
        self.count += weight * n

    def observe_array(self, values) -> None:
        """Observe every value of a numpy array (NaNs must be filtered out first)."""
        import numpy as np

        v = np.asarray(values, dtype=np.float64)
        if not len(v):
            return
        idx = np.searchsorted(np.asarray(self.bounds), v, side="left")  # == bisect_left, value <= bound
        for i, c in enumerate(np.bincount(idx, minlength=len(self.counts)).tolist()):
            self.counts[i] += c
        self.sum += float(v.sum())
        self.count += len(v)

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper_bound, cumulative count)`` including ``+Inf``."""
        out, acc = [], 0
        for b, c in zip((*self.bounds, math.inf), self.counts, strict=True):
            acc += c
            out.append((b, acc))
        return out
