"""The APWA world: the CMDP env's model pools on the simulated cluster, and one run of a method on it.

``APWASimBackend`` is the ``envs.backend.Backend`` seam over ``envs.cmdp_world.build_cmdp_world``: one pool
per ``ModelEntry`` (default: Llama-3.1-8B on H100 and Llama-3.1-70B on 4 x H100, two replicas each, the
catalogue of ``envs.cmdp_catalog``), background load of an ``envs.loads`` regime, and a warm-up served from
``envs.background.WARM_WORLDS`` (exact snapshots). No second simulator: every call is a ``sim`` request.

``APWARun`` is one episode: it draws the table from the seed (stream ``apwa/table``; failures from
``apwa/failures``), so every method meets the same rows and the same load for a seed (common random
numbers), and runs one method's process to its end.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import simpy

import sim

from ..background import WARM_WORLDS
from ..cmdp_catalog import ModelEntry, default_models
from ..cmdp_world import build_cmdp_world, pool_state
from ..loads import LoadRegime, make_regime
from .executor import Executor, RunResult
from .manager import Decomposition
from .methods import METHODS
from .registry import CapabilityRegistry, default_registry
from .workloads import WORKLOADS, Workload, make_table

__all__ = ["APWAConfig", "APWARun", "APWASimBackend", "run_method"]


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


class APWASimBackend:
    """The ``Backend`` seam on the CMDP world's pools (one per model), warmed up from the snapshot cache."""

    def __init__(self, cfg: APWAConfig):
        self.cfg = cfg
        self.models = cfg.model_entries
        self.regime = make_regime(cfg.load, len(self.models))
        self.world: sim.World | None = None

    @property
    def pools(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.models)

    @property
    def started(self) -> bool:
        return self.world is not None

    @property
    def now(self) -> float:
        return self.world.env.now

    def reset(self, seed: int) -> None:
        cfg = self.cfg
        key = ("apwa", tuple((m.name, m.profile, m.replicas) for m in self.models), self.regime, seed, cfg.router,
               cfg.warmup_s)
        self.world = WARM_WORLDS.get(key, lambda: build_cmdp_world(self.models, self.regime, seed,
                                                                   router=cfg.router), cfg.warmup_s)

    def event(self) -> simpy.Event:
        return self.world.env.event()

    def process(self, gen: Generator) -> simpy.Process:
        return self.world.env.process(gen)

    def timeout(self, seconds: float) -> simpy.Event:
        return self.world.env.timeout(seconds)

    def all_of(self, waitables: Iterable[simpy.Event]) -> simpy.Event:
        return self.world.env.all_of(waitables)

    def submit(self, pool: str, prompt_tokens: int, max_tokens: int, prompt_segments=None) -> simpy.Event:
        return self.world.submit(pool, prompt_tokens, max_tokens, prompt_segments=prompt_segments, wait=True)

    def run(self, until: simpy.Event) -> None:
        self.world.env.run(until=until)

    def load(self) -> tuple[float, float, float]:
        out, acc = np.zeros(4), np.zeros(3)
        for p in self.pools:
            pool_state(self.world, p, out)
            acc += (out[1], out[0], out[2])
        return tuple(float(x) for x in acc / len(self.pools))

    def pool_states(self) -> np.ndarray:
        """(pools, 4): waiting, running, KV usage, TTFT EMA (ms) per pool, now."""
        out = np.zeros((len(self.pools), 4))
        for i, p in enumerate(self.pools):
            pool_state(self.world, p, out[i])
        return out

    def preemptions(self) -> int:
        return int(sum(r.core.num_preemptions for r in self.world.cluster.replicas))

    def is_event(self, x: Any) -> bool:
        return isinstance(x, simpy.Event)

    def close(self) -> None:
        self.world = None


def _streams(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    table, fail = np.random.SeedSequence([int(seed), 0xA9A]).spawn(2)
    return np.random.default_rng(table), np.random.default_rng(fail)


class APWARun:
    """One episode: a warmed-up world, a table of ``num_items`` rows of ``workload``, ready to run a method.

    Args:
        cfg: world and executor settings.
        workload: ``WORKLOADS`` name or ``Workload``.
        num_items: rows in the table.
        seed: the world's and the table's seed.
        registry: capabilities (``None``: ``default_registry`` over the world's pools).
        backend: where the calls run (``None``: ``APWASimBackend(cfg)``); e.g. ``maslat.livebackend.LiveBackend``
            with one endpoint per pool, named after ``cfg``'s models (their names key ``context_quality``).
            Only the simulator reports ``preemptions`` and ``kv_peak``.
    """

    def __init__(self, cfg: APWAConfig, workload: str | Workload, num_items: int, seed: int,
                 registry: CapabilityRegistry | None = None, backend=None):
        self.cfg = cfg
        self.workload = workload if isinstance(workload, Workload) else _workload(workload)
        self.backend = backend if backend is not None else APWASimBackend(cfg)
        self.backend.reset(seed)
        pools = tuple(m.name for m in cfg.model_entries)
        self.pool_models = {m.name: m.name for m in cfg.model_entries}
        self.registry = registry if registry is not None else default_registry(
            pools, workers=cfg.worker_pools or pools[:1])
        rng_table, self.rng_fail = _streams(seed)
        self.preemptions, self.kv_peak = 0, 0.0   # of the last run: world-wide preemptions, peak pool KV usage
        self.table = make_table(self.workload, num_items, rng_table)

    def run(self, method: str, decomposition: Decomposition | None = None) -> RunResult:
        """Run ``method`` (``METHODS``) to its end; the world is left where the method left it."""
        fn = METHODS.get(method)
        if fn is None:
            raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
        ex = Executor(self.backend, self.registry, self.workload, self.table, self.pool_models, self.rng_fail,
                      fail_prob=self.cfg.fail_prob, max_retries=self.cfg.max_retries)
        sim_side = isinstance(self.backend, APWASimBackend)
        pre = self.backend.preemptions() if sim_side else 0
        box: list = []

        def top():   # the result through the seam: a SimPy process and an asyncio task hold it differently
            box.append((yield self.backend.process(fn(ex, decomposition))))

        proc = self.backend.process(top())
        if sim_side:
            self.kv_peak = 0.0
            self.backend.process(self._watch_kv(proc))
        self.backend.run(until=proc)
        rows, width, depth = box[0]
        res = ex.result(method, rows, width=width, depth=depth)
        self.preemptions = (self.backend.preemptions() - pre) if sim_side else 0
        return res

    def _watch_kv(self, proc, interval_s: float = 0.5):
        """Process (simulator only): the highest KV-cache usage of any pool while ``proc`` runs, sampled
        every ``interval_s`` like a ``/metrics`` scraper (``kv_peak``, fraction of the usable blocks)."""
        while not proc.triggered:
            self.kv_peak = max(self.kv_peak, float(self.backend.pool_states()[:, 2].max()))
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
