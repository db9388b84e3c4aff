"""Workload generators: arrival processes and length distributions, each drawing from its own stream.

Arrivals and lengths come from separate named streams of the world, so every policy under test sees the
same traffic for a seed (common random numbers). A ``Workload`` submits requests to a pool without a
SimPy generator per request: each arrival schedules the next at its absolute time.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from heapq import heappush

import numpy as np

__all__ = [
    "ARRIVALS",
    "EmpiricalLengths",
    "FixedLengths",
    "GammaArrivals",
    "LognormalLengths",
    "PoissonArrivals",
    "TraceArrivals",
    "Workload",
]

_CHUNK = 4096


class PoissonArrivals:
    """Exponential gaps at ``rate_per_s``."""

    def __init__(self, rate_per_s: float):
        if not rate_per_s > 0:
            raise ValueError(f"rate_per_s must be positive, got {rate_per_s!r}")
        self.rate_per_s = float(rate_per_s)

    def gaps(self, rng: np.random.Generator) -> Iterator[float]:
        scale = 1.0 / self.rate_per_s
        while True:
            yield from rng.exponential(scale, _CHUNK).tolist()


class GammaArrivals:
    """Bursty arrivals: gamma gaps with mean 1/rate and coefficient of variation ``cv`` (cv=1 is Poisson)."""

    def __init__(self, rate_per_s: float, cv: float = 2.0):
        if not rate_per_s > 0 or not cv > 0:
            raise ValueError(f"rate_per_s and cv must be positive, got {rate_per_s!r}, {cv!r}")
        self.rate_per_s, self.cv = float(rate_per_s), float(cv)

    def gaps(self, rng: np.random.Generator) -> Iterator[float]:
        shape = 1.0 / self.cv**2
        scale = 1.0 / (self.rate_per_s * shape)
        while True:
            yield from rng.gamma(shape, scale, _CHUNK).tolist()


class TraceArrivals:
    """Replay recorded arrival offsets (seconds from the first arrival), optionally time-scaled and looped."""

    def __init__(self, offsets_s: np.ndarray, *, time_scale: float = 1.0, loop: bool = False):
        off = np.asarray(offsets_s, dtype=np.float64)
        if off.ndim != 1 or len(off) == 0:
            raise ValueError("a trace needs at least one arrival")
        if np.any(np.diff(off) < 0):
            raise ValueError("trace arrival offsets must be non-decreasing")
        if not time_scale > 0:
            raise ValueError("time_scale must be positive")
        self.offsets_s = off - off[0]
        self.time_scale, self.loop = float(time_scale), loop

    def gaps(self, rng: np.random.Generator) -> Iterator[float]:
        gaps = np.diff(self.offsets_s, prepend=0.0) * self.time_scale
        period_gap = float(np.mean(gaps[1:])) if len(gaps) > 1 else 1.0
        first = True
        while True:
            for i, g in enumerate(gaps.tolist()):
                yield (period_gap if not first and i == 0 else g)
            first = False
            if not self.loop:
                return


ARRIVALS: dict[str, Callable[..., object]] = {
    "poisson": PoissonArrivals,
    "gamma": GammaArrivals,
}


class FixedLengths:
    def __init__(self, prompt_tokens: int, output_tokens: int):
        self.prompt_tokens, self.output_tokens = int(prompt_tokens), int(output_tokens)

    def draw(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        return np.full(n, self.prompt_tokens, np.int64), np.full(n, self.output_tokens, np.int64)


class LognormalLengths:
    """Lognormal prompt and output lengths with given means and sigmas, clipped to [min, max] (clipping
    is counted in ``clipped`` so it is never silent)."""

    def __init__(self, prompt_mean: float, output_mean: float, *, sigma: float = 0.8, max_prompt: int = 8192,
                 max_output: int = 2048):
        self.prompt_mean, self.output_mean, self.sigma = prompt_mean, output_mean, sigma
        self.max_prompt, self.max_output = max_prompt, max_output
        self.clipped = 0

    def _draw(self, rng, mean, hi, n):
        mu = np.log(mean) - self.sigma**2 / 2
        x = np.rint(rng.lognormal(mu, self.sigma, n)).astype(np.int64)
        bad = (x < 1) | (x > hi)
        self.clipped += int(bad.sum())
        return np.clip(x, 1, hi)

    def draw(self, rng, n):
        return self._draw(rng, self.prompt_mean, self.max_prompt, n), self._draw(rng, self.output_mean, self.max_output, n)


class EmpiricalLengths:
    """Sample (prompt, output) pairs jointly, with replacement, from observed arrays (e.g. Azure conv)."""

    def __init__(self, prompt_tokens: np.ndarray, output_tokens: np.ndarray):
        p, o = np.asarray(prompt_tokens, np.int64), np.asarray(output_tokens, np.int64)
        if p.shape != o.shape or p.ndim != 1 or len(p) == 0:
            raise ValueError("prompt and output arrays must be 1-D, non-empty and of equal length")
        keep = (p >= 1) & (o >= 1)
        if not keep.any():
            raise ValueError("no (prompt, output) pair has both lengths >= 1")
        self.dropped_pairs = int((~keep).sum())  # pairs with a zero length cannot be served; reported
        self.prompt_tokens, self.output_tokens = p[keep], o[keep]

    def draw(self, rng, n):
        idx = rng.integers(0, len(self.prompt_tokens), n)
        return self.prompt_tokens[idx], self.output_tokens[idx]


class _Gaps:
    """An arrival process's gaps as an iterator that survives ``copy.deepcopy`` (a generator does not).

    A copy replays the process from the stream's state at ``start`` (kept aside) to the same position, so a
    world can be snapshotted mid-run (``envs.background``) and every copy continues bit for bit like the
    original: the gaps are a function of the stream's initial state and how many were drawn.
    """

    __slots__ = ("arrivals", "rng0", "it", "n")

    def __init__(self, arrivals, rng: np.random.Generator):
        self.arrivals, self.rng0 = arrivals, copy.deepcopy(rng)
        self.it, self.n = arrivals.gaps(rng), 0

    def __iter__(self):
        return self

    def __next__(self) -> float:
        g = next(self.it)
        self.n += 1
        return g

    def __deepcopy__(self, memo) -> _Gaps:
        new = _Gaps.__new__(_Gaps)
        new.arrivals, new.rng0, new.n = copy.deepcopy(self.arrivals, memo), self.rng0, self.n
        new.it = new.arrivals.gaps(copy.deepcopy(self.rng0))
        for _ in range(self.n):
            next(new.it)
        return new


@dataclass
class Workload:
    """Submit requests to ``pool``: arrivals from stream ``<name>/arrivals``, lengths from ``<name>/lengths``.

    Stops after ``num_requests`` or at ``until_s`` (simulated), whichever comes first. Explicit per-request
    lengths (a replayed trace) can be given as ``prompt_tokens``/``output_tokens`` arrays instead.
    """

    pool: str
    arrivals: object
    lengths: object | None = None
    num_requests: int | None = None
    until_s: float | None = None
    name: str = "workload"
    start_s: float = 0.0
    prompt_tokens: np.ndarray | None = None
    output_tokens: np.ndarray | None = None
    id_prefix: str | None = None

    def start(self, world) -> None:
        if self.lengths is None and self.prompt_tokens is None:
            raise ValueError("a Workload needs lengths or explicit prompt_tokens/output_tokens")
        self._world = world
        self._gaps = _Gaps(self.arrivals, world.rng(f"{self.name}/arrivals"))
        self._len_rng = world.rng(f"{self.name}/lengths")
        self._buf_p = self._buf_o = None
        self._bi = 0
        self.submitted = 0
        self._t = max(self.start_s, world.now)
        world.active_sources += 1
        self._active = True
        first = next(self._gaps, None)
        if first is None:
            self._stop()
            return
        self._t += first
        self._schedule()

    def __deepcopy__(self, memo) -> Workload:
        """A snapshot's copy (``envs.background``): the drawn-length buffers are lists of ints, copied flat
        (a generic deep copy visits every int), and a replayed trace's arrays are shared (never written)."""
        new = Workload.__new__(Workload)
        memo[id(self)] = new
        for k, v in vars(self).items():
            if k in ("_buf_p", "_buf_o", "prompt_tokens", "output_tokens"):
                new.__dict__[k] = v if v is None or isinstance(v, np.ndarray) else list(v)
            else:
                new.__dict__[k] = copy.deepcopy(v, memo)
        return new

    def _stop(self) -> None:
        if self._active:
            self._active = False
            self._world.active_sources -= 1
            self._world._maybe_idle()

    def _schedule(self, fired=None) -> None:
        """Arm ``_fire`` at the next arrival; ``fired`` is the tick that just called it, reused."""
        if (self.until_s is not None and self._t > self.until_s) or (
                self.num_requests is not None and self.submitted >= self.num_requests):
            self._stop()
            return
        if fired is None:
            self._world.env.call_at(self._t, self._fire)
        else:
            self._world.env.call_again(fired, self._t)

    def _refill(self) -> None:
        self._buf_p, self._buf_o = (a.tolist() for a in self.lengths.draw(self._len_rng, _CHUNK))
        self._bi = 0

    def _lengths(self) -> tuple[int, int]:
        if self.prompt_tokens is not None:
            i = self.submitted
            return int(self.prompt_tokens[i]), int(self.output_tokens[i])
        if self._buf_p is None or self._bi >= len(self._buf_p):
            self._refill()
        i = self._bi
        self._bi += 1
        return self._buf_p[i], self._buf_o[i]

    def _fire(self, tick) -> None:
        """One arrival: submit it and re-arm ``tick`` at the next (``_lengths``, ``_Gaps.__next__`` and
        ``_schedule`` inlined: this runs once per request)."""
        if self.prompt_tokens is None:
            i = self._bi
            buf = self._buf_p
            if buf is None or i >= len(buf):
                self._refill()
                i, buf = 0, self._buf_p
            self._bi = i + 1
            p, o = buf[i], self._buf_o[i]
        else:
            p, o = self._lengths()
        world = self._world
        rid = f"{self.id_prefix}{self.submitted}" if self.id_prefix is not None else None
        world._submit(self.pool, p, o, None, None, rid, False)  # world.submit(pool, p, o, request_id=rid)
        self.submitted = n = self.submitted + 1
        if self.prompt_tokens is not None and n >= len(self.prompt_tokens):
            self._stop()
            return
        gaps = self._gaps
        gap = next(gaps.it, None)
        if gap is None:
            self._stop()
            return
        gaps.n += 1
        self._t = t = self._t + gap
        if (self.until_s is not None and t > self.until_s) or (self.num_requests is not None and n >= self.num_requests):
            self._stop()
            return
        env = world.env
        heappush(env._queue, (t, 1, next(env._eid), tick))  # env.call_again(tick, t)
