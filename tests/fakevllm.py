"""A tiny misbehaving OpenAI-compatible server on loopback (aiohttp, in a thread of the test process), for the
collector's hostile-network tests: what the real stand-in server never does on purpose.

Modes (``/v1/completions``): ``ok`` streams ``max_tokens`` chunks and usage; ``http500`` answers every request
with a 500; ``long_line`` sends one stream line of 600 KiB on every third request (aiohttp's reader refuses lines
over 512 KiB with ``LineTooLong``); ``hang`` never answers. ``time_scale`` is published as ``maslat:time_scale``.
With ``engines`` > 1 it serves request ``n`` on engine ``n % engines`` and publishes each engine's
``vllm:request_{prefill,decode}_time_seconds`` sums and counts, labelled ``engine="<i>"`` as a data-parallel
vLLM does (prefill 10 ms per request on engine ``i`` times ``i + 1``, decode 1 ms per output token).
"""

from __future__ import annotations

import asyncio
import json
import threading

from aiohttp import web

METRICS = """# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{engine="0",model_name="fake"}} {running}
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{{engine="0",model_name="fake"}} 0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{{engine="0",model_name="fake"}} 0.1
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{{engine="0",model_name="fake"}} {prompt}
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{{engine="0",model_name="fake"}} {gen}
"""


class FakeServer:
    def __init__(self, mode: str = "ok", time_scale: float | None = None, token_gap_s: float = 0.002,
                 engines: int = 1):
        self.mode, self.time_scale, self.gap = mode, time_scale, token_gap_s
        self.latency = [[0.0, 0.0, 0] for _ in range(engines)]  # per engine: prefill sum, decode sum, count
        self.count = self.running = self.prompt = self.gen = 0
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    # -------------------------------------------------------------- handlers
    async def models(self, _req):
        return web.json_response({"data": [{"id": "fake", "max_model_len": 4096}]})

    async def metrics(self, _req):
        text = METRICS.format(running=self.running, prompt=self.prompt, gen=self.gen)
        if self.time_scale is not None:
            text += f"# TYPE maslat:time_scale gauge\nmaslat:time_scale {self.time_scale!r}\n"
        for i, (p, d, c) in enumerate(self.latency if len(self.latency) > 1 else []):
            for name, v in (("prefill", p), ("decode", d)):
                text += (f'vllm:request_{name}_time_seconds_sum{{engine="{i}",model_name="fake"}} {v!r}\n'
                         f'vllm:request_{name}_time_seconds_count{{engine="{i}",model_name="fake"}} {c}.0\n')
        return web.Response(text=text, content_type="text/plain")

    async def completions(self, req):
        body = await req.json()
        self.count += 1
        n = self.count
        if self.mode == "http500":
            return web.json_response({"error": {"message": "boom", "type": "InternalServerError"}}, status=500)
        if self.mode == "hang":
            await asyncio.sleep(3600)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(req)
        self.running += 1
        try:
            out = int(body.get("max_tokens", 4))
            for i in range(out):
                chunk = {"choices": [{"index": 0, "text": " tok"}]}
                if self.mode == "long_line" and n % 3 == 0 and i == 1:
                    chunk["choices"][0]["text"] = "x" * (600 * 1024)
                await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
                await asyncio.sleep(self.gap)
            prompt = len(body["prompt"]) if isinstance(body.get("prompt"), list) else 10
            self.prompt += prompt
            self.gen += out
            lat = self.latency[n % len(self.latency)]
            lat[0] += 0.01 * (n % len(self.latency) + 1)
            lat[1] += 0.001 * out
            lat[2] += 1
            usage = {"choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": out}}
            await resp.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
        finally:
            self.running -= 1
        return resp

    # -------------------------------------------------------------- life cycle
    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_post("/v1/completions", self.completions)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0)  # a hanging handler must not hold the exit
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        port = site._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self._started.set()
        self._loop.run_forever()

    def __enter__(self) -> FakeServer:
        self._thread.start()
        assert self._started.wait(10), "the fake server did not start"
        return self

    def __exit__(self, *exc) -> None:
        async def stop() -> None:
            await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
