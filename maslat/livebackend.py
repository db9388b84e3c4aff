"""``LiveBackend``: the environments' LLM calls as streamed HTTP requests to live vLLM servers.

It implements the seam of ``envs.backend`` on an asyncio event loop in wall-clock time, so
the environments (``MASLatencyEnv``, ``MASLatencyCMDPEnv``: their task models and any policy) run unchanged
against real servers:

============================  ==============================================================================
``submit(pool, p, n, segs)``  a streamed ``/v1/completions`` request to the pool's endpoint
                              (``traces.client.stream_request``): a token-id prompt of exactly ``p`` tokens,
                              ``max_tokens = n`` with ``ignore_eos`` (exactly ``n`` output tokens, as in the
                              simulator), done at ``[DONE]``. Prompt content follows ``segs``: each
                              ``(content_id, n)`` segment is the same ``n`` token ids wherever it appears, so
                              prompts that share an instruction and a query share a cached prefix on the
                              server, as they do in the simulator.
``timeout(s)``, ``now``       the server's clock: wall seconds divided by the stand-in's ``maslat:time_scale``
                              (1 for a real vLLM), as ``traces.collect`` plays it
``process(gen)``              an asyncio task that drives the generator: it awaits what the generator yields
                              and sends the value back (the SimPy protocol, on asyncio)
``load()``                    the latest scrape of every endpoint's ``/metrics`` (every ``scrape_interval_s``
                              in the background): running and waiting requests per engine, mean KV usage
``pool_state(pool, out)``     one pool's latest scrape: waiting and running requests (sums over its engines),
                              mean KV usage; and the EMA (ms) of the TTFT of its calls as this client saw it
                              (the simulator's is the engines'; vLLM's ``/metrics`` has only a histogram)
``any_of(ws)``                fires once one of ``ws`` has (``asyncio.wait``, first completed)
``run(until)``                runs the loop until ``until`` fires; an exception in any process ends it at once
============================  ==============================================================================

A call that fails (an HTTP error, a refused connection, a stream cut short) is counted and reported to the
environment as rejected (``reject_reason``), exactly like a request the simulator cannot serve; nothing is
retried behind the caller's back. Needs ``aiohttp`` (``pip install 'maslatency[server]'``).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Generator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from traces.client import (
    Clock,
    StreamResult,
    auth_headers,
    base_url,
    completion_body,
    served_model,
    stream_request,
)
from traces.scrape import Scrape, parse_scrape

__all__ = ["CallResult", "Endpoint", "LiveBackend", "parse_endpoints"]

#: weight of the newest TTFT in a pool's EMA (the simulator's engine default, ``sim.engine``)
TTFT_EMA_ALPHA = 0.2
_TOKEN_LOW, _TOKEN_HIGH = 1000, 30000  # ids valid for any tokenizer with >= 32k tokens (as traces.loadplan)


@dataclass(frozen=True, slots=True, kw_only=True)
class Endpoint:
    """One model pool's server: its base URL, its Prometheus page, the model name to request and the API key
    (``vllm serve --api-key``; sent as ``Authorization: Bearer``, never printed)."""

    url: str
    metrics_url: str | None = None
    model: str | None = None
    api_key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for u in (self.url, self.metrics_url):
            if u is not None and not u.startswith(("http://", "https://")):
                raise ValueError(f"endpoint URLs must be http(s) URLs, got {u!r}")

    @property
    def base(self) -> str:
        return base_url(self.url)

    @property
    def metrics(self) -> str:
        return self.metrics_url or self.base + "/metrics"


def parse_endpoints(items: Iterable[str], default_pool: str) -> dict[str, Endpoint]:
    """``POOL=URL`` or ``URL`` (the ``default_pool``) items, as ``--endpoint`` gives them."""
    out: dict[str, Endpoint] = {}
    for item in items:
        pool, sep, url = item.partition("=")
        if not sep or "://" in pool:
            pool, url = default_pool, item
        if pool in out:
            raise ValueError(f"two endpoints for pool {pool!r}: one URL per model pool")
        out[pool] = Endpoint(url=url)
    if not out:
        raise ValueError("give at least one endpoint (--endpoint URL)")
    return out


@dataclass(slots=True)
class CallResult:
    """One LLM call as the environment sees it (``reject_reason`` is ``None`` when it was served)."""

    reject_reason: str | None
    prompt_tokens: int
    output_tokens: int
    ttft_s: float | None = None
    latency_s: float | None = None


class _Event:
    """A waitable that ``succeed(value)`` fires (SimPy's ``Event`` interface, on an asyncio future)."""

    __slots__ = ("future",)

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.future = loop.create_future()

    def succeed(self, value: Any = None) -> _Event:
        self.future.set_result(value)
        return self

    @property
    def triggered(self) -> bool:
        return self.future.done()

    def __await__(self):
        return self.future.__await__()


@functools.lru_cache(maxsize=4096)
def _segment_tokens(content_id: int, n: int, salt: int = 0) -> tuple[int, ...]:
    """The token ids of ``n`` tokens of content ``content_id``: the same wherever the content appears (within
    one ``salt``: another salt gives other ids, so a server's prefix cache from an earlier run cannot hit)."""
    words = [content_id & (2**63 - 1), n] + ([salt] if salt else [])
    g = np.random.Generator(np.random.PCG64(np.random.SeedSequence(words)))
    return tuple(g.integers(_TOKEN_LOW, _TOKEN_HIGH, n).tolist())


@dataclass(slots=True)
class _Pool:
    endpoint: Endpoint
    model: str = ""
    max_model_len: int | None = None
    scrape: Scrape | None = None
    scrape_failures: int = 0
    stats: dict = field(default_factory=lambda: {"calls": 0, "failed": 0, "errors": {}})
    ttft_ema_s: float | None = None
    session: Any = None  # this endpoint's aiohttp session (its key in the headers)


class LiveBackend:
    """Live vLLM (or stand-in) servers behind the ``envs.backend`` seam (see the module docstring).

    Args:
        endpoints: model pool name -> ``Endpoint`` (or its URL).
        scrape_interval_s: server seconds between scrapes of each ``/metrics``.
        request_timeout_s: a call taking longer (server seconds) fails.
        prompt_salt: mixed into every prompt's token ids (0: none). The same content still gives the same ids
            within a run (prefix sharing as in the simulator), but a server that served an earlier run with
            another salt holds none of them in its prefix cache: a validation against a simulator that starts
            cold must start the live server cold too (``maslat.validation`` draws a fresh salt per run).
    """

    def __init__(self, endpoints: Mapping[str, Endpoint | str], *, scrape_interval_s: float = 0.5,
                 request_timeout_s: float = 600.0, prompt_salt: int = 0):
        if not endpoints:
            raise ValueError("LiveBackend needs at least one endpoint")
        if not scrape_interval_s > 0 or not request_timeout_s > 0:
            raise ValueError("scrape_interval_s and request_timeout_s must be positive")
        self.pools = {p: _Pool(e if isinstance(e, Endpoint) else Endpoint(url=e)) for p, e in endpoints.items()}
        self.scrape_interval_s, self.request_timeout_s = scrape_interval_s, request_timeout_s
        self.prompt_salt = int(prompt_salt)
        self.loop = asyncio.new_event_loop()
        self.clock = Clock(1.0)
        self.time_scale: float | None = None
        self._sessions = None
        self._scrapers: list[asyncio.Task] = []
        self._failure: asyncio.Future | None = None
        self._rng = np.random.Generator(np.random.PCG64(0))  # token ids of prompts with no content segments

    # ------------------------------------------------------------------ lifecycle
    @property
    def started(self) -> bool:
        return self._sessions is not None

    def reset(self, seed: int) -> None:
        """Connect (once: discover each pool's model, read the servers' time scale, start scraping); restart
        the clock. ``seed`` only seeds the token ids of prompts without content segments."""
        if self._sessions is None:
            self.loop.run_until_complete(self._open())
        salt = [self.prompt_salt] if self.prompt_salt else []
        self._rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 271828, *salt])))
        self.clock = Clock(self.time_scale)

    async def _open(self) -> None:
        import aiohttp

        self._sessions = []
        for pool in self.pools.values():
            pool.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
                headers=auth_headers(pool.endpoint.api_key))
            self._sessions.append(pool.session)
        self._failure = self.loop.create_future()
        scales = set()
        for name, pool in self.pools.items():
            card = await served_model(pool.session, pool.endpoint.base, pool.endpoint.model)
            pool.model, pool.max_model_len = card["id"], card.get("max_model_len")
            pool.scrape = await self._scrape(pool, None)
            if pool.scrape is None:
                raise ValueError(f"pool {name!r}: cannot scrape {pool.endpoint.metrics} (a vLLM /metrics page)")
            scales.add(pool.scrape.time_scale or 1.0)
        if len(scales) > 1:
            raise ValueError(f"the endpoints run at different time scales {sorted(scales)} (maslat serve --time-scale)")
        self.time_scale = scales.pop()
        self.clock = Clock(self.time_scale)
        self._scrapers = [self.loop.create_task(self._scrape_loop(p)) for p in self.pools.values()]

    def close(self) -> None:
        """Stop scraping, close the connections and the event loop (idempotent)."""
        if self.loop.is_closed():
            return
        for t in self._scrapers:
            t.cancel()
        pending = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        for session in self._sessions or ():
            self.loop.run_until_complete(session.close())
        self.loop.close()

    # ------------------------------------------------------------------ the seam
    @property
    def now(self) -> float:
        return self.clock.elapsed()

    def event(self) -> _Event:
        return _Event(self.loop)

    def process(self, gen: Generator) -> asyncio.Task:
        return self.loop.create_task(self._drive(gen))

    def timeout(self, seconds: float) -> asyncio.Task:
        return self.loop.create_task(asyncio.sleep(seconds * self.clock.time_scale))

    def all_of(self, waitables: Iterable[Any]) -> asyncio.Task:
        ws = list(waitables)

        async def gather() -> dict:
            return dict(zip(ws, await asyncio.gather(*ws), strict=True))

        return self.loop.create_task(gather())

    def any_of(self, waitables: Iterable[Any]) -> asyncio.Task:
        ws = [w.future if isinstance(w, _Event) else w for w in waitables]

        async def first() -> None:
            await asyncio.wait(ws, return_when=asyncio.FIRST_COMPLETED)

        return self.loop.create_task(first())

    def submit(self, pool: str, prompt_tokens: int, max_tokens: int,
               prompt_segments: tuple[tuple[int, int], ...] | None) -> asyncio.Task:
        if pool not in self.pools:
            raise ValueError(f"no endpoint for model pool {pool!r}; endpoints: {sorted(self.pools)}")
        return self.loop.create_task(self._call(self.pools[pool], prompt_tokens, max_tokens, prompt_segments))

    def run(self, until: Any) -> None:
        fut = until.future if isinstance(until, _Event) else until
        self.loop.run_until_complete(self._until(fut))

    def load(self) -> tuple[float, float, float]:
        run_n = wait_n = kv = 0.0
        engines = kv_engines = 0
        for p in self.pools.values():
            s = p.scrape
            n = max(1, len(s.engines))
            run_n, wait_n, engines = run_n + s.running, wait_n + s.waiting, engines + n
            if s.kv_usage is not None:
                kv, kv_engines = kv + s.kv_usage * n, kv_engines + n
        return run_n / engines, wait_n / engines, kv / kv_engines if kv_engines else 0.0

    def pool_state(self, pool: str, out) -> None:
        """``[waiting, running, kv usage, ttft ema ms]`` of ``pool`` into ``out`` (see the module docstring)."""
        p = self.pools[pool]
        s = p.scrape
        out[0], out[1], out[2] = s.waiting, s.running, s.kv_usage or 0.0
        out[3] = 1e3 * p.ttft_ema_s if p.ttft_ema_s is not None else 0.0

    def is_event(self, x: Any) -> bool:
        return isinstance(x, (_Event, asyncio.Future))

    # ------------------------------------------------------------------ what the servers said
    def engines(self, pool: str) -> int:
        """Engines (data-parallel replicas) behind ``pool``'s endpoint, from its ``/metrics``."""
        return max(1, len(self.pools[pool].scrape.engines))

    def stats(self) -> dict:
        """Per pool: its URL and model, calls sent and failed (with the errors), scrape failures."""
        return {name: {"url": p.endpoint.base, "model": p.model, "engines": len(p.scrape.engines) if p.scrape else None,
                       **p.stats, "scrape_failures": p.scrape_failures} for name, p in self.pools.items()}

    # ------------------------------------------------------------------ internals
    async def _drive(self, gen: Generator) -> Any:
        """Run a generator process: await each waitable it yields and send the value back."""
        value = None
        try:
            while True:
                try:
                    waitable = gen.send(value)
                except StopIteration as stop:
                    return stop.value
                value = await (waitable.future if isinstance(waitable, _Event) else waitable)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # a bug in a process must end run(), not hang it
            if not self._failure.done():
                self._failure.set_exception(e)
            raise

    async def _until(self, fut) -> None:
        await asyncio.wait({asyncio.ensure_future(fut), self._failure}, return_when=asyncio.FIRST_COMPLETED)
        if self._failure.done():
            self._failure.result()  # raises the process's exception

    def _prompt(self, pool: _Pool, prompt_tokens: int, segments) -> list[int]:
        ids: list[int] = []
        for content_id, n in segments or ():
            ids.extend(_segment_tokens(int(content_id), int(n), self.prompt_salt))
        if len(ids) < prompt_tokens:
            ids.extend(self._rng.integers(_TOKEN_LOW, _TOKEN_HIGH, prompt_tokens - len(ids)).tolist())
        return ids[:prompt_tokens]

    async def _call(self, pool: _Pool, prompt_tokens: int, max_tokens: int, segments) -> CallResult:
        body = completion_body(pool.model, self._prompt(pool, prompt_tokens, segments), max_tokens)
        pool.stats["calls"] += 1
        res = StreamResult(sent_mono=self.clock.mono(), sent_epoch=self.clock.epoch())
        try:
            await asyncio.wait_for(stream_request(pool.session, pool.endpoint.base + "/v1/completions", body,
                                                  self.clock, res), self.request_timeout_s * self.clock.time_scale)
        except TimeoutError:
            res.error = f"no answer within {self.request_timeout_s} s"
        done = self.clock.mono()
        if not res.ok:
            pool.stats["failed"] += 1
            key = (res.error or "no output").split(":")[0]
            pool.stats["errors"][key] = pool.stats["errors"].get(key, 0) + 1
            return CallResult(res.error or "no output", prompt_tokens, len(res.chunk_times))
        ttft = res.chunk_times[0] - res.sent_mono
        e = pool.ttft_ema_s
        pool.ttft_ema_s = ttft if e is None else TTFT_EMA_ALPHA * ttft + (1 - TTFT_EMA_ALPHA) * e
        return CallResult(None, res.prompt_tokens or prompt_tokens, res.output_tokens, ttft, done - res.sent_mono)

    async def _scrape(self, pool: _Pool, model: str | None) -> Scrape | None:
        import aiohttp

        try:
            async with pool.session.get(pool.endpoint.metrics, timeout=aiohttp.ClientTimeout(total=10)) as r:
                if r.status != 200:
                    return None
                return parse_scrape(await r.text(), model)
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError):
            return None

    async def _scrape_loop(self, pool: _Pool) -> None:
        model = pool.model if pool.model in pool.scrape.models else None
        while True:
            await asyncio.sleep(self.scrape_interval_s * self.clock.time_scale)
            s = await self._scrape(pool, model)
            if s is None:
                pool.scrape_failures += 1  # keep the last good reading: load() never invents a value
            else:
                pool.scrape = s
