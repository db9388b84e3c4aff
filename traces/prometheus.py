"""Prometheus text scrapes of a vLLM ``/metrics`` endpoint, parsed with ``prometheus_client``'s own parser.

``parse_metrics`` runs ``prometheus_client.parser.text_string_to_metric_families`` and sorts the samples into
gauges, counters (by family name, without ``_total``) and histograms (cumulative buckets, sum, count), keyed
by metric name and label set. Deprecated vLLM names are accepted and mapped to the current ones
(``docs/vllm.md#6-prometheus-metrics``): the mapping applied is listed in ``MetricsScrape.renamed``. v0-only
names are kept under their own names and listed in ``MetricsScrape.legacy``. ``_created`` timestamp samples
are metadata and are not values.

A scrape the parser rejects raises ``TraceFormatError`` naming the source and the line (found by parsing the
text line by line with the same parser). ``timeseries_from_scrapes`` turns periodic scrapes into the run
format's ``timeseries.csv`` columns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from prometheus_client.parser import text_string_to_metric_families

from .errors import TraceFormatError

__all__ = ["DEPRECATED_NAMES", "Histogram", "MetricsScrape", "V0_ONLY_NAMES", "parse_metrics", "read_scrape",
           "timeseries_from_scrapes"]

#: old name -> current name (docs/vllm.md#6-prometheus-metrics); families as the parser names them (counters
#: without ``_total``)
DEPRECATED_NAMES = {
    "vllm:gpu_cache_usage_perc": "vllm:kv_cache_usage_perc",
    "vllm:gpu_prefix_cache_queries": "vllm:prefix_cache_queries",
    "vllm:gpu_prefix_cache_hits": "vllm:prefix_cache_hits",
    "vllm:time_per_output_token_seconds": "vllm:inter_token_latency_seconds",
    "vllm:time_in_queue_requests": "vllm:request_queue_time_seconds",
}
V0_ONLY_NAMES = frozenset({"vllm:num_requests_swapped", "vllm:cpu_cache_usage_perc"})

Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Histogram:
    """One histogram series: cumulative ``(upper bound, count)`` buckets ending at ``+Inf``, sum and count."""

    buckets: tuple[tuple[float, float], ...]
    sum: float
    count: float

    @property
    def mean(self) -> float:
        return self.sum / self.count if self.count else math.nan

    def quantile(self, q: float) -> float:
        """Linear interpolation inside the bucket, as PromQL's ``histogram_quantile`` does."""
        if not 0 <= q <= 1:
            raise ValueError(f"quantile must be in [0, 1], got {q}")
        if not self.count:
            return math.nan
        rank = q * self.count
        lo_b, lo_c = 0.0, 0.0
        for b, c in self.buckets:
            if c >= rank:
                if math.isinf(b):
                    return lo_b
                return lo_b + (b - lo_b) * ((rank - lo_c) / (c - lo_c) if c > lo_c else 0.0)
            lo_b, lo_c = b, c
        return lo_b

    def merged(self, other: Histogram) -> Histogram:
        if [b for b, _ in self.buckets] != [b for b, _ in other.buckets]:
            raise ValueError("histograms with different bucket bounds cannot be merged")
        return Histogram(tuple((b, c + d) for (b, c), (_, d) in zip(self.buckets, other.buckets, strict=True)),
                         self.sum + other.sum, self.count + other.count)


