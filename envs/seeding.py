"""Seed words for the envs' per-query random generators."""

from __future__ import annotations

import numpy as np

__all__ = ["entropy"]


def entropy(words: list[int]):
    """``words`` as ``np.random.SeedSequence`` entropy: a uint32 array when every word fits in 32 bits.

    The same seed: SeedSequence turns a list into the concatenation of each int's 32-bit words (one per int
    below 2**32), which is this array; it only does so one int at a time, ~100 us per query (as much as the
    rest of a Gymnasium step). Other words keep the list (and SeedSequence's own handling)."""
    return np.array(words, np.uint32) if all(0 <= w < 1 << 32 for w in words) else words
