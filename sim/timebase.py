"""Simulated time.

The SimPy clock runs in float seconds. Engine step durations are integers in femtosecond *ticks*, so that a
run of k decode steps can be summed in closed form and land on exactly the same instant as k single steps
(integer sums are exact; float sums are not). A tick count turns into seconds by one correctly rounded
division, so every replica boundary is a deterministic float.
"""

from __future__ import annotations

import math

__all__ = ["TICKS_PER_S", "ticks_to_s", "s_to_ticks", "ticks_at_or_after"]

TICKS_PER_S = 10**15


def ticks_to_s(ticks: int) -> float:
    return ticks / TICKS_PER_S


def s_to_ticks(seconds: float) -> int:
    """Nearest tick of a duration in seconds."""
    return round(seconds * TICKS_PER_S)


def ticks_at_or_after(t_s: float) -> int:
    """A tick whose float time is not before ``t_s``: ``ceil(t_s * 1e15)``, nudged up past round-off."""
    t = math.ceil(t_s * TICKS_PER_S)
    while t / TICKS_PER_S < t_s:
        t += 1
    return t