@dataclass(frozen=True, eq=False, kw_only=True)
class MetricsScrape:
    """One scrape, by metric name and label set (``Labels`` = sorted ``(name, value)`` pairs)."""

    source: str
    gauges: dict[str, dict[Labels, float]] = field(default_factory=dict)
    counters: dict[str, dict[Labels, float]] = field(default_factory=dict)
    histograms: dict[str, dict[Labels, Histogram]] = field(default_factory=dict)
    renamed: dict[str, str] = field(default_factory=dict)
    legacy: tuple[str, ...] = ()

    @staticmethod
    def _match(series: dict[Labels, float], labels: dict[str, str]) -> list:
        want = set(labels.items())
        return [v for k, v in series.items() if want <= set(k)]

    def gauge(self, name: str, **labels: str) -> float:
        """Sum of the gauge over the series whose labels include ``labels``; NaN when absent."""
        vals = self._match(self.gauges.get(name, {}), labels)
        return float(sum(vals)) if vals else math.nan

    def counter(self, name: str, **labels: str) -> float:
        """Sum of the counter (name without ``_total``) over matching series; NaN when absent."""
        vals = self._match(self.counters.get(name, {}), labels)
        return float(sum(vals)) if vals else math.nan

    def histogram(self, name: str, **labels: str) -> Histogram | None:
        """The matching histogram series merged, or ``None``."""
        vals = self._match(self.histograms.get(name, {}), labels)
        if not vals:
            return None
        out = vals[0]
        for h in vals[1:]:
            out = out.merged(h)
        return out

    def info(self, name: str) -> list[dict[str, str]]:
        """Label sets of an info-style gauge such as ``vllm:cache_config_info``."""
        return [dict(k) for k in self.gauges.get(name, {})]

    @property
    def num_gpu_blocks(self) -> int | None:
        """KV capacity from ``vllm:cache_config_info`` labels, or ``None``."""
        for labels in self.info("vllm:cache_config_info"):
            v = labels.get("num_gpu_blocks")
            if v not in (None, "", "None"):
                return int(v)
        return None


def _locate(text: str, where: str, err: Exception) -> TraceFormatError:
    """Find the first line the parser rejects on its own (same parser), to name it in the error."""
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            list(text_string_to_metric_families(line + "\n"))
        except Exception as e:  # noqa: BLE001 - the parser raises ValueError, IndexError, ...
            return TraceFormatError(f"{where}:{i}: cannot parse {line.strip()[:120]!r}: {e}")
    return TraceFormatError(f"{where}: cannot parse the exposition: {err}")


def _labels(d: dict[str, str], drop: str | None = None) -> Labels:
    return tuple(sorted((k, v) for k, v in d.items() if k != drop))


def parse_metrics(text: str, *, where: str = "<metrics text>") -> MetricsScrape:
    """Parse one Prometheus text exposition (see the module docstring)."""
    try:
        families = list(text_string_to_metric_families(text))
    except Exception as e:  # noqa: BLE001
        raise _locate(text, where, e) from None
    scrape = MetricsScrape(source=where)
    legacy = []
    for fam in families:
        name = DEPRECATED_NAMES.get(fam.name, fam.name)
        if name != fam.name:
            scrape.renamed[fam.name] = name
        if fam.name in V0_ONLY_NAMES:
            legacy.append(fam.name)
        if fam.type == "histogram":
            _histograms(fam, name, scrape, where)
            continue
        target = scrape.counters if fam.type == "counter" else scrape.gauges
        for s in fam.samples:
            if s.name.endswith("_created"):
                continue
            target.setdefault(name, {})[_labels(s.labels)] = float(s.value)
    return MetricsScrape(source=where, gauges=scrape.gauges, counters=scrape.counters,
                         histograms=scrape.histograms, renamed=scrape.renamed, legacy=tuple(sorted(legacy)))


