"""Prometheus text exposition of ``sim.metrics.MetricsBook`` with ``prometheus_client``.

A custom collector turns the book's time-free metric families into ``prometheus_client`` families and
``generate_latest`` writes the text, exactly as vLLM's ``/metrics`` does (text format 0.0.4). The
stand-in adds series of its own, which vLLM tooling ignores: ``maslat:time_scale`` (wall seconds per
simulated second), so a collector can tell that latencies in this text are in simulated seconds, and
``maslat:max_lag_seconds`` / ``maslat:late_ticks_total``, which say whether the process kept up with the
wall clock (if not, client-side timings are stretched by the lag).
"""

from __future__ import annotations

import math

__all__ = ["CONTENT_TYPE", "MetricsExporter"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _le(bound: float) -> str:
    from prometheus_client.utils import floatToGoString

    return "+Inf" if math.isinf(bound) else floatToGoString(bound)


class MetricsExporter:
    """Render a ``MetricsBook`` (plus the stand-in's own gauges) as Prometheus text.

    Args:
        book: the pool's ``sim.metrics.MetricsBook``.
        now_s: a callable giving the simulated time to read the gauges at.
        time_scale: reported as ``maslat:time_scale``.
    """

    def __init__(self, book, now_s, *, time_scale: float, lag=None):
        from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector

        self.book, self.now_s, self.time_scale = book, now_s, time_scale
        self.lag = lag  # callable -> (worst timer lag in wall seconds, late timer firings), or None
        self.registry = CollectorRegistry(auto_describe=False)
        # the process_*/python_* series vLLM's default registry also exposes (process_start_time_seconds
        # is how a scraper tells a restart from a counter that merely went on)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.registry.register(self)

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        kinds = {"gauge": GaugeMetricFamily, "counter": CounterMetricFamily, "histogram": HistogramMetricFamily}
        for m in self.book.collect(self.now_s()):
            fam = kinds[m.kind](m.name, m.help, labels=list(m.labelnames))
            for sample in m.samples:
                if m.kind == "histogram":
                    labels, buckets, total = sample
                    fam.add_metric(list(labels), [(_le(b), c) for b, c in buckets], total)
                else:
                    labels, value = sample
                    fam.add_metric(list(labels), value)
            yield fam
        eng = GaugeMetricFamily("maslat:engine_config_info",
                                "maslat stand-in server: the simulated engine's scheduler limits (a real vLLM does "
                                "not expose these; give them to the collector with --engine-kwarg).",
                                labels=["engine", "max_num_seqs", "max_num_batched_tokens", "max_model_len",
                                        "tensor_parallel_size", "scheduler_reserve_full_isl",
                                        "long_prefill_token_threshold", "async_scheduling"])
        for r in self.book.replicas:
            c = r.core.cfg
            eng.add_metric([str(r.index), str(c.max_num_seqs), str(c.max_num_batched_tokens), str(c.max_model_len),
                            str(r.profile.parallel.tensor_parallel_size), str(c.scheduler_reserve_full_isl),
                            str(c.long_prefill_token_threshold or 0), "False"], 1.0)  # sim schedules in step
        yield eng
        scale = GaugeMetricFamily("maslat:time_scale",
                                  "maslat stand-in server: wall-clock seconds per simulated second; "
                                  "latencies in this exposition are simulated seconds.")
        scale.add_metric([], self.time_scale)
        yield scale
        if self.lag is not None:
            worst, late = self.lag()
            g = GaugeMetricFamily("maslat:max_lag_seconds", "maslat stand-in server: worst lateness of the simulated "
                                  "clock behind the wall clock so far (wall seconds); large values mean the "
                                  "process could not keep up and timings are stretched.")
            g.add_metric([], worst)
            yield g
            c = CounterMetricFamily("maslat:late_ticks", "maslat stand-in server: simulator wake-ups more than "
                                    "10 ms (wall) late.")
            c.add_metric([], late)
            yield c

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
