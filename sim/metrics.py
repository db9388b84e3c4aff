"""vLLM's Prometheus metrics for the replicas of one pool, time-free (no Prometheus library here).

Mirrors ``vllm/v1/metrics/loggers.py`` (``PrometheusStatLogger``): the same metric names, types, label
names and bucket bounds (``docs/vllm.md#6-prometheus-metrics``). Every series carries ``model_name`` and
``engine``; the engine label is the replica index, which is how vLLM labels the engines of a data-parallel
server.

Where the numbers come from, so that the engine pays nothing extra per step:

* gauges and counters the engine already keeps (``EngineCore.gauges``, ``num_preemptions``,
  ``prompt_tokens``, ``prefix_cache_*``), read at collection time;
* the engine's histograms: ``itl`` and ``iteration_tokens`` (per step) and ``ttft`` (filled at each
  first token, measured from the frontend arrival as vLLM's frontend does);
* per-request histograms filled from the world's records of finished requests, in numpy batches each
  time the metrics are collected (``MetricsBook.collect``).

Differences from vLLM (deliberate, documented):

* Aborted requests count in ``vllm:request_success{finished_reason="abort"}`` only; their latencies and
  sizes are not observed (vLLM observes what it has, often nothing for a request aborted while queued).
* ``vllm:request_params_max_tokens`` and ``vllm:request_max_num_generation_tokens`` observe the output
  length, which equals ``max_tokens`` for every finished simulated request (there is no EOS).
* E2E is ``last_token - arrival``: the simulator has no IPC delay between the engine and the frontend.
* Deprecated names (``vllm:gpu_cache_usage_perc``, ``vllm:gpu_prefix_cache_*``) are not emitted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .histogram import ITL_BUCKETS_S, REQUEST_LATENCY_BUCKETS_S, Histogram, token_buckets

__all__ = ["FINISHED_REASONS", "Metric", "MetricsBook"]

LABELS = ("model_name", "engine")

#: RequestStatus name -> vLLM's ``finished_reason`` label (``FinishReason.__str__``)
FINISHED_REASONS = {"FINISHED_STOPPED": "stop", "FINISHED_LENGTH_CAPPED": "length", "FINISHED_ABORTED": "abort"}


@dataclass(frozen=True, slots=True)
class Metric:
    """One metric family.

    ``samples`` holds ``(label_values, value)`` for gauges and counters (counter names are given without
    ``_total``, as Prometheus clients take them) and ``(label_values, cumulative_buckets, sum)`` for
    histograms, with ``cumulative_buckets = ((upper_bound, count), ..., (inf, total))``.
    """

    name: str
    kind: str  # "gauge" | "counter" | "histogram"
    help: str
    labelnames: tuple[str, ...]
    samples: tuple


def _per_request_values(c: dict, rows: slice) -> dict[str, np.ndarray]:
    """The per-request observations (vLLM's ``FinishedRequestStats``) of the record rows ``rows``."""
    arr, q, s = c["arrival_s"][rows], c["queued_s"][rows], c["scheduled_s"][rows]
    f, last = c["first_token_s"][rows], c["last_token_s"][rows]
    out = c["output_tokens"][rows].astype(np.float64)
    decode = last - f
    return {
        "vllm:e2e_request_latency_seconds": last - arr,
        "vllm:request_queue_time_seconds": s - q,
        "vllm:request_prefill_time_seconds": f - s,
        "vllm:request_decode_time_seconds": decode,
        "vllm:request_inference_time_seconds": last - s,
        "vllm:request_time_per_output_token_seconds": np.where(out > 1, decode / np.maximum(out - 1, 1), 0.0),
        "vllm:request_prompt_tokens": c["prompt_tokens"][rows].astype(np.float64),
        "vllm:request_generation_tokens": out,
        "vllm:request_max_num_generation_tokens": out,
        "vllm:request_params_max_tokens": out,
        "vllm:request_params_n": np.ones(len(out)),
    }


def _request_histogram_specs(max_model_len: int) -> dict[str, tuple[str, tuple[float, ...]]]:
    lat, tok = REQUEST_LATENCY_BUCKETS_S, token_buckets(max_model_len)
    return {
        "vllm:e2e_request_latency_seconds": ("Histogram of e2e request latency in seconds.", lat),
        "vllm:request_queue_time_seconds": ("Histogram of time spent in WAITING phase for request.", lat),
        "vllm:request_prefill_time_seconds": ("Histogram of time spent in PREFILL phase for request.", lat),
        "vllm:request_decode_time_seconds": ("Histogram of time spent in DECODE phase for request.", lat),
        "vllm:request_inference_time_seconds": ("Histogram of time spent in RUNNING phase for request.", lat),
        "vllm:request_time_per_output_token_seconds": ("Histogram of time_per_output_token_seconds per request.",
                                                       ITL_BUCKETS_S),
        "vllm:request_prompt_tokens": ("Number of prefill tokens processed.", tok),
        "vllm:request_generation_tokens": ("Number of generation tokens processed.", tok),
        "vllm:request_max_num_generation_tokens": ("Histogram of maximum number of requested generation tokens.",
                                                   tok),
        "vllm:request_params_max_tokens": ("Histogram of the max_tokens request parameter.", tok),
        "vllm:request_params_n": ("Histogram of the n request parameter.", (1.0, 2.0, 5.0, 10.0, 20.0)),
    }


class MetricsBook:
    """The ``/metrics`` view of one pool of a world, as one vLLM server with one engine per replica.

    Args:
        world: the world (with ``keep_records=True``: per-request histograms come from its records).
        pool: the pool this server fronts.
        model_name: the ``model_name`` label (vLLM's served model name).
        gpu_memory_utilization, cache_dtype: reported in ``vllm:cache_config_info`` (the simulator does not
            use them; they say how the simulated server is meant to be configured).
    """

    def __init__(self, world, pool: str, model_name: str, *, gpu_memory_utilization: float = 0.9,
                 cache_dtype: str = "auto"):
        if world.records is None:
            raise ValueError("MetricsBook needs a world built with keep_records=True")
        if pool not in world.cluster.pools:
            raise ValueError(f"unknown pool {pool!r}; pools: {sorted(world.cluster.pools)}")
        self.world, self.pool, self.model_name = world, pool, model_name
        self.replicas = world.cluster.pools[pool]
        self.gpu_memory_utilization, self.cache_dtype = gpu_memory_utilization, cache_dtype
        engine = self.replicas[0].core.cfg
        self._specs = _request_histogram_specs(engine.max_model_len)
        self._hists = {rep.index: {n: Histogram(b) for n, (_, b) in self._specs.items()} for rep in self.replicas}
        self._success = {rep.index: dict.fromkeys(FINISHED_REASONS.values(), 0) for rep in self.replicas}
        self._cursor = 0  # record rows already observed

    def _ingest(self) -> None:
        """Observe the records added since the last call (finished, aborted and rejected requests)."""
        rs = self.world.records
        n = len(rs)
        if n == self._cursor:
            return
        c = rs.columns()
        rows = slice(self._cursor, n)
        status = np.array(rs.status[rows])
        pool = np.array(rs.pool[rows])
        replica = c["replica"][rows]
        self._cursor = n
        ours = pool == self.pool
        for name, reason in FINISHED_REASONS.items():
            sel = ours & (status == name)
            for idx, cnt in zip(*np.unique(replica[sel], return_counts=True), strict=True):
                self._success[int(idx)][reason] += int(cnt)
        done = ours & (status != "REJECTED") & (status != "FINISHED_ABORTED")
        if not done.any():
            return
        values = _per_request_values(c, rows)
        for idx in np.unique(replica[done]).tolist():
            sel = done & (replica == idx)
            for name, h in self._hists[idx].items():
                h.observe_array(values[name][sel])

    def forget_observed(self) -> int:
        """Observe the records added since the last call, then drop every observed row from the world's
        store; return how many were dropped. Counters and histograms keep their values, so a long-running
        server's memory does not grow with the requests it served. Only for a store this book alone reads."""
        self._ingest()
        n = self._cursor
        try:
            self.world.records.drop_first(n)
        except BufferError:  # a numpy view of the store is still alive: try again next time
            return 0
        self._cursor = 0
        return n

    def collect(self, now_s: float | None = None) -> list[Metric]:
        """Every metric family as a scraper of the server would see it at simulated time ``now_s``."""
        self._ingest()
        now_s = self.world.now if now_s is None else now_s
        reps, m = self.replicas, self.model_name
        lab = {rep.index: (m, str(rep.index)) for rep in reps}
        g = {rep.index: rep.core.gauges(now_s) for rep in reps}  # (running, waiting, used, generation)

        def per_engine(fn) -> tuple:
            return tuple((lab[r.index], fn(r)) for r in reps)

        def hist(h: Histogram, labels) -> tuple:
            return labels, tuple(h.cumulative()), h.sum

        out = [
            Metric("vllm:num_requests_running", "gauge", "Number of requests in model execution batches.", LABELS,
                   per_engine(lambda r: g[r.index][0])),
            Metric("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.", LABELS,
                   per_engine(lambda r: g[r.index][1])),
            Metric("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.", LABELS,
                   per_engine(lambda r: g[r.index][2] / r.core.kv.num_usable)),
            Metric("vllm:num_preemptions", "counter", "Cumulative number of preemption from the engine.", LABELS,
                   per_engine(lambda r: r.core.num_preemptions)),
            Metric("vllm:prompt_tokens", "counter", "Number of prefill tokens processed.", LABELS,
                   per_engine(lambda r: r.core.prompt_tokens)),
            Metric("vllm:generation_tokens", "counter", "Number of generation tokens processed.", LABELS,
                   per_engine(lambda r: g[r.index][3])),
            Metric("vllm:prefix_cache_queries", "counter",
                   "Prefix cache queries, in terms of number of queried tokens.", LABELS,
                   per_engine(lambda r: r.core.prefix_cache_queries)),
            Metric("vllm:prefix_cache_hits", "counter", "Prefix cache hits, in terms of number of cached tokens.",
                   LABELS, per_engine(lambda r: r.core.prefix_cache_hits)),
            Metric("vllm:request_success", "counter", "Count of successfully processed requests.",
                   (*LABELS, "finished_reason"),
                   tuple(((*lab[r.index], reason), cnt) for r in reps
                         for reason, cnt in self._success[r.index].items())),
            Metric("vllm:time_to_first_token_seconds", "histogram", "Histogram of time to first token in seconds.",
                   LABELS, tuple(hist(r.core.ttft, lab[r.index]) for r in reps)),
            Metric("vllm:inter_token_latency_seconds", "histogram", "Histogram of inter-token latency in seconds.",
                   LABELS, tuple(hist(r.core.itl, lab[r.index]) for r in reps)),
            Metric("vllm:iteration_tokens_total", "histogram", "Histogram of number of tokens per engine_step.",
                   LABELS, tuple(hist(r.core.iteration_tokens, lab[r.index]) for r in reps)),
        ]
        for name, (doc, _) in self._specs.items():
            out.append(Metric(name, "histogram", doc, LABELS,
                              tuple(hist(self._hists[r.index][name], lab[r.index]) for r in reps)))
        out.append(self._cache_config_info())
        return out

    def _cache_config_info(self) -> Metric:
        """``vllm:cache_config_info``: a gauge fixed at 1 whose labels are the cache config
        (``CacheConfig.metrics_info``: every value as Python's ``str``)."""
        names = ("block_size", "cache_dtype", "enable_prefix_caching", "gpu_memory_utilization", "num_cpu_blocks",
                 "num_gpu_blocks", "engine")
        samples = []
        for r in self.replicas:
            cfg = r.core.cfg
            samples.append(((str(cfg.block_size), self.cache_dtype, str(cfg.enable_prefix_caching),
                             str(self.gpu_memory_utilization), "None", str(cfg.num_gpu_blocks), str(r.index)), 1.0))
        return Metric("vllm:cache_config_info", "gauge", "Information of the LLMEngine CacheConfig", names,
                      tuple(samples))