def _histograms(fam, name: str, scrape: MetricsScrape, where: str) -> None:
    series: dict[Labels, dict] = {}
    for s in fam.samples:
        if s.name.endswith("_created"):
            continue
        key = _labels(s.labels, drop="le")
        d = series.setdefault(key, {"buckets": [], "sum": math.nan, "count": math.nan})
        if s.name.endswith("_bucket"):
            d["buckets"].append((float(s.labels["le"]), float(s.value)))
        elif s.name.endswith("_sum"):
            d["sum"] = float(s.value)
        elif s.name.endswith("_count"):
            d["count"] = float(s.value)
    for key, d in series.items():
        b = sorted(d["buckets"])
        problem = None
        if not b or not math.isinf(b[-1][0]):
            problem = "has no +Inf bucket"
        elif any(c2 < c1 for (_, c1), (_, c2) in zip(b, b[1:], strict=False)):
            problem = "has cumulative bucket counts that decrease"
        elif not math.isnan(d["count"]) and d["count"] != b[-1][1]:
            problem = f"has _count {d['count']} != +Inf bucket {b[-1][1]}"
        if problem is not None:
            raise TraceFormatError(f"{where}: histogram {fam.name}{dict(key)} {problem}")
        count = b[-1][1] if math.isnan(d["count"]) else d["count"]
        scrape.histograms.setdefault(name, {})[key] = Histogram(tuple(b), d["sum"], count)


def read_scrape(path: str | Path) -> MetricsScrape:
    """Read one scrape saved as a text file."""
    path = Path(path)
    return parse_metrics(path.read_text(encoding="utf-8"), where=str(path))


def _engine_labels(scrapes: list[tuple[float, MetricsScrape]]) -> list[str]:
    labels = {v for _, s in scrapes for k in s.gauges.get("vllm:num_requests_running", {}) for n, v in k
              if n == "engine"}
    return sorted((e for e in labels if e.isdigit()), key=int)


def timeseries_from_scrapes(scrapes: list[tuple[float, MetricsScrape]], *, per_engine: bool = False) -> pd.DataFrame:
    """Periodic scrapes ``(t_s, scrape)`` (increasing t) as the run format's timeseries columns.

    ``running``/``waiting`` are the gauges summed over engines and ``kv_cache_pct`` the KV usage in percent
    (averaged over a data-parallel page's engines); the throughputs are the increase of
    ``vllm:prompt_tokens``/``vllm:generation_tokens`` since the previous scrape (the first row counts from zero).
    With ``per_engine`` and a page with ``engine`` labels, also ``running_engine<i>``, ``waiting_engine<i>``,
    ``kv_cache_pct_engine<i>`` per engine label ``i`` (``traces.runs`` format).
    """
    if not scrapes:
        raise ValueError("no scrapes")
    t = np.array([s[0] for s in scrapes], dtype=np.float64)
    if np.any(np.diff(t) <= 0):
        raise ValueError("scrape times must increase")
    prompt = np.array([s.counter("vllm:prompt_tokens") for _, s in scrapes])
    gen = np.array([s.counter("vllm:generation_tokens") for _, s in scrapes])
    out = pd.DataFrame({
        "t": t,
        "prompt_throughput": np.diff(np.nan_to_num(prompt), prepend=0.0),
        "gen_throughput": np.diff(np.nan_to_num(gen), prepend=0.0),
        "running": [int(np.nan_to_num(s.gauge("vllm:num_requests_running"))) for _, s in scrapes],
        "waiting": [int(np.nan_to_num(s.gauge("vllm:num_requests_waiting"))) for _, s in scrapes],
        "kv_cache_pct": [100.0 * float(np.nan_to_num(s.gauge("vllm:kv_cache_usage_perc"))) for _, s in scrapes],
    })
    engines = _engine_labels(scrapes)
    kv = {e: [100.0 * s.gauge("vllm:kv_cache_usage_perc", engine=e) for _, s in scrapes] for e in engines}
    if len(engines) > 1:
        out["kv_cache_pct"] = pd.DataFrame(kv).mean(axis=1, skipna=True).fillna(0.0).to_numpy()
    for e in engines if per_engine else []:
        for col, name in (("running", "vllm:num_requests_running"), ("waiting", "vllm:num_requests_waiting")):
            out[f"{col}_engine{e}"] = [s.gauge(name, engine=e) for _, s in scrapes]
        out[f"kv_cache_pct_engine{e}"] = kv[e]
    return out
