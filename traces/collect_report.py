"""What a collection reports: its run's ``meta.json`` and the summary ``maslat collect`` prints.

Split out of ``traces.collect`` to keep each file small. ``CollectorReport`` is a mixin of methods only (no state
of its own) that ``traces.collect.Collector`` inherits: ``meta`` turns the collector's counters and the server's
first scrape (``vllm:cache_config_info``, the stand-in's engine config) into ``meta.json`` (``traces.meta``'s
schema, ``collector.timestamps = "client"``), and ``summary`` into the command's figures (latency percentiles,
throughput, failures). Collection itself (config, scraping, requests) stays in ``traces.collect``.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime

import numpy as np

from .enginelatency import latency_deltas, per_engine_deltas

__all__ = ["CollectorReport"]


def _stats(x) -> dict:
    x = np.asarray(x, dtype=np.float64)
    if not len(x):
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    p = np.percentile(x, [50, 90, 99])
    return {"mean": float(x.mean()), "p50": float(p[0]), "p90": float(p[1]), "p99": float(p[2])}


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class CollectorReport:
    """``Collector``'s ``meta`` and ``summary`` (see the module docstring)."""

    # ------------------------------------------------------------------ meta and summary
    def meta(self, *, started: float, finished: float | None, complete: bool) -> dict:
        from .loadgen import load_description

        cfg, info, first = self.cfg, self.info, self.info.get("first_scrape")
        kw = {"model": info.get("model_root") or info.get("model"), "tensor_parallel_size": None,
              "data_parallel_size": len(first.engines) if first and first.engines else None,
              "enable_expert_parallel": None, "max_num_seqs": None, "max_num_batched_tokens": None,
              "max_model_len": info.get("max_model_len"), "dtype": None,
              "kv_cache_dtype": first.cache_config.get("cache_dtype") if first else None, "seed": None}
        if first and first.engine_config:  # the stand-in server publishes its limits; a real vLLM does not
            ec = first.engine_config
            for k in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "tensor_parallel_size"):
                if ec.get(k, "").isdigit():
                    kw[k] = int(ec[k])
            for k in ("scheduler_reserve_full_isl", "async_scheduling"):
                if ec.get(k) in ("True", "False"):
                    kw[k] = ec[k] == "True"
            if ec.get("long_prefill_token_threshold", "").isdigit():
                kw["long_prefill_token_threshold"] = int(ec["long_prefill_token_threshold"])
        kw.update(cfg.engine_kwargs)
        n_ok = self.writer.num_requests if self.writer else 0
        meta = {"schema_version": 1, "model": info.get("model"), "vllm_version": info.get("vllm_version"),
                "engine_kwargs": kw, "dataset_path": cfg.workload if self.plan else "phase2",
                "dataset_hash": self.plan.hash_lengths(self.sent + self.skipped) if self.plan else None,
                "num_requests": n_ok, "started_at": _iso(started),
                "finished_at": _iso(finished) if finished else None, "tick_seconds": cfg.scrape_interval_s}
        if first and first.cache_config:
            cc = first.cache_config
            blocks = int(cc["num_gpu_blocks"]) if cc.get("num_gpu_blocks", "").isdigit() else None
            bs = int(cc["block_size"]) if cc.get("block_size", "").isdigit() else None
            util = cc.get("gpu_memory_utilization")
            meta["kv_cache"] = {"num_gpu_blocks": blocks, "block_size": bs,
                                "gpu_memory_utilization": float(util) if util not in (None, "None") else None,
                                "enable_prefix_caching": cc.get("enable_prefix_caching") == "True",
                                "num_kv_tokens": blocks * bs if blocks and bs else None,
                                "num_gpu_blocks_per_engine": first.num_gpu_blocks_per_engine}
        meta["collector"] = {
            "timestamps": "client",
            "timestamps_note": "queued_ts/first_token_ts/last_token_ts are the collector's monotonic clock at send, "
                               "first and last output chunk; arrival_time is epoch seconds at send; scheduled_ts "
                               "is not observable over HTTP (null). TTFT and E2E include HTTP and the API "
                               "server's frontend time.",
            "endpoint": cfg.base_url, "metrics_url": cfg.metrics, "api": cfg.api, "load": load_description(cfg),
            "seed": cfg.seed, "time_scale": self.clock.time_scale, "sent": self.sent,
            "ok": n_ok, "failed": self.writer.num_failures if self.writer else 0,
            "skipped_oversize": self.skipped, "scrape_failures": self.scrape_failures,
            "counter_resets": self.counter_resets, "interrupted": self.interrupted, "complete": complete}
        if self.signal is not None:
            meta["collector"]["interrupted_by"] = self.signal
        if self.task_errors:
            meta["collector"]["task_errors"] = self.task_errors[:10]
        # recompute preemptions the server counted while the run's scrapes were taken (vllm:num_preemptions_total,
        # summed over engines, restarts survived as for the token counters); absent when not exposed
        if self.preemptions is not None:
            meta["collector"]["preemptions"] = int(round(self.preemptions))
        if self.latency_first and self.latency_last:  # the engine's own share of the run's latencies
            meta["collector"]["engine_latency"] = latency_deltas(self.latency_first, self.latency_last)
        per = per_engine_deltas(self.latency_first_by_engine or {}, self.latency_last_by_engine or {})
        if len(per) > 1:  # data parallelism: each engine core's own (traces.enginelatency)
            meta["collector"]["engine_latency_per_engine"] = per
        if self.stand_in_max_lag_s is not None:
            meta["collector"]["stand_in_max_lag_s"] = self.stand_in_max_lag_s
        meta["collector"].update(self.extra_meta)
        if self.plan is not None:
            meta["collector"]["trace_rows_dropped_zero_length"] = self.plan.source.dropped
            meta["collector"]["lengths_clipped"] = getattr(self.plan.source.lengths, "clipped", 0)
        return meta

    def summary(self) -> dict:
        span = (self.last_done - self.first_send) if self.first_send is not None and self.last_done else math.nan
        n_ok = self.writer.num_requests if self.writer else 0
        return {"out": str(self.cfg.out_dir), "model": self.info.get("model"), "sent": self.sent, "ok": n_ok,
                "failed": self.writer.num_failures if self.writer else 0, "skipped_oversize": self.skipped,
                "interrupted": self.interrupted, "duration_s": span, "ttft_s": _stats(self.ttft),
                "tpot_s": _stats(self.tpot), "itl_s": _stats(self.itl), "e2e_s": _stats(self.e2e),
                "throughput_req_per_s": n_ok / span if span and span > 0 else None,
                "output_tokens_per_s": sum(self.out_tokens) / span if span and span > 0 else None,
                "scrape_failures": self.scrape_failures, "counter_resets": self.counter_resets,
                "preemptions": None if self.preemptions is None else int(round(self.preemptions)),
                "time_scale": self.clock.time_scale, "stand_in_max_lag_s": self.stand_in_max_lag_s,
                "signal": self.signal, "task_errors": self.task_errors, "first_error": self.first_error,
                "run_written": bool(self.writer is not None and n_ok > 0)}
