"""Which query an episode answers: the one asked for, or the next in file order (a seeded permutation per
pass with ``shuffle``). Shared by the environments."""

from __future__ import annotations

import numpy as np

__all__ = ["QueryOrder"]


class QueryOrder:
    def __init__(self, num_queries: int, shuffle: bool):
        self.n, self.shuffle = num_queries, shuffle
        self.reset()

    def reset(self) -> None:
        self._order: list[int] = []
        self._cursor = 0

    def next(self, options: dict | None, rng: np.random.Generator) -> int:
        """``options["query"]`` if given (checked), else the next query of the current pass."""
        if options and "query" in options:
            q = int(options["query"])
            if not 0 <= q < self.n:
                raise ValueError(f"options['query'] must be in [0, {self.n}), got {q}")
            return q
        if self._cursor >= len(self._order):
            self._order = list(rng.permutation(self.n)) if self.shuffle else list(range(self.n))
            self._cursor = 0
        q = int(self._order[self._cursor])
        self._cursor += 1
        return q
