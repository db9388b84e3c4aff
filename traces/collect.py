"""Collect a measured run from an OpenAI-compatible vLLM server (or the stand-in): ``maslat collect``.

A load generator (Poisson arrivals at a rate, a fixed number of concurrent clients, or a replayed Azure
trace) streams every request, so it measures TTFT and every inter-token gap, and scrapes ``/metrics``
once a (server) second. It writes the run format of ``docs/vllm.md#8-run-format`` (``traces.runwriter``):

====================  ==========================================================================
run-format field      what the collector records (client side; vLLM does not expose engine times)
====================  ==========================================================================
``arrival_time``      epoch seconds when the request was sent
``queued_ts``         the collector's monotonic clock when the request was sent
``scheduled_ts``      ``null``: not observable over HTTP
``first_token_ts``    monotonic time of the first chunk carrying output text
``last_token_ts``     monotonic time of the last chunk carrying output text
``input_toks``        ``usage.prompt_tokens`` reported by the server
``output_toks``       ``usage.completion_tokens`` reported by the server
``itls`` (extra)      every gap between output chunks, seconds
====================  ==========================================================================

So TTFT = ``first_token_ts - queued_ts`` here includes what a server-side run excludes: HTTP, the API
server's tokenization and queueing before the engine core (``overheads.frontend_s`` in a profile) and the
stream's delivery. E2E likewise; TPOT is nearly unaffected. ``meta.json`` says ``"timestamps": "client"``.
``collector.engine_latency`` holds the growth over the run of the engine's latency histogram sums (queue,
prefill, decode, E2E, TTFT; ``traces.enginelatency``): calibration measures the client-side constant with them;
with several engines (data parallelism) ``collector.engine_latency_per_engine`` holds each engine's, by DP rank.
``timeseries.csv`` comes from the scrapes: running/waiting summed over engines, KV usage averaged, and
throughputs as the difference of ``vllm:prompt_tokens_total`` / ``generation_tokens_total`` between ticks
(a server restart, seen as a new ``process_start_time_seconds`` or a counter going down, starts the
difference again from zero and is counted in ``counter_resets``).

Failures (HTTP errors, refused connections during a restart, streams cut short, requests cancelled by
Ctrl-C) go to ``failures.jsonl`` with what was received; the run goes on. Ctrl-C stops sending, cancels
what is in flight and leaves a valid partial run (``meta.json``: ``"interrupted": true``).

Against the stand-in server (``maslat:time_scale`` = X in its metrics) the collector plays in server time:
rates and pauses are stretched by X and measured durations divided by X, so the run reads as if
collected from a real-time server.
"""

from __future__ import annotations

import asyncio
import gc
import math
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

from .client import (
    Clock,
    StreamResult,
    auth_headers,
    base_url,
    chat_body,
    completion_body,
    filler_text,
    served_model,
    stream_request,
)
from .collect_report import CollectorReport
from .loadgen import GC_EVERY_S
from .loadplan import LoadPlan
from .runwriter import RunWriter
from .scrape import Scrape, read_metrics_page

__all__ = ["CollectConfig", "collect", "collect_async"]


