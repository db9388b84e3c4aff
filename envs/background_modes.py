"""``background="exact"|"tape"`` for the environments: the tape-served world of each (``envs.bgtape``).

``MASLatency-v0`` takes ``backend=TapeBackend(cluster)``; ``MASLatency-CMDP-v0`` calls ``cmdp_tape_world`` from
its ``_new_world`` when built with ``background="tape"``. Both key the process-wide ``TAPES`` by everything
the background depends on, so every environment of a session with the same recipe and seed replays one tape.
"""

from __future__ import annotations

from collections.abc import Sequence

from .backend import SimBackend
from .bgtape import BACKGROUND_MODES, TAPES, TapeWorld
from .cluster import ClusterConfig, build_world
from .cmdp_catalog import ModelEntry
from .cmdp_world import build_cmdp_world
from .loads import LoadRegime

__all__ = ["DEFAULT_HORIZON_S", "TapeBackend", "check_background", "cmdp_tape_world"]

#: simulated seconds of background per tape (looped beyond): long against a query (~10-60 s) and a load
#: phase (20 s), short against a training run
DEFAULT_HORIZON_S = 600.0


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
                    horizon_s: float = DEFAULT_HORIZON_S) -> TapeWorld:
    """The CMDP world of ``build_cmdp_world`` after ``warmup_s``, its agent calls served against a tape."""
    _check_router(router)
    key = ("cmdp", tuple((m.name, m.profile, m.replicas) for m in models), regime, seed, router, float(warmup_s),
           float(horizon_s))
    tape = TAPES.get(key, lambda: build_cmdp_world(models, regime, seed, router=router), warmup_s, horizon_s)
    return TapeWorld(tape)
