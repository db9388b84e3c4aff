"""KV-cache capacity (``num_gpu_blocks``) of a measured run: measured when recorded, otherwise estimated.

The capacity decides when a KV-bound engine preempts, so it must come from measurement where it exists
(``vllm.md`` s.3: ``kv_cache.num_gpu_blocks``). When a run lacks it, ``kv_capacity`` estimates it and says so
(best source first):

* **from memory** (vLLM's profiling rule, ``gpu_worker.determine_available_memory``) when the run recorded its
  device memory: KV memory = ``gpu_memory_utilization x total memory - weights - activations``, divided by the
  bytes of one block. The activation peak is modelled as the sampler's FP32 logits plus the MLP and attention
  activations of one full token budget: ``T x (vocab x 4 B + (2 x intermediate + 4 x hidden) x dtype)`` with
  ``T = max_num_batched_tokens``. On the RTX 4090 run, which records its capacity (2,588 blocks), this rule gives
  2,589 (the test suite checks it). It is never ``0.9 x memory - weights`` alone (+23 % there);
* **from the KV-usage gauge** when ``kv_cache_pct`` was recorded: blocks held by the requests in flight (from
  their timestamps) over the measured usage fraction (about 6 % high on the RTX 4090 run);
* **from memory with the GPU table's nominal memory** otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .hardware import NO_MEMORY_BYTES, GpuEntry, ModelEntry
from .runs import MeasuredRun

__all__ = ["KVCapacity", "kv_capacity", "memory_estimate_blocks", "usage_estimate_blocks"]


@dataclass(frozen=True, slots=True, kw_only=True)
class KVCapacity:
    """The capacity used for a run and how it was obtained.

    Attributes:
        num_gpu_blocks: blocks including vLLM's reserved null block.
        measured: whether it was recorded by the run.
        method: ``"measured"``, ``"kv_usage_gauge"`` or ``"memory_profile"``.
        source: one sentence for the profile's sources.
        detail: the numbers behind an estimate.
    """

    num_gpu_blocks: int
    measured: bool
    method: str
    source: str
    detail: dict = field(default_factory=dict)


def memory_estimate_blocks(*, total_memory_bytes: float, gpu_memory_utilization: float, model: ModelEntry,
                           tensor_parallel_size: int, max_num_batched_tokens: int,
                           block_size: int) -> tuple[int, dict]:
    """vLLM's profiling rule with a modelled activation peak (see the module docstring)."""
    spec, tp = model.spec, tensor_parallel_size
    weights = spec.weight_bytes / tp
    act = max_num_batched_tokens * (model.vocab_size * 4
                                    + (2 * model.intermediate_size + 4 * spec.hidden_size) * spec.dtype_bytes / tp)
    kv_mem = gpu_memory_utilization * total_memory_bytes - weights - act
    per_block = spec.kv_bytes_per_token * block_size / tp
    blocks = int(kv_mem // per_block)
    return blocks, {"total_memory_bytes": total_memory_bytes, "gpu_memory_utilization": gpu_memory_utilization,
                    "weight_bytes": weights, "activation_bytes": act, "kv_memory_bytes": kv_mem,
                    "bytes_per_block": per_block}


def _held_tokens(run: MeasuredRun, t_engine: float) -> np.ndarray:
    """Tokens each request holds at engine time ``t_engine``, interpolated between its timestamps."""
    rq = run.requests
    s, f, last = (rq[c].to_numpy() for c in ("scheduled_ts", "first_token_ts", "last_token_ts"))
    p, n = run.prompt_tokens, run.output_tokens
    in_prefill = (s <= t_engine) & (t_engine < f)
    in_decode = (f <= t_engine) & (t_engine < last)
    frac_p = np.where(f > s, (t_engine - s) / np.where(f > s, f - s, 1.0), 1.0)
    frac_d = np.where(last > f, (t_engine - f) / np.where(last > f, last - f, 1.0), 1.0)
    return np.where(in_prefill, p * frac_p, 0.0) + np.where(in_decode, p + 1 + (n - 1) * frac_d, 0.0)


def usage_estimate_blocks(run: MeasuredRun, *, until_s: float | None = None,
                          band: tuple[float, float] = (0.05, 0.95)) -> tuple[int, dict] | None:
    """``num_gpu_blocks`` from the recorded KV-usage gauge, or ``None`` when it was not recorded (or the run's
    times are a client's, which do not say when the engine held the tokens).

    Uses ticks whose usage lies inside ``band`` (a saturated cache preempts, and a near-empty one says little),
    up to replay time ``until_s``.
    """
    if not run.kv_cache_recorded or run.client_side:  # a client's times are not the engine's: no held tokens
        return None
    ts = run.timeseries
    bs = run.engine.block_size
    q0 = run.requests["queued_ts"].min()
    tau = ts["t"].to_numpy() * run.meta.tick_seconds + run.tick_origin_s
    use = ts["kv_cache_usage_perc"].to_numpy()
    ok = (use > band[0]) & (use < band[1]) & (tau >= 0)
    if until_s is not None:
        ok &= tau <= until_s
    if ok.sum() < 3:
        return None
    held = np.array([np.ceil(_held_tokens(run, q0 + t) / bs).sum() for t in tau[ok]])
    usable = held.sum() / use[ok].sum()
    return int(round(usable)) + 1, {"ticks_used": int(ok.sum()), "band": list(band),
                                    "ratio_spread": float(np.std(held / use[ok]) / usable)}


def _memory_capacity(run: MeasuredRun, gpu: GpuEntry, model: ModelEntry) -> KVCapacity:
    e = run.engine
    hw = run.meta.hardware or {}
    total = hw.get("device_total_memory_bytes")
    measured_mem = isinstance(total, (int, float)) and not isinstance(total, bool) and total > 0
    mem_src = "meta.hardware.device_total_memory_bytes"
    if not measured_mem:
        total, mem_src = gpu.spec.memory_bytes, f"the {gpu.spec.name} table entry ({gpu.sources.get('memory_bytes')})"
    blocks, detail = memory_estimate_blocks(
        total_memory_bytes=float(total), gpu_memory_utilization=e.gpu_memory_utilization, model=model,
        tensor_parallel_size=e.tensor_parallel_size, max_num_batched_tokens=e.max_num_batched_tokens,
        block_size=e.block_size)
    if blocks < 2:
        raise ValueError(f"run {run.name}: the memory estimate leaves no KV cache ({detail}); give the capacity "
                         "with --num-gpu-blocks")
    detail["memory_measured"] = bool(measured_mem)
    return KVCapacity(num_gpu_blocks=blocks, measured=False, method="memory_profile", detail=detail,
                      source=f"ESTIMATED (run {run.name} records no num_gpu_blocks): vLLM's profiling rule, "
                             f"{e.gpu_memory_utilization} x {total / 2**30:.2f} GiB ({mem_src}) - "
                             f"{detail['weight_bytes'] / 2**30:.2f} GiB weights - "
                             f"{detail['activation_bytes'] / 2**30:.2f} GiB modelled activations, "
                             f"/ {detail['bytes_per_block'] / 2**20:.0f} MiB per block")


def kv_capacity(run: MeasuredRun, gpu: GpuEntry, model: ModelEntry, *, until_s: float | None = None) -> KVCapacity:
    """The run's capacity, best source first.

    1. measured (``kv_cache.num_gpu_blocks`` or the resolved cache config);
    2. the memory rule, when the run recorded its device memory (0.04 % off on the RTX 4090 run);
    3. the KV-usage gauge, when recorded (about 6 % high on the RTX 4090 run: timestamps cannot tell which
       requests sit preempted, and tick times are known to a fraction of a second);
    4. the memory rule with the GPU table's nominal memory.
    Every estimate lists the other available estimates in ``detail["alternatives"]``.
    """
    e = run.engine
    if e.num_gpu_blocks is not None:
        return KVCapacity(num_gpu_blocks=e.num_gpu_blocks, measured=True, method="measured",
                          source=f"measured: {e.sources.get('num_gpu_blocks', 'meta.json')} of run {run.name}")
    mem = _memory_capacity(run, gpu, model)
    gauge = usage_estimate_blocks(run, until_s=until_s)
    alternatives = {"memory_profile": mem.num_gpu_blocks}
    if gauge is not None:
        alternatives["kv_usage_gauge"] = gauge[0]
    if gauge is None and not mem.detail["memory_measured"] and mem.detail["total_memory_bytes"] >= NO_MEMORY_BYTES:
        raise ValueError(f"run {run.name} records no num_gpu_blocks, no KV-usage gauge and no device memory, and "
                         "--gpu-spec gives no memory=: pass memory=BYTES in --gpu-spec (e.g. memory=80G)")
    if gauge is not None and not mem.detail["memory_measured"]:
        blocks, detail = gauge
        detail["alternatives"] = alternatives
        return KVCapacity(num_gpu_blocks=blocks, measured=False, method="kv_usage_gauge", detail=detail,
                          source=f"ESTIMATED (run {run.name} records no num_gpu_blocks): blocks held by in-flight "
                                 f"requests over the recorded kv_cache_pct, {detail['ticks_used']} ticks")
    mem.detail["alternatives"] = alternatives
    return mem