@dataclass(frozen=True, slots=True, kw_only=True)
class CollectConfig:
    """One collection.

    Attributes:
        endpoint: the server's base URL (``http://host:port`` or ``.../v1``).
        out_dir: the run directory to write.
        metrics_url: the Prometheus page (default: ``<endpoint root>/metrics``).
        model: the served model name (default: the first of ``/v1/models``).
        api: ``"completions"`` (token-id prompts of exact length) or ``"chat"`` (filler text).
        rate_per_s: Poisson arrivals at this rate (requests per server second), or
        concurrency: this many clients, each sending its next request when the last one ends, or
        trace_arrivals: replay the Azure trace of ``workload`` with its own arrival times.
        workload: lengths (``traces.loadplan``).
        num_requests: how many requests to plan; duration_s: stop sending after this many seconds.
        seed: seeds the lengths, arrivals and prompt tokens.
        scrape_interval_s: seconds between scrapes (one row of ``timeseries.csv`` each).
        request_timeout_s: a request taking longer fails.
        retry_backoff_s: a closed-loop client pauses this long after a connection failure.
        engine_kwargs: facts about the engine the server cannot tell (``max_num_seqs=...``), for meta.
        overwrite: replace an existing run in ``out_dir``.
        phase2: write the two-phase estimator dataset instead of a plain load (``traces.phase2``).
    """

    endpoint: str
    out_dir: Path
    metrics_url: str | None = None
    model: str | None = None
    api: str = "completions"
    rate_per_s: float | None = None
    concurrency: int | None = None
    trace_arrivals: bool = False
    workload: str = "azure-conv"
    num_requests: int | None = None
    duration_s: float | None = None
    seed: int = 0
    scrape_interval_s: float = 1.0
    request_timeout_s: float = 600.0
    retry_backoff_s: float = 0.5
    engine_kwargs: dict = field(default_factory=dict)
    overwrite: bool = False
    phase2: object | None = None
    api_key: str | None = field(default=None, repr=False)  # sent as Authorization: Bearer (never written)

    def __post_init__(self) -> None:
        modes = [self.rate_per_s is not None, self.concurrency is not None, self.trace_arrivals]
        if self.phase2 is None and sum(modes) != 1:
            raise ValueError("give exactly one of --rate, --concurrency or --trace-arrivals")
        if self.rate_per_s is not None and not self.rate_per_s > 0:
            raise ValueError(f"--rate must be positive, got {self.rate_per_s}")
        if self.concurrency is not None and self.concurrency < (0 if self.phase2 is not None else 1):
            raise ValueError(f"--concurrency must be at least 1, got {self.concurrency}")
        if self.phase2 is None and self.num_requests is None and self.duration_s is None and not self.trace_arrivals:
            raise ValueError("give --num-requests or --duration (or both)")
        if self.num_requests is not None and self.num_requests < 1:
            raise ValueError("--num-requests must be >= 1")
        if self.api not in ("completions", "chat"):
            raise ValueError(f"--api must be completions or chat, got {self.api!r}")
        if not self.scrape_interval_s > 0 or not self.request_timeout_s > 0:
            raise ValueError("scrape interval and request timeout must be positive")
        if not self.endpoint.startswith(("http://", "https://")):
            raise ValueError(f"--endpoint must be an http(s) URL, got {self.endpoint!r}")

    @property
    def base_url(self) -> str:
        return base_url(self.endpoint)

    @property
    def metrics(self) -> str:
        return self.metrics_url or self.base_url + "/metrics"


