"""``background="exact"|"tape"`` for the environments: the tape-served world of each (``envs.bgtape``).

``MASLatency-v0`` takes ``backend=TapeBackend(cluster)``; ``MASLatency-CMDP-v0`` calls ``cmdp_tape_world`` from
its ``_new_world`` when built with ``background="tape"``. Both key the process-wide ``TAPES`` by everything
the background depends on, so every environment of a session with the same recipe and seed replays one tape.
``MASLatencyCMDPEnv(background="tape", tape_seed=k)`` (an evaluation's world) replays the one tape of seed ``k``
for every ``reset(seed=s)``, from an offset drawn from ``s`` (``tape_offset_s``): one tape per evaluation, not
per episode (a tape per episode would cost more than the exact warm-up it replaces).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .backend import SimBackend
from .bgtape import BACKGROUND_MODES, TAPES, TapeWorld
from .cluster import ClusterConfig, build_world
from .cmdp_catalog import ModelEntry
from .cmdp_world import build_cmdp_world
from .loads import LoadRegime

__all__ = ["DEFAULT_HORIZON_S", "TapeBackend", "check_background", "cmdp_tape_world", "tape_offset_s"]

#: simulated seconds of background per tape (looped beyond): long against a query (~10-60 s) and a load
#: phase (20 s), short against a training run
DEFAULT_HORIZON_S = 600.0
_OFFSET_STREAM = 23


def check_background(mode: str) -> str:
    if mode not in BACKGROUND_MODES:
        raise ValueError(f"background must be one of {BACKGROUND_MODES} ('exact': every background request "
                         f"simulated; 'tape': replayed, an approximation), got {mode!r}")
    return mode


def _check_router(router: str) -> None:
    if router != "least_outstanding":
        raise ValueError(f"background='tape' routes the agent's calls by least outstanding requests; the router "
                         f"{router!r} needs background='exact' (or router='least_outstanding')")


class TapeBackend(SimBackend):
    """``SimBackend`` whose world serves the environment's calls against a background tape.

    Args:
        cluster: the pool and its background (a replayed ``background_trace`` is not supported: its arrays
            are no cache key).
        warmup_s: background simulated before the tape starts (the exact backend starts from empty engines).
        horizon_s: simulated seconds on the tape.
    """

    def __init__(self, cluster: ClusterConfig | None = None, *, warmup_s: float = 30.0,
                 horizon_s: float = DEFAULT_HORIZON_S):
        super().__init__(cluster)
        if self.cluster.background_trace is not None:
            raise ValueError("TapeBackend does not replay a background_trace; use the exact SimBackend")
        _check_router(self.cluster.router)
        if not warmup_s >= 0 or not horizon_s > 0:
            raise ValueError(f"warmup_s must be >= 0 and horizon_s > 0, got {warmup_s!r}, {horizon_s!r}")
        self.warmup_s, self.horizon_s = float(warmup_s), float(horizon_s)

    def reset(self, seed: int) -> None:
        c = self.cluster
        key = ("mas", c.profile, c.replicas, c.router, c.background_rate_per_s, seed, self.warmup_s, self.horizon_s)
        tape = TAPES.get(key, lambda: build_world(c, seed), self.warmup_s, self.horizon_s)
        self.world = world = TapeWorld(tape)
        # SimBackend's one-line wrappers, bound straight to this world's clock (one Python call less each)
        env = world.env
        self.event, self.process, self.timeout, self.run = env.event, env.process, env.timeout, env.run
        self.all_of, self.any_of, self.load, self.submit = env.all_of, env.any_of, world.load, world.submit


def cmdp_tape_world(models: Sequence[ModelEntry], regime: LoadRegime, seed: int, *, router: str, warmup_s: float,
                    horizon_s: float = DEFAULT_HORIZON_S, offset_s: float = 0.0) -> TapeWorld:
    """The CMDP world of ``build_cmdp_world`` after ``warmup_s``, its agent calls served against a tape.

    ``offset_s``: the world's clock starts that far into the tape (looped past ``horizon_s``), so that many
    episodes can replay one tape from different points (``tape_offset_s``) instead of one tape each."""
    _check_router(router)
    if not 0 <= offset_s < float("inf"):
        raise ValueError(f"offset_s must be a finite number of seconds >= 0, got {offset_s!r}")
    key = ("cmdp", tuple((m.name, m.profile, m.replicas) for m in models), regime, seed, router, float(warmup_s),
           float(horizon_s))
    tape = TAPES.get(key, lambda: build_cmdp_world(models, regime, seed, router=router), warmup_s, horizon_s)
    world = TapeWorld(tape)
    if offset_s > 0:  # nothing is scheduled in a fresh TapeWorld: this only moves its clock (and tape time) on
        world.run(until=offset_s)
    return world


def tape_offset_s(seed: int, horizon_s: float = DEFAULT_HORIZON_S) -> float:
    """Where the episode of ``reset(seed=seed)`` starts on a shared tape: uniform over one period of the tape,
    from the seed alone (its own stream, ``SeedSequence([seed, 23])``), so every policy and the oracle's
    lookaheads meet the same background for the same seed (common random numbers)."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), _OFFSET_STREAM])))
    return float(rng.uniform(0.0, horizon_s))
