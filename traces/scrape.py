"""Read a vLLM ``/metrics`` page into the few numbers a collector needs.

Only what a real vLLM 0.19 exposes is required (``docs/vllm.md#6-prometheus-metrics``). Series are summed over
engines (a data-parallel server has one ``engine`` label per engine core) except the KV usage, which is
averaged; the running, waiting and KV-usage gauges are also kept per engine label (``*_per_engine``, for
per-engine ``timeseries.csv`` columns and the engines' KV capacities). ``process_start_time_seconds`` (from
the Prometheus client's process collector, which vLLM exposes) tells a restarted server from one whose
counters merely went on. Deprecated names are accepted when the current ones are missing
(``vllm:gpu_cache_usage_perc``, ``vllm:gpu_prefix_cache_*``). The stand-in server's own ``maslat:time_scale``
is read when present.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["SAMPLES", "Scrape", "parse_scrape", "read_metrics_page", "relevant_lines"]

_COUNTERS = {  # field -> sample names, current first
    "prompt_tokens": ("vllm:prompt_tokens_total",),
    "generation_tokens": ("vllm:generation_tokens_total",),
    "preemptions": ("vllm:num_preemptions_total",),
    "prefix_cache_queries": ("vllm:prefix_cache_queries_total", "vllm:gpu_prefix_cache_queries_total"),
    "prefix_cache_hits": ("vllm:prefix_cache_hits_total", "vllm:gpu_prefix_cache_hits_total"),
    "ttft_sum_s": ("vllm:time_to_first_token_seconds_sum",),
    "ttft_count": ("vllm:time_to_first_token_seconds_count",),
}


_PER_ENGINE = {"vllm:num_requests_running": "running", "vllm:num_requests_waiting": "waiting",
               "vllm:kv_cache_usage_perc": "kv", "vllm:gpu_cache_usage_perc": "kv_old"}


@dataclass(frozen=True, slots=True)
class Scrape:
    """One scrape. Counters are cumulative since the server started; ``None`` when not exposed."""

    running: float
    waiting: float
    kv_usage: float | None  # 0..1, mean over engines
    prompt_tokens: float | None = None
    generation_tokens: float | None = None
    preemptions: float | None = None
    prefix_cache_queries: float | None = None
    prefix_cache_hits: float | None = None
    ttft_sum_s: float | None = None
    ttft_count: float | None = None
    engines: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    cache_config: dict[str, str] = field(default_factory=dict)  # labels of vllm:cache_config_info (engine 0)
    engine_config: dict[str, str] = field(default_factory=dict)  # maslat:engine_config_info (stand-in only)
    num_gpu_blocks_per_engine: dict[str, int] = field(default_factory=dict)
    time_scale: float | None = None  # maslat:time_scale (stand-in only)
    max_lag_s: float | None = None  # maslat:max_lag_seconds (stand-in only)
    process_start_time_s: float | None = None  # process_start_time_seconds: changes when the server restarts
    running_per_engine: dict[str, float] = field(default_factory=dict)  # by engine label, summed over models
    waiting_per_engine: dict[str, float] = field(default_factory=dict)
    kv_usage_per_engine: dict[str, float] = field(default_factory=dict)  # 0..1, mean over the label's series


#: every sample name ``parse_scrape`` reads; the rest of a page (hundreds of histogram buckets) is never parsed
SAMPLES = frozenset({"maslat:time_scale", "maslat:max_lag_seconds", "maslat:engine_config_info",
                     "process_start_time_seconds", "vllm:cache_config_info", *_PER_ENGINE,
                     *(n for names in _COUNTERS.values() for n in names)})


def relevant_lines(text: str) -> str:
    """The sample lines of ``text`` whose name is in ``SAMPLES`` (comments and every other series dropped).

    Parsing a whole vLLM 0.32 page (~600 lines, 50 kB) with the Prometheus parser takes 20-60 ms of pure Python;
    a collector doing that once a second beside its streaming requests delayed the reading of their tokens by
    0.2-1.1 s in 12-21 of 59 requests on a 2-core machine (against 1 of 59 without the parse). Without ``# TYPE``
    lines the parser keeps every sample's own name and labels, so the result is the same."""
    keep = []
    for line in text.splitlines():
        if line and line[0] != "#":
            end = len(line)
            for sep in ("{", " "):
                i = line.find(sep)
                if 0 <= i < end:
                    end = i
            if line[:end] in SAMPLES:
                keep.append(line)
    return "\n".join(keep) + "\n"


