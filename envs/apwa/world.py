"""The APWA world: the CMDP env's model pools on the simulated cluster, and one run of a method on it.

``apwa_sim_backend`` is the skeleton's ``envs.backend.SimBackend`` over ``envs.cmdp_world.build_cmdp_world``: one pool
per ``ModelEntry`` (default: Llama-3.1-8B on H100 and Llama-3.1-70B on 4 x H100, two replicas each, the
catalogue of ``envs.cmdp_catalog``), background load of an ``envs.loads`` regime, and a warm-up served from
``envs.background.WARM_WORLDS`` (exact snapshots). No second simulator: every call is a ``sim`` request.

``APWARun`` is one episode: it draws the table from the seed (stream ``apwa/table``; failures from
``apwa/failures``), so every method meets the same rows and the same load for a seed (common random
numbers), and runs one method's process to its end (``run``) or inside a caller's process (``execute``:
``MASLatency-APWA-v0``). ``pool_states`` and ``world_preemptions`` are the two readings it needs beyond the
seam: per-pool load on any backend, preemptions in the simulator.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

import sim

from ..backend import Backend, SimBackend
from ..background import WARM_WORLDS
from ..cmdp_catalog import ModelEntry, default_models
from ..cmdp_world import build_cmdp_world
from ..loads import LoadRegime, make_regime
from .executor import Executor, RunResult
from .manager import Decomposition
from .methods import METHODS
from .registry import CapabilityRegistry, default_registry
from .workloads import WORKLOADS, Workload, make_table

__all__ = ["APWAConfig", "APWARun", "apwa_sim_backend", "pool_states", "run_method", "world_preemptions"]


@dataclass(frozen=True, slots=True, kw_only=True)
class APWAConfig:
    """The world and the executor's settings.

    Attributes:
        models: the model pools (``None``: ``cmdp_catalog.default_models()``).
        load: background regime name or ``LoadRegime`` (``envs.loads``).
        warmup_s: background seconds served before the query.
        router: replica router within a pool (``sim.ROUTERS``).
        worker_pools: pools serving the workers by default (``None``: the first model's).
        fail_prob: share of served calls whose output breaks its contract (assumption, see workloads).
        max_retries: re-sends after a malformed output.
    """

    models: tuple[ModelEntry, ...] | None = None
    load: str | LoadRegime = "idle"
    warmup_s: float = 30.0
    router: str = "least_outstanding"
    worker_pools: tuple[str, ...] | None = None
    fail_prob: float = 0.02
    max_retries: int = 3

    def __post_init__(self) -> None:
        if not self.warmup_s >= 0:
            raise ValueError(f"APWAConfig.warmup_s must be >= 0, got {self.warmup_s!r}")
        if self.router not in sim.ROUTERS:
            raise ValueError(f"APWAConfig.router must be one of {sorted(sim.ROUTERS)}, got {self.router!r}")
        if not 0.0 <= self.fail_prob < 1.0:
            raise ValueError(f"APWAConfig.fail_prob must be in [0, 1), got {self.fail_prob!r}")

    @property
    def model_entries(self) -> tuple[ModelEntry, ...]:
        return self.models if self.models is not None else default_models()


def apwa_sim_backend(cfg: APWAConfig) -> SimBackend:
    """The skeleton's ``SimBackend`` on the CMDP world's pools (one per model), each seed's warm-up served from
    the snapshot cache ``WARM_WORLDS`` (exact)."""
    models = cfg.model_entries
    regime = make_regime(cfg.load, len(models))
    key = ("apwa", tuple((m.name, m.profile, m.replicas) for m in models), regime)

    def build(seed: int) -> sim.World:
        return WARM_WORLDS.get((*key, seed, cfg.router, cfg.warmup_s),
                               lambda: build_cmdp_world(models, regime, seed, router=cfg.router), cfg.warmup_s)

    return SimBackend(build=build)


def pool_states(backend: Backend, pools: Iterable[str]) -> np.ndarray:
    """(pools, 4): waiting, running, KV usage, TTFT EMA (ms) per pool, now, on any backend
    (``Backend.pool_state``: the engines' gauges in the simulator, the last ``/metrics`` scrape live)."""
    pools = tuple(pools)
    out = np.zeros((len(pools), 4))
    for i, p in enumerate(pools):
        backend.pool_state(p, out[i])
    return out


def world_preemptions(backend: Backend) -> int | None:
    """Preemptions of every replica of the simulated world so far (``None`` on a live backend)."""
    world = getattr(backend, "world", None)
    return None if world is None else int(sum(r.core.num_preemptions for r in world.cluster.replicas))


def _streams(seed: int, episode: int = 0) -> tuple[np.random.Generator, np.random.Generator]:
    words = [int(seed), 0xA9A] + ([int(episode)] if episode else [])
    table, fail = np.random.SeedSequence(words).spawn(2)
    return np.random.default_rng(table), np.random.default_rng(fail)


class APWARun:
    """One episode: a warmed-up world, a table of ``num_items`` rows of ``workload``, ready to run a method.

    Args:
        cfg: world and executor settings.
        workload: ``WORKLOADS`` name or ``Workload``.
        num_items: rows in the table.
        seed: the world's and the table's seed.
        registry: capabilities (``None``: ``default_registry`` over the world's pools).
        backend: where the calls run (``None``: ``apwa_sim_backend(cfg)``); e.g. ``maslat.livebackend.LiveBackend``
            with one endpoint per pool, named after ``cfg``'s models (their names key ``context_quality``).
            Only the simulator reports ``preemptions`` and ``kv_peak``.
        episode: which query of the world this is (0: the first; the table and failure streams of a later one
            are drawn from ``(seed, episode)``).
        fresh_world: reset the backend to ``seed`` (``False``: run in the world as it stands, e.g. the env's).
    """

    def __init__(self, cfg: APWAConfig, workload: str | Workload, num_items: int, seed: int,
                 registry: CapabilityRegistry | None = None, backend: Backend | None = None, *, episode: int = 0,
                 fresh_world: bool = True):
        self.cfg = cfg
        self.workload = workload if isinstance(workload, Workload) else _workload(workload)
        self.backend = backend if backend is not None else apwa_sim_backend(cfg)
        if fresh_world:
            self.backend.reset(seed)
        pools = self.pools = tuple(m.name for m in cfg.model_entries)
        self.pool_models = {m.name: m.name for m in cfg.model_entries}
        self.registry = registry if registry is not None else default_registry(
            pools, workers=cfg.worker_pools or pools[:1])
        rng_table, self.rng_fail = _streams(seed, episode)
        self.preemptions, self.kv_peak = 0, 0.0   # of the last run: world-wide preemptions, peak pool KV usage
        self.table = make_table(self.workload, num_items, rng_table)

    def run(self, method: str, decomposition: Decomposition | None = None) -> RunResult:
        """Run ``method`` (``METHODS``) to its end; the world is left where the method left it."""
        box: list = []

        def top():   # the result through the seam: a SimPy process and an asyncio task hold it differently
            box.append((yield from self.execute(method, decomposition)))

        self.backend.run(until=self.backend.process(top()))
        return box[0]

    def execute(self, method: str, decomposition: Decomposition | None = None):
        """Process (``yield from`` it inside a backend process): ``method``'s run on this world; returns its
        ``RunResult`` and sets ``preemptions`` and ``kv_peak`` (simulator only)."""
        fn = METHODS.get(method)
        if fn is None:
            raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
        ex = Executor(self.backend, self.registry, self.workload, self.table, self.pool_models, self.rng_fail,
                      fail_prob=self.cfg.fail_prob, max_retries=self.cfg.max_retries)
        pre = world_preemptions(self.backend)
        done: list[bool] = []
        if pre is not None:   # started first: it samples the pools before the method's first call
            self.kv_peak = 0.0
            self.backend.process(self._watch_kv(done))
        rows, width, depth = yield self.backend.process(fn(ex, decomposition))
        done.append(True)
        res = ex.result(method, rows, width=width, depth=depth)
        self.preemptions = (world_preemptions(self.backend) - pre) if pre is not None else 0
        return res

    def _watch_kv(self, done: list, interval_s: float = 0.5):
        """Process (simulator only): the highest KV-cache usage of any pool until ``done`` is filled, sampled
        every ``interval_s`` like a ``/metrics`` scraper (``kv_peak``, fraction of the usable blocks)."""
        while not done:
            self.kv_peak = max(self.kv_peak, float(pool_states(self.backend, self.pools)[:, 2].max()))
            yield self.backend.timeout(interval_s)


def _workload(name: str) -> Workload:
    w = WORKLOADS.get(name)
    if w is None:
        raise ValueError(f"unknown workload {name!r}; choose one of {sorted(WORKLOADS)}")
    return w


def run_method(method: str, workload: str, num_items: int, seed: int, cfg: APWAConfig | None = None,
               decomposition: Decomposition | None = None) -> RunResult:
    """One method on a fresh world of ``seed``: the building block of ``maslat experiment apwa``."""
    return APWARun(cfg or APWAConfig(), workload, num_items, seed).run(method, decomposition)
