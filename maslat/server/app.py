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
    client gone (handler cancelled or a write fails) --> LiveSim.abort: the slot and blocks are freed.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass

from sim import Profile

from .live import LiveSim
from .openai import APIError, error_body, loads_object, parse_chat, parse_completion
from .tokenizer import output_text, prompt_segments

__all__ = ["ServeConfig", "StandInServer"]

STAND_IN_VERSION = "0.19.0+maslat.standin"  # the vLLM version whose behaviour is simulated


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

    def __post_init__(self) -> None:
        if not isinstance(self.replicas, int) or self.replicas < 1:
            raise ValueError(f"replicas must be an integer >= 1, got {self.replicas!r}")
        if not (isinstance(self.time_scale, (int, float)) and self.time_scale > 0):
            raise ValueError(f"time_scale must be positive (wall seconds per simulated second), got {self.time_scale!r}")
        if not isinstance(self.port, int) or not 0 <= self.port < 65536:
            raise ValueError(f"port must be in 0..65535, got {self.port!r}")
        if self.default_max_tokens is not None and self.default_max_tokens < 1:
            raise ValueError("default_max_tokens must be >= 1 or None (vLLM's rule)")

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.profile.model.name


class _Chunks:
    """Pre-rendered SSE chunks of one streamed response (one JSON object per output token)."""

    def __init__(self, kind: str, rid: str, created: int, model: str):
        self.kind = kind
        obj = "text_completion" if kind == "completion" else "chat.completion.chunk"
        self.head = f'{{"id":"{rid}","object":"{obj}","created":{created},"model":{json.dumps(model)},'
        if kind == "completion":
            self.pre = self.head + '"choices":[{"index":0,"text":'
            self.post = ',"logprobs":null,"finish_reason":%s,"stop_reason":null}]}'
        else:
            self.pre = self.head + '"choices":[{"index":0,"delta":{"content":'
            self.post = '},"logprobs":null,"finish_reason":%s}]}'

    def role(self) -> str:
        return (f'data: {self.head}"choices":[{{"index":0,"delta":{{"role":"assistant","content":""}},'
                f'"logprobs":null,"finish_reason":null}}]}}\n\n')

    def token(self, k: int, last: bool) -> str:
        fin = '"length"' if last else "null"
        return "data: " + self.pre + json.dumps(output_text(k, k + 1)) + self.post % fin + "\n\n"

    def usage(self, prompt: int, completion: int) -> str:
        u = {"prompt_tokens": prompt, "total_tokens": prompt + completion, "completion_tokens": completion}
        return f'data: {self.head}"choices":[],"usage":{json.dumps(u)}}}\n\n'


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
        self.url: str | None = None

    # ------------------------------------------------------------------ lifecycle
    def make_app(self):
        from aiohttp import web

        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/version", self.version)
        app.router.add_get("/metrics", self.metrics)
        return app

    async def start(self) -> str:
        """Listen and start the simulated clock; return the base URL."""
        from aiohttp import web

        self._runner = web.AppRunner(self.make_app(), handle_signals=False, handler_cancellation=True,
                                     access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.cfg.host, self.cfg.port, backlog=4096, reuse_address=True)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.sim.start()
        self.url = f"http://{self.cfg.host}:{port}"
        return self.url

    async def stop(self) -> None:
        self.sim.stop()
        if self._runner is not None:
            await self._runner.cleanup()

    def summary(self) -> dict:
        w = self.world
        return {"model": self.model, "profile": self.cfg.profile.name, "replicas": self.cfg.replicas,
                "time_scale": self.cfg.time_scale, "simulated_s": w.now, "requests": self.counts["requests"],
                "completed": self.counts["completed"], "aborted": self.counts["aborted"],
                "client_errors": self.counts["client_errors"], "max_lag_s": self.sim.max_lag_s,
                "late_ticks": self.sim.late_ticks,
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

    async def _generate(self, request, parse, prefix: str):
        from aiohttp import web

        self.counts["requests"] += 1
        try:
            gen = parse(loads_object(await request.read()), served_model=self.model,
                        max_model_len=self.engine.max_model_len, default_max_tokens=self.cfg.default_max_tokens)
        except APIError as e:
            self.counts["client_errors"] += 1
            return web.json_response(error_body(e), status=e.status)
        self._next_id += 1
        rid = f"{prefix}-{self._next_id:08x}"
        segs = prompt_segments(gen.token_ids, self.engine.block_size) if self.engine.enable_prefix_caching else None
        live = self.sim.open(gen.prompt_tokens, gen.max_tokens, prompt_segments=segs, request_id=rid)
        try:
            if gen.stream:
                return await self._stream(request, gen, live, rid)
            while not live.finished:
                live.wake.clear()
                await live.wake.wait()
            self.counts["completed"] += 1
            return web.json_response(self._full_body(gen, live, rid))
        finally:
            if not live.finished:  # cancelled (client gone) or a failed write
                self.sim.abort(live)
                self.counts["aborted"] += 1

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

    async def _stream(self, request, gen, live, rid: str):
        from aiohttp import web

        resp = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream; charset=utf-8",
                                                       "Cache-Control": "no-cache"})
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
        await resp.write_eof()
        self.counts["completed"] += 1
        return resp


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
