"""Background load of the CMDP world: regimes, load that shifts within an episode, and saturation.

A regime gives, per model pool, the background *utilisation*: the offered request rate as a fraction of the
saturation throughput of the pool (measured by simulation: ``saturation_req_per_s``), with Azure-conv
lengths (``envs.cluster.AZURE_CONV``). A regime has one or more *phases*; with several, the load switches
between them at exponentially distributed times (a Markov-modulated Poisson process, one phase schedule
shared by all pools), so a query can start on an idle system and finish on a busy one::

    idle     8B 15 %, 70B 15 %                    Poisson
    busy     8B 85 %, 70B 70 %                    Poisson: the cheap model thrashes (docs/system_aware.md#1-problem)
    bursty   8B 60 %, 70B 60 %                    gamma gaps, coefficient of variation 3
    shift    idle <-> busy, mean phase 20 s       Poisson within a phase

A recorded arrival trace (``BackgroundTrace``, e.g. Azure conversation) can replace the generated
arrivals: it is replayed per pool, time-scaled to the regime's rate, so its own burstiness is kept.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

import sim

from .cluster import AZURE_CONV, BackgroundTrace

__all__ = ["REGIMES", "LoadRegime", "PhaseSchedule", "PhasedPoissonArrivals", "background_lengths", "make_regime",
           "saturation_req_per_s", "start_background"]


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadRegime:
    """Background utilisation per pool (in model order), per phase.

    Attributes:
        name: label.
        phases: one tuple of utilisations (fraction of saturation, >= 0) per phase.
        mean_phase_s: mean phase duration when there are several phases.
        arrivals: ``"poisson"`` or ``"gamma"`` (single phase only).
        cv: coefficient of variation of gamma gaps.
    """

    name: str
    phases: tuple[tuple[float, ...], ...]
    mean_phase_s: float | None = None
    arrivals: str = "poisson"
    cv: float = 1.0

    def __post_init__(self) -> None:
        if not self.phases or len({len(p) for p in self.phases}) != 1:
            raise ValueError(f"regime {self.name!r}: phases must be non-empty tuples of equal length (one per pool)")
        if any(u < 0 or not np.isfinite(u) for p in self.phases for u in p):
            raise ValueError(f"regime {self.name!r}: utilisations must be finite and >= 0")
        if len(self.phases) > 1 and not (self.mean_phase_s and self.mean_phase_s > 0):
            raise ValueError(f"regime {self.name!r}: several phases need mean_phase_s > 0")
        if self.arrivals not in ("poisson", "gamma"):
            raise ValueError(f"regime {self.name!r}: arrivals must be 'poisson' or 'gamma'")
        if self.arrivals == "gamma" and (len(self.phases) > 1 or not self.cv > 0):
            raise ValueError(f"regime {self.name!r}: gamma arrivals need one phase and cv > 0")

    @property
    def num_pools(self) -> int:
        return len(self.phases[0])

    def mean_utilisation(self) -> tuple[float, ...]:
        return tuple(float(np.mean([p[i] for p in self.phases])) for i in range(self.num_pools))


REGIMES: dict[str, LoadRegime] = {
    "idle": LoadRegime(name="idle", phases=((0.15, 0.15),)),
    "busy": LoadRegime(name="busy", phases=((0.85, 0.70),)),
    "bursty": LoadRegime(name="bursty", phases=((0.60, 0.60),), arrivals="gamma", cv=3.0),
    "shift": LoadRegime(name="shift", phases=((0.15, 0.15), (0.85, 0.70)), mean_phase_s=20.0),
}


def make_regime(load: str | LoadRegime, num_pools: int) -> LoadRegime:
    r = load if isinstance(load, LoadRegime) else REGIMES.get(load)
    if r is None:
        raise ValueError(f"unknown load regime {load!r}; choose one of {sorted(REGIMES)} or pass a LoadRegime")
    if r.num_pools != num_pools:
        raise ValueError(f"regime {r.name!r} gives {r.num_pools} utilisations per phase but there are {num_pools} "
                         f"model pools")
    return r


def background_lengths() -> sim.LognormalLengths:
    a = AZURE_CONV
    return sim.LognormalLengths(a["prompt_mean"], a["output_mean"], sigma=0.9)


@functools.lru_cache(maxsize=16)
def saturation_req_per_s(profile: str, n: int = 3000, seed: int = 0) -> float:
    """Requests/s one replica of ``profile`` completes when overloaded with Azure-conv lengths (the middle
    80 % of completions of ``n`` requests all queued at once); deterministic."""
    world = sim.make_world(sim.PoolSpec(name="p", profile=sim.load_profile(profile)), seed=seed,
                           sample_interval_s=None)
    sim.Workload(pool="p", arrivals=sim.PoissonArrivals(1000.0), lengths=background_lengths(), num_requests=n,
                 name="saturation").start(world)
    world.run_until_idle()
    done = np.sort(world.records.columns()["last_token_s"])
    lo, hi = int(0.1 * n), int(0.9 * n)
    return float((hi - lo) / (done[hi] - done[lo]))


class PhaseSchedule:
    """Phase boundaries drawn lazily from one stream: the first phase uniformly, then in cyclic order, each
    lasting Exp(mean) seconds. Every pool's arrivals read the same schedule."""

    def __init__(self, num_phases: int, mean_phase_s: float, rng: np.random.Generator):
        self.n, self.mean, self.rng = num_phases, mean_phase_s, rng
        self.ends: list[float] = []
        self.phase: list[int] = []
        self._extend(int(rng.integers(num_phases)), 0.0)

    def _extend(self, phase: int, start: float) -> None:
        self.ends.append(start + float(self.rng.exponential(self.mean)))
        self.phase.append(phase)

    def segment(self, k: int) -> tuple[float, float, int]:
        """(start, end, phase) of the k-th segment."""
        while k >= len(self.ends):
            self._extend((self.phase[-1] + 1) % self.n, self.ends[-1])
        return (self.ends[k - 1] if k else 0.0), self.ends[k], self.phase[k]

    def phase_at(self, t: float) -> int:
        k = 0
        while True:
            a, b, p = self.segment(k)
            if t < b:
                return p
            k += 1