class Collector(CollectorReport):
    """The state of one collection; ``run`` drives it (load generation is in ``traces.loadgen``)."""

    def __init__(self, cfg: CollectConfig, progress=None):
        self.cfg, self.progress = cfg, progress
        self.plan = LoadPlan(cfg.workload, cfg.seed, trace_arrivals=cfg.trace_arrivals) if cfg.phase2 is None else None
        self.writer: RunWriter | None = None
        self.clock = Clock(1.0)
        self.stop = asyncio.Event()
        self.interrupted = False
        self.sent = self.skipped = self.scrape_failures = self.counter_resets = 0
        self.ttft, self.tpot, self.e2e, self.itl, self.out_tokens = [], [], [], [], []
        self.first_send = self.last_done = None
        self.inflight: set[asyncio.Task] = set()
        self._last_counts: dict[str, float | None] = {}
        self.preemptions: float | None = None  # vllm:num_preemptions_total gained during the run (None: not exposed)
        self.info: dict = {}
        self.stand_in_max_lag_s: float | None = None  # the stand-in server's worst clock lag (wall s)
        self.extra_meta: dict = {}  # added to meta["collector"] (phase 2 counts)
        self.closers: list = []  # called once at the end (phase 2 closes its CSV)
        self.task_errors: list[str] = []  # tasks that died of an exception (a bug): the run is not complete
        self.first_error: str | None = None  # of a failed request, for the message when none succeeded
        self.signal: str | None = None  # SIGINT / SIGTERM that stopped the collection
        # the engine's latency histogram sums at the first and the latest good scrape (traces.enginelatency)
        self.latency_first: dict | None = None
        self.latency_last: dict | None = None
        self.latency_first_by_engine: dict | None = None  # per engine label (data parallelism)
        self.latency_last_by_engine: dict | None = None

    # ------------------------------------------------------------------ discovery
    async def discover(self, session) -> None:
        cfg = self.cfg
        card = await served_model(session, cfg.base_url, cfg.model)
        model = card["id"]
        version = None
        try:
            async with session.get(cfg.base_url + "/version") as r:
                if r.status == 200:
                    version = (await r.json(content_type=None)).get("version")
        except Exception:  # noqa: BLE001 - /version is optional
            pass
        scrape = await self.scrape(model_filter=None)
        if scrape is None:
            raise ValueError(f"cannot scrape {cfg.metrics} (a vLLM /metrics page is required)")
        # vLLM's model card carries the served model's path or hub id as "root" (the id may be a
        # --served-model-name): calibration finds the model's shape from it
        root = card.get("root") if isinstance(card.get("root"), str) and card.get("root") else model
        self.info = {"model": model, "model_root": root, "max_model_len": card.get("max_model_len"),
                     "vllm_version": version,
                     "metrics_model": model if model in scrape.models else None, "first_scrape": scrape}
        self.clock = Clock(scrape.time_scale or 1.0)
        self._remember(scrape)

    async def scrape(self, model_filter: object = "auto") -> Scrape | None:
        """One read of the ``/metrics`` page, parsed; ``None`` when it fails.

        The read and the parse (only the series read: ``scrape.relevant_lines``) run in a worker thread on a
        connection of their own, off the event loop that streams the requests: parsing whole pages there, with
        automatic garbage collections (``loadgen.quiet_gc``), delayed the reading of tokens by up to a second
        (``traces.delivery``)."""
        mf = self.info.get("metrics_model") if model_filter == "auto" else model_filter
        timeout = max(2.0, 2 * self.cfg.scrape_interval_s * self.clock.time_scale)
        try:
            parsed, sums, by_engine = await asyncio.to_thread(read_metrics_page, self.cfg.metrics,
                                                              auth_headers(self.cfg.api_key), mf, timeout)
        except (TimeoutError, OSError, ValueError):
            return None
        if parsed is None:
            return None
        self.latency_first = self.latency_first if self.latency_first is not None else sums
        self.latency_last = sums
        if self.latency_first_by_engine is None:
            self.latency_first_by_engine = by_engine
        self.latency_last_by_engine = by_engine
        return parsed

    # ------------------------------------------------------------------ scraping
    def _remember(self, s: Scrape) -> None:
        self._last_counts = {"prompt": s.prompt_tokens, "gen": s.generation_tokens,
                             "preempt": s.preemptions, "start": s.process_start_time_s}
        if s.max_lag_s is not None:
            self.stand_in_max_lag_s = max(self.stand_in_max_lag_s or 0.0, s.max_lag_s)

    def _restarted(self, s: Scrape) -> bool:
        """Did the server restart since the last good scrape? (Its start time changed, or a token counter
        went down: counters start again from zero.)"""
        start, last = s.process_start_time_s, self._last_counts
        if start is not None and last.get("start") is not None and abs(start - last["start"]) > 1e-3:
            return True
        return any(cur is not None and last.get(k) is not None and cur < last[k]
                   for k, cur in (("prompt", s.prompt_tokens), ("gen", s.generation_tokens)))

    def _delta(self, key: str, cur: float | None, restarted: bool) -> float:
        prev = self._last_counts.get(key)
        if cur is None:
            return math.nan
        if prev is None or restarted:
            return cur  # tokens since the (re)start; those of the old process after its last scrape are lost
        return cur - prev

    async def tick(self, k: int) -> Scrape | None:
        s = await self.scrape()
        if s is None:
            self.scrape_failures += 1
            self.writer.add_tick(k, None, None, None, None, None)
            return None
        restarted = self._restarted(s)
        self.counter_resets += restarted
        dp, dg = self._delta("prompt", s.prompt_tokens, restarted), self._delta("gen", s.generation_tokens, restarted)
        dpre = self._delta("preempt", s.preemptions, restarted)
        if not math.isnan(dpre):
            self.preemptions = (self.preemptions or 0.0) + dpre
        self._remember(s)
        kv = None if s.kv_usage is None else round(100.0 * s.kv_usage, 4)
        self.writer.add_tick(k, dp, dg, s.running, s.waiting, kv)
        return s

    async def scrape_loop(self, done: asyncio.Event) -> None:
        """One tick per interval on a fixed grid; after ``done``, one last tick, then stop."""
        k = 0
        while True:
            k += 1
            await self.clock.sleep_until(k * self.cfg.scrape_interval_s)
            await self.tick(k)
            if done.is_set():
                return
            if k % max(1, round(GC_EVERY_S / self.cfg.scrape_interval_s)) == 0:
                gc.collect()  # the collection runs with automatic collections off (traces.loadgen.quiet_gc)

    # ------------------------------------------------------------------ requests
    def body(self, prompt_len: int, output_len: int) -> tuple[str, dict]:
        model = self.info["model"]
        if self.cfg.api == "chat":
            text = filler_text(self.plan.token_rng, max(1, prompt_len - 10))  # ~10 template tokens
            return self.cfg.base_url + "/v1/chat/completions", chat_body(model, text, output_len)
        return self.cfg.base_url + "/v1/completions", completion_body(model, self.plan.token_ids(prompt_len),
                                                                      output_len)

    def oversize(self, prompt_len: int, output_len: int) -> bool:
        mml = self.info.get("max_model_len")
        return mml is not None and prompt_len + output_len > mml

    async def send(self, session, url: str, body: dict, *, extra: dict | None = None) -> StreamResult:
        """Send one request, time it, and record it (success or failure)."""
        rid = f"bench-{self.sent}"
        self.sent += 1
        res = StreamResult(sent_mono=self.clock.mono(), sent_epoch=self.clock.epoch())
        if self.first_send is None:
            self.first_send = res.sent_mono
        try:
            await stream_request(session, url, body, self.clock, res)
        except Exception as e:  # noqa: BLE001 - stream_request records errors itself; never lose a request
            res.error = res.error or f"{type(e).__name__}: {e}"[:500]
        finally:  # also when cancelled (Ctrl-C, SIGTERM): the partial result is recorded
            self.record(rid, body, res, extra or {})
        return res

    def record(self, rid: str, body: dict, res: StreamResult, extra: dict) -> None:
        now = self.clock.mono()
        self.last_done = now
        ok = res.ok
        if ok:
            t = res.chunk_times
            n = res.output_tokens
            prompt = res.prompt_tokens
            if prompt is None and isinstance(body.get("prompt"), list):  # no usage: the token-id prompt's length
                prompt = len(body["prompt"])
            row = {"request_id": rid, "input_toks": prompt, "output_toks": n,
                   "arrival_time": res.sent_epoch, "queued_ts": res.sent_mono, "scheduled_ts": None,
                   "first_token_ts": t[0], "last_token_ts": t[-1], "itls": [b - a for a, b in zip(t[:-1], t[1:], strict=True)],
                   "max_tokens": body["max_tokens"], **extra}
            try:
                self.writer.add_request(row)
            except ValueError as e:  # e.g. no usage and a text prompt: the token counts are unknown
                res.error, ok = f"not a valid run-format record: {e}", False
        if ok:
            self.ttft.append(t[0] - res.sent_mono)
            self.e2e.append(t[-1] - res.sent_mono)
            self.out_tokens.append(n)
            if n > 1:
                self.tpot.append((t[-1] - t[0]) / (n - 1))
            self.itl.extend(row["itls"])
        else:
            t = res.chunk_times
            self.first_error = self.first_error or res.error or "no output"
            self.writer.add_failure({"request_id": rid, "error": res.error, "http_status": res.status,
                                     "arrival_time": res.sent_epoch, "queued_ts": res.sent_mono, "failed_ts": now,
                                     "max_tokens": body["max_tokens"], "output_toks_received": len(t),
                                     "first_token_ts": t[0] if t else None, **extra})
        if self.progress is not None and extra.get("kind") != "background":
            self.progress.update(1)
            self.progress.set_postfix(ok=self.writer.num_requests, failed=self.writer.num_failures, refresh=False)

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self.inflight.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        """A task that died of an exception stops the collection (never a silently truncated, complete run)."""
        self.inflight.discard(task)
        if not task.cancelled() and task.exception() is not None:
            e = task.exception()
            self.task_errors.append(f"{type(e).__name__}: {e}"[:500])
            self.stop.set()

    async def pause(self, wall_s: float) -> None:
        """Sleep, waking early if the collection is stopped."""
        try:
            await asyncio.wait_for(self.stop.wait(), timeout=wall_s)
        except TimeoutError:
            pass

    def close_extras(self) -> None:
        for fn in self.closers:
            fn()
        self.closers = []


