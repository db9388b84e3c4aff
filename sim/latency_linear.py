"""A shape-free step-time model: a non-negative linear combination of counts taken from the step itself.

The physics model (``sim.latency.PhysicsStepModel``) needs the GPU's peak rates and the model's shape to build
its roofline basis. A run of a model or a GPU nobody has tabulated still has steps, and a step's duration is
still, to first order, linear in what the step holds::

    T = step_s + pf_token_s * sum(n) + pf_attn_s * sum(n^2 + 2 n p) + chunk_s * N_chunks
               + dc_seq_s * n_dec + dc_ctx_s * ctx_dec

over the step's prefill chunks ``(n, p)`` (n new tokens on top of p cached ones) and its ``n_dec`` decodes
with ``ctx_dec`` context tokens in total. Each term has a physical reading that needs no shape:

* ``step_s``: the fixed cost of one forward pass (reading every weight once, kernel launches, the
  scheduler, sampling setup); the weight-streaming term of the physics model folds in here;
* ``pf_token_s``: the linear-layer cost of a prefill token (the MLP and projections, compute-bound);
* ``pf_attn_s``: prefill attention, quadratic in the chunk (``n^2 + 2np``: causal attention over the new
  tokens and their attention to the ``p`` cached ones, ``docs/latency_physics.md#3-roofline``);
* ``chunk_s``: per prefill chunk (one more sequence in the batch, its sampling when it completes);
* ``dc_seq_s``: per decode sequence (its linear-layer FLOPs, sampling, detokenisation in the engine loop);
* ``dc_ctx_s``: per context token of a decode (reading its KV cache: decode attention is memory-bound).

**Identifiability** (how ``traces.stepfit`` treats each term). ``step_s``, ``dc_seq_s`` and ``dc_ctx_s`` are
collinear in runs where the batch does not vary: a slot-bound run keeps ``n_dec`` at ``max_num_seqs`` (only
``step_s + dc_seq_s * max_num_seqs`` is identified), a KV-bound run keeps ``ctx_dec`` near the KV capacity;
weak scale-free priors (fractions of the run's own median step time) split them there. ``pf_attn_s`` is
separated from ``pf_token_s`` only by the spread of prompt lengths (a run of equal prompts cannot tell them
apart), and ``chunk_s`` from ``pf_token_s`` and ``dc_seq_s`` only by chunks of different sizes: both get a weak
prior toward zero. A "per request in the step" term is not in the basis: it would be exactly
``dc_seq_s + chunk_s`` (collinear by construction).

Pure-decode steps are linear in ``(n_dec, ctx_dec)``: ``linear_decode`` lets the engine jump over them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from .timebase import TICKS_PER_S

if TYPE_CHECKING:
    from .profiles import Profile

__all__ = ["LINEAR_BASIS_NAMES", "LINEAR_MODEL", "LinearStepModel"]

#: the name of this family in ``sim.latency.STEP_TIME_MODELS`` and in a profile's ``latency.model``
LINEAR_MODEL = "linear"

LINEAR_BASIS_NAMES: tuple[str, ...] = ("step_s", "pf_token_s", "pf_attn_s", "chunk_s", "dc_seq_s", "dc_ctx_s")

Chunk = tuple[int, int]


class LinearStepModel:
    """Step time = non-negative coefficients (seconds per unit) x shape-free counts (module docstring).

    Args:
        coefficients: a value per ``LINEAR_BASIS_NAMES`` entry, seconds per unit; missing ones are 0.
    """

    def __init__(self, coefficients: Mapping[str, float]):
        unknown = sorted(set(coefficients) - set(LINEAR_BASIS_NAMES))
        if unknown:
            raise ValueError(f"unknown coefficient(s) {unknown} of latency model {LINEAR_MODEL!r}; expected a "
                             f"subset of {list(LINEAR_BASIS_NAMES)}")
        coef = {n: coefficients.get(n, 0.0) for n in LINEAR_BASIS_NAMES}
        for n, v in coef.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"latency coefficient {n!r} must be a non-negative finite number of seconds, "
                                 f"got {v!r}")
        if not any(coef.values()):
            raise ValueError(f"latency model {LINEAR_MODEL!r}: every coefficient is 0 (steps would take no time); "
                             "give at least step_s")
        self.coefficients = {n: float(v) for n, v in coef.items()}
        self._coef = tuple(self.coefficients[n] for n in LINEAR_BASIS_NAMES)
        c = self.coefficients
        self.linear_decode = (round(c["step_s"] * TICKS_PER_S), round(c["dc_seq_s"] * TICKS_PER_S),
                              round(c["dc_ctx_s"] * TICKS_PER_S))
        self._pf = (c["pf_token_s"], c["pf_attn_s"], c["chunk_s"])

    def basis(self, n_dec: int, ctx_dec: int, chunks: Sequence[Chunk]) -> tuple[float, ...]:
        """The step's counts, in the order of ``LINEAR_BASIS_NAMES``."""
        sum_n = sum_q = 0
        for n, p in chunks:
            sum_n += n
            sum_q += n * n + 2 * n * p
        return (1.0, float(sum_n), float(sum_q), float(len(chunks)), float(n_dec), float(ctx_dec))

    def step_seconds(self, n_dec: int, ctx_dec: int, chunks: Sequence[Chunk]) -> float:
        return sum(b * x for b, x in zip(self._coef, self.basis(n_dec, ctx_dec, chunks), strict=True))

    def prefill_seconds(self, chunks: Sequence[Chunk]) -> float:
        """The part of a step's time that its prefill chunks add (zero without chunks)."""
        tok, attn, per_chunk = self._pf
        return sum(n * tok + (n * n + 2 * n * p) * attn + per_chunk for n, p in chunks)

    def step_ticks(self, n_dec: int, ctx_dec: int, chunks: Sequence[Chunk]) -> int:
        a, b, g = self.linear_decode
        t = a + b * n_dec + g * ctx_dec
        if chunks:
            t += round(self.prefill_seconds(chunks) * TICKS_PER_S)
        return t

    @classmethod
    def from_profile(cls, profile: Profile) -> LinearStepModel:
        """Needs only the profile's coefficients: no hardware, no model shape."""
        return cls(profile.latency_coefficients)
