"""The serving side of ``MASLatency-v0``: one simulated pool that answers every LLM call, plus background load.

LAMaS calls gpt-4o-mini over an API; here every call is a request on simulated vLLM replicas (default: two
H100s serving Llama-3.1-8B, a stand-in whose decode speed under load, ~70-150 tokens/s per request, is in
the range of the API's). Background traffic keeps arriving between and during episodes: Poisson arrivals at
``background_rate_per_s`` with lognormal lengths matching the Azure LLM inference trace 2023 (conversation):
mean prompt 1,155 tokens, mean output 211 (log-sd 0.99 and 0.86 there; one log-sd of 0.9 here), native rate
5.53 requests/s. A replay of
the real trace can be passed as arrays instead (``BackgroundTrace``; the command line loads it with
``traces.azure``, which ``envs/`` does not import).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import sim

__all__ = ["AZURE_CONV", "BackgroundTrace", "ClusterConfig", "build_world"]

POOL = "llm"

#: Azure LLM inference trace 2023, conversation (19,366 requests over 3,502 s): measured with traces.azure
AZURE_CONV = {"rate_per_s": 5.53, "prompt_mean": 1155.0, "output_mean": 211.0, "prompt_sigma": 0.99,
              "output_sigma": 0.86}


@dataclass(frozen=True, slots=True)
class BackgroundTrace:
    """A recorded trace to replay as background: arrival offsets (s) and per-request lengths, looped."""

    offsets_s: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.offsets_s)
        if n < 2 or len(self.prompt_tokens) != n or len(self.output_tokens) != n:
            raise ValueError("BackgroundTrace needs >= 2 arrivals and one prompt/output length per arrival")

    @property
    def rate_per_s(self) -> float:
        return (len(self.offsets_s) - 1) / float(self.offsets_s[-1] - self.offsets_s[0])


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterConfig:
    """The simulated serving pool and its background load.

    Attributes:
        profile: embedded profile name or path (``sim.load_profile``).
        replicas: replicas in the pool.
        router: ``sim.ROUTERS`` name.
        background_rate_per_s: background requests per simulated second; 0 for none. With a trace, the
            trace is time-scaled to this rate (``None`` keeps its native rate).
        background_trace: replay these arrivals and lengths instead of the Poisson/lognormal default.
    """

    profile: str = "h100-llama-3.1-8b"
    replicas: int = 2
    router: str = "least_outstanding"
    background_rate_per_s: float | None = AZURE_CONV["rate_per_s"]
    background_trace: BackgroundTrace | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.replicas, int) or self.replicas < 1:
            raise ValueError(f"ClusterConfig.replicas must be an integer >= 1, got {self.replicas!r}")
        if self.router not in sim.ROUTERS:
            raise ValueError(f"ClusterConfig.router must be one of {sorted(sim.ROUTERS)}, got {self.router!r}")
        r = self.background_rate_per_s
        if r is None and self.background_trace is None:
            raise ValueError("ClusterConfig.background_rate_per_s=None (native rate) needs a background_trace")
        if r is not None and (r < 0 or not np.isfinite(r)):
            raise ValueError(f"ClusterConfig.background_rate_per_s must be >= 0, got {r!r}")


def build_world(cfg: ClusterConfig, seed: int) -> sim.World:
    """A fresh world: the pool, and the background workload already started (stream ``background``)."""
    prof = sim.load_profile(cfg.profile)
    world = sim.make_world(sim.PoolSpec(name=POOL, profile=prof, replicas=cfg.replicas, router=cfg.router),
                           seed=seed, sample_interval_s=None, keep_records=False)
    rate = cfg.background_rate_per_s
    if rate == 0:
        return world
    tr = cfg.background_trace
    if tr is None:
        a = AZURE_CONV
        lengths = sim.LognormalLengths(a["prompt_mean"], a["output_mean"], sigma=0.9)
        wl = sim.Workload(pool=POOL, arrivals=sim.PoissonArrivals(rate), lengths=lengths, name="background")
    else:
        scale = 1.0 if rate is None else tr.rate_per_s / rate
        wl = sim.Workload(pool=POOL, arrivals=sim.TraceArrivals(tr.offsets_s, time_scale=scale, loop=True),
                          lengths=sim.EmpiricalLengths(tr.prompt_tokens, tr.output_tokens), name="background")
    wl.start(world)
    return world
