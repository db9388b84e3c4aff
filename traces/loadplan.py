"""What the collector sends: request lengths from a workload spec, in a reproducible order.

Workload specs (``--workload``):

    fixed:P,O                 every request has P prompt and O output tokens
    lognormal:PM,OM[,SIGMA]   lognormal lengths with means PM and OM (sigma 0.8 by default; clipping counted)
    azure-conv | azure-code   (prompt, output) pairs sampled from the shared Azure 2023 trace
    PATH.csv                  pairs sampled from an Azure-format CSV (TIMESTAMP,ContextTokens,GeneratedTokens)

With ``trace_arrivals`` an Azure trace is replayed in order instead: its rows' lengths and its arrival
offsets. Lengths come from the ``lengths`` stream and trace rows are never reordered, so a seed fixes the
whole request sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["LoadPlan", "parse_workload"]

_CHUNK = 4096


@dataclass(frozen=True)
class _Source:
    description: str
    lengths: object | None  # a sim lengths object (draw(rng, n)), or None for an in-order trace
    offsets_s: np.ndarray | None = None
    prompt_tokens: np.ndarray | None = None
    output_tokens: np.ndarray | None = None
    dropped: int = 0  # trace rows with a zero length (they cannot be served)


def _numbers(spec: str, body: str, n_min: int, n_max: int) -> list[float]:
    try:
        vals = [float(x) for x in body.split(",")]
    except ValueError:
        raise ValueError(f"workload {spec!r}: expected numbers after ':', got {body!r}") from None
    if not n_min <= len(vals) <= n_max or any(v <= 0 for v in vals):
        raise ValueError(f"workload {spec!r}: expected {n_min} to {n_max} positive numbers")
    return vals


def parse_workload(spec: str, *, trace_arrivals: bool = False) -> _Source:
    """Parse a workload spec (see the module docstring)."""
    from sim import EmpiricalLengths, FixedLengths, LognormalLengths

    kind, _, body = spec.partition(":")
    if kind == "fixed":
        p, o = _numbers(spec, body, 2, 2)
        if p != int(p) or o != int(o):
            raise ValueError(f"workload {spec!r}: token counts must be integers")
        src = _Source(spec, FixedLengths(int(p), int(o)))
    elif kind == "lognormal":
        v = _numbers(spec, body, 2, 3)
        src = _Source(spec, LognormalLengths(v[0], v[1], **({"sigma": v[2]} if len(v) == 3 else {})))
    else:
        from .azure import azure_trace, read_azure_trace

        if spec in ("azure-conv", "azure-code"):
            tr = azure_trace(spec.split("-")[1])
        elif spec.endswith(".csv") or Path(spec).is_file():
            tr = read_azure_trace(spec)
        else:
            raise ValueError(f"unknown workload {spec!r}: use fixed:P,O | lognormal:PM,OM[,SIGMA] | azure-conv | "
                             f"azure-code | PATH.csv")
        keep = (tr.prompt_tokens >= 1) & (tr.output_tokens >= 1)
        src = _Source(spec, EmpiricalLengths(tr.prompt_tokens, tr.output_tokens), tr.offsets_s[keep],
                      tr.prompt_tokens[keep], tr.output_tokens[keep], int((~keep).sum()))
    if trace_arrivals and src.offsets_s is None:
        raise ValueError(f"trace arrivals need an Azure-trace workload, not {spec!r}")
    return src


class LoadPlan:
    """The i-th request's (prompt, output) lengths and, for trace replay, its arrival offset."""

    def __init__(self, spec: str, seed: int, *, trace_arrivals: bool = False):
        self.source = parse_workload(spec, trace_arrivals=trace_arrivals)
        self.trace_arrivals = trace_arrivals
        seqs = np.random.SeedSequence(seed).spawn(3)
        self.length_rng, self.arrival_rng, self.token_rng = (np.random.Generator(np.random.PCG64(s)) for s in seqs)
        self._p: list[int] = []
        self._o: list[int] = []

    @property
    def size(self) -> int | None:
        """Requests available (``None``: unbounded)."""
        return len(self.source.prompt_tokens) if self.trace_arrivals else None

    def lengths(self, i: int) -> tuple[int, int]:
        src = self.source
        if self.trace_arrivals:
            return int(src.prompt_tokens[i]), int(src.output_tokens[i])
        while i >= len(self._p):
            p, o = src.lengths.draw(self.length_rng, _CHUNK)
            self._p += p.tolist()
            self._o += o.tolist()
        return self._p[i], self._o[i]

    def arrival_offset(self, i: int) -> float:
        off = self.source.offsets_s
        return float(off[i] - off[0])

    def poisson_gaps(self, rate_per_s: float):
        while True:
            yield from self.arrival_rng.exponential(1.0 / rate_per_s, _CHUNK).tolist()

    def token_ids(self, n: int) -> list[int]:
        """A random prompt of ``n`` token ids in [1000, 30000): valid for any tokenizer with >= 32k tokens,
        and unique enough that prompts do not share prefix-cache blocks (as ``vllm bench``'s random set)."""
        return self.token_rng.integers(1000, 30000, n).tolist()

    def hash_lengths(self, n: int) -> str:
        """SHA-256 of the first ``n`` planned (prompt, output) pairs: the run's ``dataset_hash``."""
        import hashlib

        h = hashlib.sha256()
        for i in range(n):
            p, o = self.lengths(i)
            h.update(f"{p},{o};".encode())
        return h.hexdigest()
