"""The serving side of ``MASLatency-CMDP-v0``: one simulated pool per model, background load, live gauges.

Each ``ModelEntry`` becomes a pool (named after the model) of ``replicas`` engines of its profile behind a
router; ``envs.loads`` starts the regime's background traffic. ``pool_state`` reads what a scraper of the
pool's ``/metrics`` would: waiting and running requests summed over its engines, KV-cache usage and the
engine-side TTFT EMA averaged over them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

import sim

from .cluster import BackgroundTrace
from .cmdp_catalog import ModelEntry
from .loads import LoadRegime, start_background

__all__ = ["build_cmdp_world", "pool_state", "unloaded_latency_s"]


def build_cmdp_world(models: Sequence[ModelEntry], regime: LoadRegime, seed: int, *, router: str = "least_outstanding",
                     trace: BackgroundTrace | None = None) -> sim.World:
    profiles = [sim.load_profile(m.profile) for m in models]
    for m, prof in zip(models, profiles, strict=True):
        m.check_profile(prof)  # the pool's shape is the catalogue's (sim.catalog)
    pools = [sim.PoolSpec(name=m.name, profile=prof, replicas=m.replicas, router=router)
             for m, prof in zip(models, profiles, strict=True)]
    world = sim.make_world(pools, seed=seed, sample_interval_s=None, keep_records=False)
    start_background(world, [(m.name, m.profile, m.replicas) for m in models], regime, trace)
    return world


def pool_state(world: sim.World, pool: str, out: np.ndarray) -> None:
    """Write ``[waiting, running, kv usage, ttft ema ms]`` of ``pool`` into ``out`` (length 4)."""
    now = world.env.now
    reps = world.cluster.pools[pool]
    run = wait = kv = ema = 0.0
    n_ema = 0
    for rep in reps:
        c = rep.core
        r, w, used, _ = c.gauges(now)
        run += r
        wait += w
        kv += used / c.kv.num_usable
        e = c.ttft_ema_s
        if e == e:
            ema += e
            n_ema += 1
    out[0], out[1], out[2] = wait, run, kv / len(reps)
    out[3] = 1e3 * ema / n_ema if n_ema else 0.0


@functools.lru_cache(maxsize=65536)
def unloaded_latency_s(profile: str, prompt_tokens: int, completion_tokens: int) -> float:
    """Client-side latency of one request alone on an idle replica of ``profile`` (simulated, exact)."""
    world = sim.make_world(sim.PoolSpec(name="p", profile=sim.load_profile(profile)), seed=0, sample_interval_s=None,
                           keep_records=False)
    ev = world.submit("p", int(prompt_tokens), int(completion_tokens), wait=True)
    world.run(until=ev)
    return float(world.now)