def parse_scrape(text: str, model: str | None = None) -> Scrape:
    """Parse Prometheus text; with ``model``, keep only series whose ``model_name`` is that model.

    Raises ``ValueError`` if the page has no ``vllm:num_requests_running`` series (not a vLLM server).
    """
    from prometheus_client.parser import text_string_to_metric_families

    values: dict[str, list[float]] = {}
    engines, models, info, engine_config = set(), set(), [], []
    per: dict[tuple[str, str], list[float]] = {}
    time_scale = max_lag = start = None
    for fam in text_string_to_metric_families(relevant_lines(text)):
        for s in fam.samples:
            name, labels = s.name, s.labels
            if name == "maslat:time_scale":
                time_scale = float(s.value)
                continue
            if name == "maslat:max_lag_seconds":
                max_lag = float(s.value)
                continue
            if name == "maslat:engine_config_info":  # the stand-in server's scheduler limits
                engine_config.append(labels)
                continue
            if name == "process_start_time_seconds":
                start = float(s.value)
                continue
            if not name.startswith("vllm:"):
                continue
            if model is not None and labels.get("model_name", model) != model:
                continue
            if "model_name" in labels:
                models.add(labels["model_name"])
            if "engine" in labels and name == "vllm:num_requests_running":
                engines.add(labels["engine"])
            if name == "vllm:cache_config_info":
                info.append(labels)
                continue
            values.setdefault(name, []).append(float(s.value))
            if name in _PER_ENGINE and "engine" in labels:
                per.setdefault((_PER_ENGINE[name], labels["engine"]), []).append(float(s.value))
    if "vllm:num_requests_running" not in values:
        raise ValueError("no vllm:num_requests_running series: this does not look like a vLLM /metrics page"
                         + (f" for model {model!r}" if model else ""))

    def first(*names: str) -> list[float] | None:
        return next((values[n] for n in names if n in values), None)

    kv = first("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
    kv_name = "kv" if "vllm:kv_cache_usage_perc" in values else "kv_old"
    per_engine = {f: {e: (sum(v) / len(v) if f.startswith("kv") else sum(v)) for (g, e), v in per.items() if g == f}
                  for f in ("running", "waiting", "kv", "kv_old")}
    counters = {}
    for f, names in _COUNTERS.items():
        v = first(*names)
        counters[f] = sum(v) if v is not None else None
    info.sort(key=lambda lab: lab.get("engine", ""))
    blocks = {lab.get("engine", ""): int(lab["num_gpu_blocks"]) for lab in info
              if lab.get("num_gpu_blocks", "").isdigit()}
    return Scrape(running=sum(values["vllm:num_requests_running"]),
                  waiting=sum(values.get("vllm:num_requests_waiting", [0.0])),
                  kv_usage=(sum(kv) / len(kv)) if kv else None, **counters,
                  engines=tuple(sorted(engines)), models=tuple(sorted(models)),
                  cache_config={k: v for k, v in info[0].items() if k != "engine"} if info else {},
                  engine_config={k: v for k, v in engine_config[0].items() if k != "engine"} if engine_config else {},
                  num_gpu_blocks_per_engine=blocks, time_scale=time_scale, max_lag_s=max_lag,
                  process_start_time_s=start, running_per_engine=per_engine["running"],
                  waiting_per_engine=per_engine["waiting"], kv_usage_per_engine=per_engine[kv_name])


def read_metrics_page(url: str, headers: dict[str, str], model: str | None, timeout: float
                      ) -> tuple[Scrape | None, dict, dict]:
    """GET a ``/metrics`` page on a connection of its own (blocking: the collector runs it in a worker thread) and
    parse it: ``(parse_scrape, enginelatency.histogram_sums, histogram_sums_by_engine)``, or ``(None, {}, {})``
    when the server answers with an HTTP error. Connection errors and timeouts raise (``OSError``)."""
    import urllib.error
    import urllib.request

    from .enginelatency import histogram_sums, histogram_sums_by_engine

    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as r:  # noqa: S310
            if r.status != 200:
                return None, {}, {}
            text = r.read().decode("utf-8", errors="replace")
    except urllib.error.HTTPError:
        return None, {}, {}
    return parse_scrape(text, model), histogram_sums(text), histogram_sums_by_engine(text)
