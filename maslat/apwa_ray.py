"""APWA live on Ray: the manager's plan runs with its workers as Ray actors calling real endpoints.

The same ``envs.apwa`` executor and plan as the simulated run (``APWARun``), with two things moved onto Ray:

* ``RegistryActor``: the capability registry as a **named** actor (``REGISTRY_NAME``, found with
  ``ray.get_actor``). It holds capability -> pools (``envs.apwa.registry.CapabilityRegistry``: ``bind`` picks
  the pool with the fewest calls in flight) and pool -> endpoint bindings, both registered at run time: a
  capability is re-bound for the next call; a re-registered endpoint is used by every worker within
  ``endpoint_ttl_s`` (1 s), and at once after a failed send.
* ``WorkerActor``: an async actor that executes one subproblem call at a time per coroutine (up to
  ``max_concurrency`` at once): it asks the registry for the pool's endpoint and streams an OpenAI-compatible
  ``/v1/completions`` request (``traces.client.stream_request``, as ``maslat.livebackend`` and ``vllm bench
  serve`` do). A transport failure (no connection, a 5xx or 429, a stream cut short) is retried up to
  ``max_attempts`` times with a doubling back-off; a refusal (any other 4xx, e.g. vLLM's 400 for a prompt over
  ``max_model_len``) is final and goes back to the executor as a rejected call, which splits the group.

The driver (``APWAOnRay.run``) is ``maslat.livebackend.LiveBackend`` whose ``submit`` sends the call to the
worker actor with the fewest calls in flight instead of opening the HTTP stream itself (a worker that dies
leaves the rotation and its calls go to another); everything else (the
wall clock over the servers' ``maslat:time_scale``, ``/metrics`` scraping, the SimPy protocol on asyncio) is
LiveBackend's. So the plan, its groups, the merge tree, the bounded concurrency (``Decomposition.max_in_flight``)
and the summary fields are those of the simulated run for the same seed and N.

Ray is imported only when an ``APWAOnRay`` starts (``import maslat.apwa_ray`` does not import it).

    with APWAOnRay({"llama-3.1-8b": "http://127.0.0.1:8000"}, num_cpus=2) as live:
        res = live.run(APWAConfig(models=(m8,)), "extract", 24, seed=0)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

from envs.apwa import APWAConfig, APWARun, Decomposition, RunResult
from envs.apwa.registry import Capability, CapabilityRegistry, default_registry

from .livebackend import TTFT_EMA_ALPHA, CallResult, Endpoint, LiveBackend
from .ray_runner import RayMap, import_ray

__all__ = ["REGISTRY_NAME", "APWAOnRay", "RayWorkersBackend", "RegistryActor", "RegistryClient", "WorkerActor"]

#: the registry actor's name (``ray.get_actor(REGISTRY_NAME)``)
REGISTRY_NAME = "maslat-apwa-registry"


class RegistryActor:
    """Capabilities and endpoints registered at run time (a Ray actor: one call at a time, so ``bind`` and
    ``release`` keep exact in-flight counts for every driver and worker that shares it)."""

    def __init__(self, capabilities: list[Capability], endpoints: dict[str, Endpoint]):
        self.reg = CapabilityRegistry(capabilities)
        self.endpoints: dict[str, Endpoint] = {}
        for pool, ep in endpoints.items():
            self.register_endpoint(pool, ep)

    def register(self, cap: Capability) -> None:
        self.reg.register(cap)

    def unregister(self, name: str) -> None:
        self.reg.unregister(name)

    def names(self) -> tuple[str, ...]:
        return self.reg.names()

    def get(self, name: str) -> Capability:
        return self.reg.get(name)

    def bind(self, name: str) -> str:
        return self.reg.bind(name)

    def release(self, pool: str) -> None:
        self.reg.release(pool)

    def in_flight(self) -> dict[str, int]:
        return dict(self.reg.in_flight)

    def register_endpoint(self, pool: str, endpoint: Endpoint | str) -> None:
        """Bind ``pool`` to a server (replaces an earlier binding; the next call uses it)."""
        self.endpoints[pool] = endpoint if isinstance(endpoint, Endpoint) else Endpoint(url=endpoint)

    def pools(self) -> tuple[str, ...]:
        return tuple(self.endpoints)

    def endpoint(self, pool: str) -> Endpoint:
        ep = self.endpoints.get(pool)
        if ep is None:
            raise ValueError(f"no endpoint registered for pool {pool!r}; registered: {sorted(self.endpoints)} "
                             "(RegistryActor.register_endpoint)")
        return ep


class RegistryClient:
    """The ``CapabilityRegistry`` interface the executor uses, answered by the named registry actor."""

    def __init__(self, actor):
        self.actor, self._ray = actor, import_ray()

    def _get(self, ref):
        return self._ray.get(ref)

    def register(self, cap: Capability) -> None:
        self._get(self.actor.register.remote(cap))

    def unregister(self, name: str) -> None:
        self._get(self.actor.unregister.remote(name))

    def __contains__(self, name: str) -> bool:
        return name in self.names()

    def names(self) -> tuple[str, ...]:
        return self._get(self.actor.names.remote())

    def get(self, name: str) -> Capability:
        return self._get(self.actor.get.remote(name))

    def bind(self, name: str) -> str:
        return self._get(self.actor.bind.remote(name))

    def release(self, pool: str) -> None:
        self.actor.release.remote(pool)   # ordered after this caller's earlier calls (Ray keeps per-caller order)


def _retryable(status: int | None) -> bool:
    """Worth sending again: no HTTP answer at all (connection refused or reset, stream cut), overload or a
    server error. A 4xx is the server refusing this request as it is: sending it again cannot help."""
    return status is None or status == 429 or status >= 500


class WorkerActor:
    """Executes subproblem calls against the pool's endpoint (an async Ray actor; see the module docstring).

    Args:
        registry_name, namespace: the registry actor to ask for endpoints.
        max_attempts: sends of a call before a transport failure is final.
        backoff_s: wait before the second send (doubles each time).
        request_timeout_s: wall seconds one send may take.
        endpoint_ttl_s: wall seconds a pool's endpoint is reused before the registry is asked again (a failed
            send always asks again, so a re-registered endpoint is used by the next send after a failure).
    """

    def __init__(self, registry_name: str = REGISTRY_NAME, namespace: str | None = None, *, max_attempts: int = 3,
                 backoff_s: float = 0.05, request_timeout_s: float = 600.0, endpoint_ttl_s: float = 1.0):
        if max_attempts < 1 or backoff_s < 0 or not request_timeout_s > 0:
            raise ValueError("WorkerActor needs max_attempts >= 1, backoff_s >= 0 and request_timeout_s > 0")
        self.registry_name, self.namespace = registry_name, namespace
        self.max_attempts, self.backoff_s, self.request_timeout_s = max_attempts, backoff_s, request_timeout_s
        self.sessions: dict[tuple[str, str | None], Any] = {}
        self.registry = None
        self.endpoint_ttl_s = endpoint_ttl_s
        self.cached: dict[str, tuple[Endpoint, float]] = {}
        self.counts = {"calls": 0, "attempts": 0, "failed": 0}

    def _session(self, ep: Endpoint):
        import aiohttp

        from traces.client import auth_headers

        key = (ep.base, ep.api_key)
        if key not in self.sessions:
            self.sessions[key] = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0), headers=auth_headers(ep.api_key),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
        return self.sessions[key]

    async def _endpoint(self, pool: str) -> Endpoint:
        """The pool's endpoint, asked of the registry at most every ``endpoint_ttl_s`` and after every failed
        send (each ask is a round trip through another process: on a busy host it costs milliseconds)."""
        hit = self.cached.get(pool)
        now = time.monotonic()
        if hit is None or now - hit[1] > self.endpoint_ttl_s:
            hit = self.cached[pool] = (await self.registry.endpoint.remote(pool), now)
        return hit[0]

    async def call(self, pool: str, model: str, token_ids: list[int], max_tokens: int) -> dict:
        """One call: ``{"error", "status", "attempts", "prompt_tokens", "output_tokens", "ttft_s",
        "latency_s"}`` (wall seconds of the last send; ``error`` is ``None`` when it was served)."""
        from traces.client import Clock, StreamResult, completion_body, stream_request

        if self.registry is None:
            self.registry = import_ray().get_actor(self.registry_name, namespace=self.namespace)
        self.counts["calls"] += 1
        body, clock = completion_body(model, list(token_ids), int(max_tokens)), Clock(1.0)
        for attempt in range(1, self.max_attempts + 1):
            ep = await self._endpoint(pool)
            self.counts["attempts"] += 1
            res = StreamResult(sent_mono=clock.mono(), sent_epoch=clock.epoch())
            try:
                await asyncio.wait_for(stream_request(self._session(ep), ep.base + "/v1/completions", body, clock, res),
                                       self.request_timeout_s)
            except TimeoutError:
                res.error = f"no answer within {self.request_timeout_s} s"
            if not res.ok:
                self.cached.pop(pool, None)   # look the pool up again: it may have been re-registered
            if res.ok or not _retryable(res.status) or attempt == self.max_attempts:
                break
            await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
        if not res.ok:
            self.counts["failed"] += 1
        return {"error": None if res.ok else (res.error or "no output"), "status": res.status, "attempts": attempt,
                "prompt_tokens": res.prompt_tokens or len(token_ids), "output_tokens": res.output_tokens,
                "ttft_s": res.chunk_times[0] - res.sent_mono if res.chunk_times else None,
                "latency_s": clock.mono() - res.sent_mono}

    async def ready(self) -> bool:
        """Warm up before the clock starts: import the HTTP client, find the registry, and open a connection to
        every registered endpoint (a cold first call costs a real run hundreds of milliseconds)."""
        import aiohttp

        from traces.client import stream_request  # noqa: F401

        if self.registry is None:
            self.registry = import_ray().get_actor(self.registry_name, namespace=self.namespace)
        for pool in await self.registry.pools.remote():
            ep = await self.registry.endpoint.remote(pool)
            try:
                async with self._session(ep).get(ep.base + "/v1/models") as r:
                    await r.read()
            except (aiohttp.ClientError, OSError, TimeoutError):
                pass   # a dead endpoint is the calls' business (retried, then reported), not the warm-up's
        return True

    def stats(self) -> dict:
        return dict(self.counts)

    async def close(self) -> None:
        for s in self.sessions.values():
            await s.close()
        self.sessions.clear()


class RayWorkersBackend(LiveBackend):
    """``LiveBackend`` whose calls run on worker actors (the one with the fewest calls in flight; ties: the
    first) rather than on this process's HTTP client. Prompt token ids are drawn here, from the seed and the
    content segments, exactly as ``LiveBackend`` draws them."""

    def __init__(self, endpoints: Mapping[str, Endpoint | str], workers: list, **kw):
        super().__init__(endpoints, **kw)
        if not workers:
            raise ValueError("RayWorkersBackend needs at least one worker actor")
        self.workers = list(workers)
        self.worker_in_flight = [0] * len(self.workers)
        self.dead: set[int] = set()
        self.transport_retries = 0

    def submit(self, pool: str, prompt_tokens: int, max_tokens: int, prompt_segments=None) -> asyncio.Task:
        if pool not in self.pools:
            raise ValueError(f"no endpoint for model pool {pool!r}; endpoints: {sorted(self.pools)}")
        return self.loop.create_task(self._remote_call(pool, prompt_tokens, max_tokens, prompt_segments))

    async def _on_a_worker(self, pool: str, model: str, ids: list[int], max_tokens: int) -> dict:
        """The call on the live worker with the fewest calls in flight; a worker that dies (``RayActorError``)
        leaves the rotation and the call goes to the next one; with none left the call fails."""
        ray = import_ray()
        error = "no live worker actor"
        while len(self.dead) < len(self.workers):
            k = min((i for i in range(len(self.workers)) if i not in self.dead), key=self.worker_in_flight.__getitem__)
            self.worker_in_flight[k] += 1
            try:
                return await self.workers[k].call.remote(pool, model, ids, max_tokens)
            except ray.exceptions.RayActorError as e:
                self.dead.add(k)
                error = f"worker actor {k} died: {type(e).__name__}"
            finally:
                self.worker_in_flight[k] -= 1
        return {"error": error, "status": None, "attempts": 1, "prompt_tokens": len(ids), "output_tokens": 0,
                "ttft_s": None, "latency_s": 0.0}

    async def _remote_call(self, name: str, prompt_tokens: int, max_tokens: int, segments) -> CallResult:
        pool = self.pools[name]
        ids = self._prompt(pool, prompt_tokens, segments)
        pool.stats["calls"] += 1
        r = await self._on_a_worker(name, pool.model, ids, int(max_tokens))
        self.transport_retries += r["attempts"] - 1
        if r["error"] is not None:
            pool.stats["failed"] += 1
            key = r["error"].split(":")[0]
            pool.stats["errors"][key] = pool.stats["errors"].get(key, 0) + 1
            return CallResult(r["error"], prompt_tokens, r["output_tokens"])
        scale = self.clock.time_scale
        ttft = r["ttft_s"] / scale
        e = pool.ttft_ema_s
        pool.ttft_ema_s = ttft if e is None else TTFT_EMA_ALPHA * ttft + (1 - TTFT_EMA_ALPHA) * e
        return CallResult(None, r["prompt_tokens"], r["output_tokens"], ttft, r["latency_s"] / scale)


class APWAOnRay:
    """A registry actor and ``num_workers`` worker actors on a Ray cluster, serving APWA runs live.

    Args:
        endpoints: model pool name -> ``Endpoint`` or URL (pools named after the ``APWAConfig``'s models).
        num_workers: worker actors.
        worker_concurrency: calls one worker actor runs at once (its ``max_concurrency``).
        max_attempts: sends of a call before a transport failure is final (``WorkerActor``).
        address: an existing cluster (``"auto"``, ``"ray://host:10001"``); ``None`` starts a local one with
            ``num_cpus`` CPUs, stopped by ``close`` (a cluster this process already joined is reused).
        registry_name: the registry actor's name; it must not exist yet.
    """

    def __init__(self, endpoints: Mapping[str, Endpoint | str], *, num_workers: int = 2, worker_concurrency: int = 64,
                 max_attempts: int = 3, address: str | None = None, num_cpus: int | None = None,
                 registry_name: str = REGISTRY_NAME):
        if not endpoints:
            raise ValueError("APWAOnRay needs at least one endpoint (pool name -> URL)")
        if num_workers < 1 or worker_concurrency < 1:
            raise ValueError(f"num_workers and worker_concurrency must be >= 1, got {num_workers}, {worker_concurrency}")
        self.endpoints = {p: e if isinstance(e, Endpoint) else Endpoint(url=e) for p, e in endpoints.items()}
        self.num_workers, self.worker_concurrency, self.max_attempts = num_workers, worker_concurrency, max_attempts
        self.registry_name = registry_name
        self.cluster = RayMap(address=address, num_cpus=num_cpus, progress=False)
        self.registry_actor = None
        self.workers: list = []
        self.last_backend_stats: dict = {}

    def start(self) -> APWAOnRay:
        """Join or start the cluster; create the named registry actor (default capabilities over the
        endpoints' pools) and the worker actors. Actors take no CPU slot (they wait on the network)."""
        if self.registry_actor is not None:
            return self
        self.cluster.start()
        ray = import_ray()
        ns = ray.get_runtime_context().namespace
        pools = tuple(self.endpoints)
        reg = default_registry(pools)
        caps = [reg.get(n) for n in reg.names()]
        try:
            self.registry_actor = ray.remote(num_cpus=0)(RegistryActor).options(
                name=self.registry_name, namespace=ns).remote(caps, self.endpoints)
        except ValueError as e:
            raise RuntimeError(f"a Ray actor named {self.registry_name!r} already exists in namespace {ns!r}: "
                               "close the other APWAOnRay or pass registry_name=") from e
        worker_cls = ray.remote(num_cpus=0, max_restarts=1, max_task_retries=0)(WorkerActor)
        self.workers = [worker_cls.options(max_concurrency=self.worker_concurrency).remote(
            self.registry_name, ns, max_attempts=self.max_attempts) for _ in range(self.num_workers)]
        ray.get([w.ready.remote() for w in self.workers])
        return self

    def run(self, cfg: APWAConfig, workload: str, num_items: int, seed: int,
            decomposition: Decomposition | None = None, method: str = "apwa",
            registry: CapabilityRegistry | None = None) -> RunResult:
        """One method over a table of ``num_items`` rows of ``workload`` (the simulated run's table and plan
        for ``seed``), its calls on the worker actors. Pools: ``cfg``'s model names, each with an endpoint.
        ``registry``'s capabilities (default: ``APWARun``'s, workers on ``cfg.worker_pools`` or the first
        pool) are registered into the registry actor first, replacing those of the same name."""
        self.start()
        pools = tuple(m.name for m in cfg.model_entries)
        missing = [p for p in pools if p not in self.endpoints]
        if missing:
            raise ValueError(f"no endpoint for model pools {missing}; endpoints given: {sorted(self.endpoints)}")
        reg = registry if registry is not None else default_registry(pools, workers=cfg.worker_pools or pools[:1])
        ray = import_ray()
        ray.get([self.registry_actor.register.remote(reg.get(n)) for n in reg.names()])
        be = RayWorkersBackend({m.name: self.endpoints[m.name] for m in cfg.model_entries}, self.workers)
        t0 = time.monotonic()
        try:
            res = APWARun(cfg, workload, num_items, seed, registry=RegistryClient(self.registry_actor),
                          backend=be).run(method, decomposition)
        finally:
            self.last_backend_stats = {"pools": be.stats(), "transport_retries": be.transport_retries,
                                       "dead_workers": sorted(be.dead),
                                       "wall_s": time.monotonic() - t0, "time_scale": be.time_scale}
            be.close()
        return res

    def worker_stats(self) -> list[dict]:
        return import_ray().get([w.stats.remote() for w in self.workers])

    def close(self) -> None:
        """Kill the actors; stop the cluster if this object started it."""
        if self.registry_actor is not None:
            ray = import_ray()
            for w in self.workers:
                try:
                    ray.get(w.close.remote())
                except ray.exceptions.RayActorError:
                    pass   # already dead: nothing left to close
            for a in (*self.workers, self.registry_actor):
                ray.kill(a)
            self.registry_actor, self.workers = None, []
        self.cluster.close()

    def __enter__(self) -> APWAOnRay:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