async def collect_async(cfg: CollectConfig, *, progress=None, stop: asyncio.Event | None = None,
                        collector: Collector | None = None) -> dict:
    """Run one collection inside a running event loop; set ``stop`` to end it early (a valid partial run)."""
    from .loadgen import run_collection

    col = collector or Collector(cfg, progress)
    if stop is not None:
        col.stop = stop
    return await run_collection(col)


#: signals that stop a collection gracefully: Ctrl-C, and what ``timeout``, ``docker stop`` and systemd send
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def collect(cfg: CollectConfig, *, progress=None) -> dict:
    """Run one collection (blocking). In the main thread, the first Ctrl-C or SIGTERM stops it gracefully (the
    run stays valid and says ``interrupted``, in-flight requests are recorded as failures); a second one aborts at
    once."""

    async def main() -> dict:
        stop = asyncio.Event()
        col = Collector(cfg, progress)
        loop = asyncio.get_running_loop()
        if threading.current_thread() is threading.main_thread():
            def on_signal(sig: signal.Signals) -> None:
                col.signal = col.signal or sig.name
                stop.set()
                loop.remove_signal_handler(sig)

            for sig in STOP_SIGNALS:
                loop.add_signal_handler(sig, on_signal, sig)
        return await collect_async(cfg, progress=progress, stop=stop, collector=col)

    return asyncio.run(main())