class PhasedPoissonArrivals:
    """Poisson arrivals whose rate is ``rates[phase]`` in the current phase of ``schedule`` (exact: the
    exponential gap is redrawn at each boundary, which memorylessness allows). Times start at 0."""

    def __init__(self, schedule: PhaseSchedule, rates: tuple[float, ...]):
        if any(r < 0 for r in rates):
            raise ValueError("rates must be >= 0")
        self.schedule, self.rates = schedule, rates

    def gaps(self, rng: np.random.Generator) -> Iterator[float]:
        t, last, k = 0.0, 0.0, 0
        sch = self.schedule
        while True:
            a, b, p = sch.segment(k)
            r = self.rates[p]
            t = max(t, a)
            nxt = t + float(rng.exponential(1.0 / r)) if r > 0 else float("inf")
            if nxt < b:
                yield nxt - last
                last = t = nxt
            else:
                t = b
                k += 1


def _arrivals(regime: LoadRegime, rates: list[tuple[float, ...]], pool: int, schedule, trace):
    if trace is not None:
        rate = rates[0][pool]
        return sim.TraceArrivals(trace.offsets_s, time_scale=trace.rate_per_s / rate, loop=True) if rate > 0 else None
    if schedule is not None:
        return PhasedPoissonArrivals(schedule, tuple(r[pool] for r in rates))
    rate = rates[0][pool]
    if rate <= 0:
        return None
    if regime.arrivals == "gamma":
        return sim.GammaArrivals(rate, regime.cv)
    return sim.PoissonArrivals(rate)


def start_background(world: sim.World, pools: list[tuple[str, str, int]], regime: LoadRegime,
                     trace: BackgroundTrace | None = None) -> PhaseSchedule | None:
    """Start one background workload per pool ``(pool name, profile, replicas)``; returns the phase schedule
    (``None`` for a single phase). Streams: ``load/phases`` and ``background/<pool>/...``."""
    if trace is not None and len(regime.phases) > 1:
        raise ValueError(f"a replayed trace keeps its own time profile: use a single-phase regime, not {regime.name!r}")
    rates = [tuple(u * saturation_req_per_s(prof) * reps for u, (_, prof, reps) in zip(ph, pools, strict=True))
             for ph in regime.phases]
    schedule = None
    if len(regime.phases) > 1:
        schedule = PhaseSchedule(len(regime.phases), regime.mean_phase_s, world.rng("load/phases"))
    for i, (name, _, _) in enumerate(pools):
        arr = _arrivals(regime, rates, i, schedule, trace)
        if arr is None:
            continue
        lengths = (sim.EmpiricalLengths(trace.prompt_tokens, trace.output_tokens) if trace is not None
                   else background_lengths())
        sim.Workload(pool=name, arrivals=arr, lengths=lengths, name=f"background/{name}").start(world)
    return schedule
