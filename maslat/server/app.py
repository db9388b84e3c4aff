"""The stand-in vLLM server: an aiohttp application over a simulated pool that runs in real time.

Endpoints (as vLLM's OpenAI-compatible server): ``POST /v1/completions``, ``POST /v1/chat/completions``
(server-sent events when ``stream`` is true), ``GET /v1/models``, ``GET /health``, ``GET /version`` and
``GET /metrics`` (Prometheus text with vLLM's names; see ``sim.metrics``).

One request's life::

    HTTP body --parse/validate--> 4xx (OpenAI error JSON)          [maslat.server.openai]
        | ok
        v
    LiveSim.open --> world.open_request (routed to a replica, queued after the frontend delay)
        |   engine steps in real time; after each step the handler is woken with the new token count
        v
    SSE: one chunk per output token at its step's time (role chunk with the first token for chat;
         finish_reason on the last token), then the usage chunk and [DONE] at the simulated client-side
         completion time. Non-streaming: one JSON body at that time.
    client gone (handler cancelled or a write fails) --> LiveSim.abort: the slot and blocks are freed;
         the request is counted ``aborted`` (also when only the last bytes could not be written).

Hostile clients: connections are capped and must send their headers within a deadline
(``maslat.server.guard``); bodies must arrive within ``body_timeout_s`` (else 408); bodies over 64 KiB are
parsed and tokenized in a worker thread so a 10 MB prompt does not stall every stream; prompts are bounded in
characters and tokens as vLLM bounds them (``maslat.server.openai``); ``/v1/*`` needs a key when keys are set
(``maslat.server.middleware``); a finished request's record is dropped once ``/metrics`` has counted it
(unless ``keep_records``), so memory does not grow with the number of requests served.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field

from sim import Profile

from .guard import ConnectionGuard, RateLimitedLog, fd_room, quiet_logs
from .live import LiveSim
from .middleware import KeyCheck, make_middlewares
from .openai import APIError, error_body, loads_object, parse_chat, parse_completion
from .sse import SSEChunks as _Chunks
from .tokenizer import output_text, prompt_segments

__all__ = ["ServeConfig", "StandInServer"]

STAND_IN_VERSION = "0.19.0+maslat.standin"  # the vLLM version whose behaviour is simulated
_INLINE_PARSE_BYTES = 64 * 1024  # larger bodies are parsed and tokenized in a worker thread
_FORGET_EVERY_S = 5.0  # wall seconds between drops of records already counted by /metrics


@dataclass(frozen=True, slots=True, kw_only=True)
class ServeConfig:
    """How to run the stand-in server.

    Attributes:
        profile: the serving profile every replica simulates.
        replicas: engines behind the server (exposed as ``engine="0"..`` like a data-parallel vLLM).
        router: how requests are spread over replicas (``sim.ROUTERS``).
        host, port: where to listen (port 0 picks a free port).
        time_scale: wall seconds per simulated second (1 = real time; 0.1 = ten times faster).
        served_model_name: the model name clients must use (default: the profile's model name).
        seed: the world's seed.
        default_max_tokens: cap on ``max_tokens`` when a request gives none (``None``: vLLM's rule, the
            room left in ``max_model_len``).
        api_keys: keys accepted on ``/v1/*`` (``Authorization: Bearer <key>``); empty: no key needed.
        max_connections: open connections at most; at the cap a new connection evicts the longest-idle one
            or, when all are busy, is refused (``maslat.server.guard``). Lowered to the file limit.
        header_timeout_s: a connection must send complete request headers within this (slowloris).
        body_timeout_s: a request body must arrive within this, else ``408``.
        keepalive_timeout_s: idle keep-alive connections are closed after this (aiohttp's default 75 s; vLLM's
            uvicorn uses 5 s, which races clients that reuse a pooled connection). Deadlines can be generous:
            at the cap the longest-idle connection is evicted first.
        vocab_size: token ids at or above it are refused (``None``: the profile's embedding rows,
            ``embedding_params / hidden_size``, when that is a whole number).
        keep_records: keep every finished request's record in ``world.records`` (in-process analysis);
            otherwise records are dropped once ``/metrics`` has counted them.
        log_interval_s: refused connections and repeated loop errors are logged at most once per interval.
    """

    profile: Profile
    replicas: int = 1
    router: str = "least_outstanding"
    host: str = "127.0.0.1"
    port: int = 8000
    time_scale: float = 1.0
    served_model_name: str | None = None
    seed: int = 0
    default_max_tokens: int | None = None
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    max_connections: int = 8192
    header_timeout_s: float = 30.0
    body_timeout_s: float = 60.0
    keepalive_timeout_s: float = 75.0
    vocab_size: int | None = None
    keep_records: bool = False
    log_interval_s: float = 10.0

    def __post_init__(self) -> None:
        if not isinstance(self.replicas, int) or self.replicas < 1:
            raise ValueError(f"replicas must be an integer >= 1, got {self.replicas!r}")
        if not (isinstance(self.time_scale, (int, float)) and self.time_scale > 0):
            raise ValueError(f"time_scale must be positive (wall seconds per simulated second), got {self.time_scale!r}")
        if not isinstance(self.port, int) or not 0 <= self.port < 65536:
            raise ValueError(f"port must be in 0..65535, got {self.port!r}")
        if self.default_max_tokens is not None and self.default_max_tokens < 1:
            raise ValueError("default_max_tokens must be >= 1 or None (vLLM's rule)")
        if not isinstance(self.api_keys, tuple) or not all(isinstance(k, str) and k for k in self.api_keys):
            raise ValueError("api_keys must be a tuple of non-empty strings")
        if not isinstance(self.max_connections, int) or self.max_connections < 2:
            raise ValueError(f"max_connections must be an integer >= 2, got {self.max_connections!r}")
        for name in ("header_timeout_s", "body_timeout_s", "keepalive_timeout_s", "log_interval_s"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v > 0):
                raise ValueError(f"{name} must be a positive number of seconds, got {v!r}")
        if self.vocab_size is not None and (not isinstance(self.vocab_size, int) or self.vocab_size < 1):
            raise ValueError(f"vocab_size must be a positive integer or None, got {self.vocab_size!r}")

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.profile.model.name

    @property
    def effective_vocab_size(self) -> int | None:
        if self.vocab_size is not None:
            return self.vocab_size
        m = self.profile.model
        rows = m.embedding_params / m.hidden_size
        return int(rows) if rows >= 1 and rows == int(rows) else None


class StandInServer:
    """The aiohttp application, the live simulation behind it and its counters."""

    def __init__(self, cfg: ServeConfig):
        from sim import PoolSpec, make_world
        from sim.metrics import MetricsBook

        from .prometheus import MetricsExporter

        self.cfg = cfg
        self.model = cfg.model_name
        self.engine = cfg.profile.engine
        self.world = make_world(PoolSpec(name="serve", profile=cfg.profile, replicas=cfg.replicas, router=cfg.router),
                                seed=cfg.seed, sample_interval_s=None, jumps=False)
        self.sim = LiveSim(self.world, "serve", time_scale=cfg.time_scale)
        self.book = MetricsBook(self.world, "serve", self.model)
        self.exporter = MetricsExporter(self.book, lambda: self.sim.sim_now(), time_scale=cfg.time_scale,
                                        lag=lambda: (self.sim.max_lag_s, self.sim.late_ticks))
        self.created = int(time.time())
        self.counts: Counter[str] = Counter()
        self._next_id = 0
        self._runner = None
        self._listener: asyncio.AbstractServer | None = None
        self._forget: asyncio.TimerHandle | None = None
        self._pool = None  # the worker thread that parses large bodies
        self._unquiet = None  # removes the logging filter installed by start()
        self.log = RateLimitedLog(cfg.log_interval_s)
        room = fd_room()
        self.guard = ConnectionGuard(max_connections=min(cfg.max_connections, room or cfg.max_connections),
                                     header_timeout_s=cfg.header_timeout_s,
                                     keepalive_timeout_s=cfg.keepalive_timeout_s, log=self.log)
        self.keys = KeyCheck(cfg.api_keys)
        self.url: str | None = None

    # ------------------------------------------------------------------ lifecycle
    def make_app(self):
        from aiohttp import web

        app = web.Application(client_max_size=64 * 2**20, middlewares=make_middlewares(self.keys, self.guard))
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/version", self.version)
        app.router.add_get("/metrics", self.metrics)
        return app

    async def start(self) -> str:
        """Listen (through the connection guard) and start the simulated clock; return the base URL."""
        from concurrent.futures import ThreadPoolExecutor

        from aiohttp import web

        loop = asyncio.get_running_loop()
        self._unquiet = quiet_logs(loop, self.log)
        self._runner = web.AppRunner(self.make_app(), handle_signals=False, handler_cancellation=True,
                                     access_log=None, keepalive_timeout=self.cfg.keepalive_timeout_s)
        await self._runner.setup()
        self._listener = await loop.create_server(self.guard.factory(self._runner.server), self.cfg.host,
                                                  self.cfg.port, backlog=4096, reuse_address=True)
        port = self._listener.sockets[0].getsockname()[1]
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="maslat-parse")
        self.sim.start()
        if not self.cfg.keep_records:
            self._forget = loop.call_later(_FORGET_EVERY_S, self._forget_records)
        self.url = f"http://{self.cfg.host}:{port}"
        return self.url

    async def stop(self) -> None:
        self.sim.stop()
        if self._forget is not None:
            self._forget.cancel()
        if self._listener is not None:
            self._listener.close()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if self._unquiet is not None:
            self._unquiet()

    def _forget_records(self) -> None:
        self.sim.catch_up()
        self.book.forget_observed()
        self._forget = asyncio.get_running_loop().call_later(_FORGET_EVERY_S, self._forget_records)

    def summary(self) -> dict:
        w = self.world
        return {"model": self.model, "profile": self.cfg.profile.name, "replicas": self.cfg.replicas,
                "time_scale": self.cfg.time_scale, "simulated_s": w.now, "requests": self.counts["requests"],
                "completed": self.counts["completed"], "aborted": self.counts["aborted"],
                "client_errors": self.counts["client_errors"], "max_lag_s": self.sim.max_lag_s,
                "connections": {k: self.guard.counts[k] for k in ("accepted", "evicted", "refused", "timed_out")}
                | {"peak": self.guard.peak, "max": self.guard.max_connections},
                "late_ticks": self.sim.late_ticks, "records_kept": len(w.records) if w.records is not None else 0,
                "preemptions": sum(r.core.num_preemptions for r in w.replicas)}

    # ------------------------------------------------------------------ simple endpoints
    async def health(self, request):
        from aiohttp import web

        return web.Response(status=200)

    async def version(self, request):
        from aiohttp import web

        return web.json_response({"version": STAND_IN_VERSION, "profile": self.cfg.profile.name})

    async def models(self, request):
        from aiohttp import web

        card = {"id": self.model, "object": "model", "created": self.created, "owned_by": "vllm", "root": self.model,
                "parent": None, "max_model_len": self.engine.max_model_len}
        return web.json_response({"object": "list", "data": [card]})

    async def metrics(self, request):
        from aiohttp import web

        from .prometheus import CONTENT_TYPE

        self.sim.catch_up()
        return web.Response(body=self.exporter.render(), headers={"Content-Type": CONTENT_TYPE})

    # ------------------------------------------------------------------ generation
    async def completions(self, request):
        return await self._generate(request, parse_completion, "cmpl")

    async def chat_completions(self, request):
        return await self._generate(request, parse_chat, "chatcmpl")

    async def _read_body(self, request) -> bytes:
        from aiohttp import web

        try:
            return await asyncio.wait_for(request.read(), self.cfg.body_timeout_s)
        except TimeoutError:
            raise APIError(408, f"the request body did not arrive within {self.cfg.body_timeout_s:g} s") from None
        except web.HTTPRequestEntityTooLarge:
            self.counts["client_errors"] += 1
            raise  # the middleware answers 413 as JSON

    async def _parse(self, parse, raw: bytes):
        def work():
            return parse(loads_object(raw), served_model=self.model, max_model_len=self.engine.max_model_len,
                         default_max_tokens=self.cfg.default_max_tokens, vocab_size=self.cfg.effective_vocab_size)

        if len(raw) <= _INLINE_PARSE_BYTES:
            return work()
        return await asyncio.get_running_loop().run_in_executor(self._pool, work)

    async def _generate(self, request, parse, prefix: str):
        from aiohttp import web

        self.counts["requests"] += 1
        try:
            gen = await self._parse(parse, await self._read_body(request))
        except APIError as e:
            self.counts["client_errors"] += 1
            resp = web.json_response(error_body(e), status=e.status)
            if e.status == 408:
                resp.force_close()
            return resp
        except asyncio.CancelledError:  # the client left while its body was read or parsed
            self.counts["aborted"] += 1
            raise
        self._next_id += 1
        rid = f"{prefix}-{self._next_id:08x}"
        segs = prompt_segments(gen.token_ids, self.engine.block_size) if self.engine.enable_prefix_caching else None
        live = self.sim.open(gen.prompt_tokens, gen.max_tokens, prompt_segments=segs, request_id=rid)
        delivered = False
        try:
            if gen.stream:
                sent_all = [False]  # set once [DONE] is written: the client has the whole answer
                try:
                    return await self._stream(request, gen, live, rid, sent_all)
                finally:
                    delivered = sent_all[0]
            while not live.finished:
                live.wake.clear()
                await live.wake.wait()
            delivered = True
            return web.json_response(self._full_body(gen, live, rid))
        finally:
            if not live.finished:  # cancelled (client gone) or a failed write
                self.sim.abort(live)
            self.counts["completed" if delivered else "aborted"] += 1

    def _full_body(self, gen, live, rid: str) -> dict:
        n = live.record.output_tokens
        text = output_text(0, n)
        if gen.kind == "completion":
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "length", "stop_reason": None}
            obj = "text_completion"
        else:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": "length", "stop_reason": None}
            obj = "chat.completion"
        usage = {"prompt_tokens": gen.prompt_tokens, "total_tokens": gen.prompt_tokens + n, "completion_tokens": n}
        return {"id": rid, "object": obj, "created": int(time.time()), "model": self.model, "choices": [choice],
                "usage": usage}

    async def _stream(self, request, gen, live, rid: str, sent_all: list):
        from aiohttp import web

        resp = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream; charset=utf-8",
                                                       "Cache-Control": "no-cache"})
        try:
            await self._stream_to(request, resp, gen, live, rid, sent_all)
        except ConnectionResetError:  # the client left (aiohttp's ClientConnectionResetError), quietly
            pass
        return resp

    async def _stream_to(self, request, resp, gen, live, rid: str, sent_all: list) -> None:
        await resp.prepare(request)
        chunks = _Chunks(gen.kind, rid, int(time.time()), self.model)
        sent = 0
        while True:
            live.wake.clear()
            n, done = live.seen, live.finished
            if n > sent:
                parts = [chunks.role()] if sent == 0 and gen.kind == "chat" else []
                parts += [chunks.token(k, k == gen.max_tokens - 1) for k in range(sent, n)]
                sent = n
                await resp.write("".join(parts).encode())
            if done:
                break
            if live.seen == sent and not live.finished:
                await live.wake.wait()
        tail = chunks.usage(gen.prompt_tokens, sent) if gen.include_usage else ""
        await resp.write((tail + "data: [DONE]\n\n").encode())
        sent_all[0] = True  # a client that closes now, without reading the end of the body, has it all
        await resp.write_eof()


async def serve_forever(cfg: ServeConfig, *, on_ready=None, stop: asyncio.Event | None = None) -> dict:
    """Run the server until ``stop`` is set; return its summary. ``on_ready(url)`` is called once listening."""
    server = StandInServer(cfg)
    url = await server.start()
    if on_ready is not None:
        on_ready(url)
    stop = stop or asyncio.Event()
    try:
        await stop.wait()
    finally:
        await server.stop()
    return server.summary()
