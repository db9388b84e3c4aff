"""KV-cache capacity (``num_gpu_blocks``) of a measured run: measured when recorded, otherwise estimated.

The capacity decides when a KV-bound engine preempts, so it must come from measurement where it exists
(``docs/vllm.md#3-kv-cache``: ``kv_cache.num_gpu_blocks``). When a run lacks it, ``kv_capacity`` estimates it
and says so (best source first):

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

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from .hardware import NO_MEMORY_BYTES, GpuEntry, ModelEntry
from .replay_core import simulate_run
from .runs import MeasuredRun

__all__ = ["BLOCK_SIZES", "KVCapacity", "kv_capacity", "memory_estimate_blocks", "nonbinding_blocks",
           "usage_estimate_blocks"]


@dataclass(frozen=True, slots=True, kw_only=True)
class KVCapacity:
    """The capacity used for a run and how it was obtained.

    Attributes:
        num_gpu_blocks: blocks including vLLM's reserved null block.
        measured: whether it was recorded by the run.
        method: ``"measured"``, ``"kv_usage_gauge"`` or ``"memory_profile"``.
        source: one sentence for the profile's sources.
        detail: the numbers behind an estimate.
        block_size: tokens per block (the run's, or inferred from the gauge when the run does not record it).
        block_size_source: where ``block_size`` comes from.
    """

    num_gpu_blocks: int
    measured: bool
    method: str
    source: str
    detail: dict = field(default_factory=dict)
    block_size: int = 16
    block_size_source: str = ""


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


def _held_tokens(run: MeasuredRun, t_engine: np.ndarray | float) -> np.ndarray:
    """Tokens each request holds at engine time(s) ``t_engine`` (ticks x requests), interpolated between its
    timestamps (prefill: from scheduled to first token; decode: one token per step, first to last token)."""
    t = np.atleast_1d(np.asarray(t_engine, float))[:, None]
    rq = run.requests
    s, f, last = (rq[c].to_numpy(float)[None, :] for c in ("scheduled_ts", "first_token_ts", "last_token_ts"))
    s = np.where(np.isnan(s), f, s)  # client-side times have no scheduled_ts: the prompt counts from its first token
    p, n = run.prompt_tokens[None, :], run.output_tokens[None, :]
    in_prefill = (s <= t) & (t < f)
    in_decode = (f <= t) & (t < last)
    frac_p = np.clip((t - s) / np.where(f > s, f - s, 1.0), 0.0, 1.0)
    frac_d = np.clip((t - f) / np.where(last > f, last - f, 1.0), 0.0, 1.0)
    return np.where(in_prefill, p * frac_p, 0.0) + np.where(in_decode, p + 1 + (n - 1) * frac_d, 0.0)


#: block sizes vLLM accepts on GPUs (``CacheConfig.block_size``; 16 is the default), tried when a run does not
#: record its own
BLOCK_SIZES = (16, 32, 64, 128, 256)


def _gauge_ticks(run: MeasuredRun, until_s: float | None, band: tuple[float, float]):
    """Tick times (engine clock) and usage fractions of the ticks the gauge estimate may use, or ``None``."""
    if not run.kv_cache_recorded:
        return None
    ts = run.timeseries
    tau = ts["t"].to_numpy() * run.meta.tick_seconds + run.tick_origin_s
    use = ts["kv_cache_usage_perc"].to_numpy()
    ok = (use > band[0]) & (use < band[1]) & (tau >= 0)
    if until_s is not None:
        ok &= tau <= until_s
    # while the cache is saturated the engine preempts, and a preempted request holds no blocks although its
    # timestamps say it is in flight: use the ticks before the first saturated one and after the last, when
    # there are enough of them
    full = np.flatnonzero(use >= band[1])
    if len(full):
        clean = ok & ((np.arange(len(use)) < full[0]) | (np.arange(len(use)) > full[-1]))
        if clean.sum() >= 3:
            ok = clean
    if ok.sum() < 3:
        return None
    return run.requests["queued_ts"].min() + tau[ok], use[ok]


#: a block size other than the run's default (vLLM's 16) is chosen only when its residual is this much lower
DEFAULT_BLOCK_MARGIN = 0.10


def _candidates(run: MeasuredRun, times: np.ndarray, use: np.ndarray, shifts, sizes, num_gpu_blocks: int | None):
    """``(relative squared residual, block size, tick shift, blocks held per tick)`` for every shift and size."""
    for dt in shifts:
        tokens = _held_tokens(run, times + dt)  # ticks x requests
        for b in sizes:
            held = np.ceil(tokens / b).sum(axis=1)
            k = (held @ use) / (held @ held) if num_gpu_blocks is None else 1.0 / (num_gpu_blocks - 1)
            yield float(np.sum((use - k * held) ** 2) / np.sum(use**2)), b, float(dt), held


def usage_estimate_blocks(run: MeasuredRun, *, until_s: float | None = None,
                          band: tuple[float, float] = (0.05, 0.95), block_sizes: Sequence[int] | None = None,
                          num_gpu_blocks: int | None = None) -> tuple[int, dict] | None:
    """``num_gpu_blocks`` (and the block size) from the recorded KV-usage gauge, or ``None`` when it was not
    recorded. A client's times (no ``scheduled_ts``) count a prompt from its first token and are later than the
    engine's by the client-side constant, which the tick-origin search absorbs when ``started_at`` is absent;
    the replay refinement (``refine_capacity_by_replay``) then corrects what the timestamps cannot see.

    Uses ticks whose usage lies inside ``band`` (a saturated cache preempts, and a near-empty one says little),
    up to replay time ``until_s``. With several ``block_sizes`` (a run that does not record its block size),
    each candidate ``b`` rounds every in-flight request's tokens up to whole blocks, and the one whose block
    counts best explain the gauge (least squares, the capacity free, or ``num_gpu_blocks`` when measured) is
    chosen: block rounding costs each request ``b/2`` tokens on average, so the candidates differ in how the
    gauge moves with the number of requests in flight. Limits: it needs ticks at which the number of requests
    in flight varies; the held tokens are interpolated between a request's timestamps (a preempted request is
    counted as holding its tokens), which blurs candidates closer than that error (16 vs 32 with long
    sequences and few requests); a wrong choice mostly shifts tokens between rounding and capacity, and the
    capacity in tokens, which decides preemption, stays close. So a size other than the default (16) is chosen
    only when it is clearly better (``DEFAULT_BLOCK_MARGIN``); ``detail["block_size_residuals"]`` shows the
    margin. Without ``meta.started_at`` the ticks' origin is unknown: it is searched too (within one tick).
    """
    got = _gauge_ticks(run, until_s, band)
    if got is None:
        return None
    times, use = got
    sizes = tuple(block_sizes) if block_sizes else (run.engine.block_size,)
    # without meta.started_at the ticks' origin is taken at the first arrival; search the offset that best
    # aligns the gauge with the in-flight tokens (a misalignment of a fraction of a tick blurs everything)
    shifts = (0.0,) if run.meta.started_at is not None else tuple(np.linspace(-1.0, 1.0, 41) * run.meta.tick_seconds)
    best, resid = None, {}
    for cand in _candidates(run, times, use, shifts, sizes, num_gpu_blocks):
        r, b = cand[0], cand[1]
        resid[b] = min(resid.get(b, np.inf), r)
        if best is None or r < best[0]:
            best = cand
    _, bs, shift, held = best
    default = run.engine.block_size
    if default in resid and bs != default and resid[bs] > (1 - DEFAULT_BLOCK_MARGIN) * resid[default]:
        bs = default  # not clearly better than vLLM's default: keep the default
        _, _, shift, held = min(_candidates(run, times, use, shifts, (bs,), num_gpu_blocks), key=lambda c: c[0])
    usable = held.sum() / use.sum()
    detail = {"ticks_used": int(len(use)), "band": list(band), "ratio_spread": float(np.std(held / use) / usable),
              "block_size": bs, "tick_shift_s": float(shift)}
    if len(sizes) > 1:
        detail["block_size_residuals"] = {str(b): r for b, r in resid.items()}
    return int(round(usable)) + 1, detail


def _memory_capacity(run: MeasuredRun, gpu: GpuEntry, model: ModelEntry, block_size: int) -> KVCapacity:
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


def nonbinding_blocks(run: MeasuredRun, block_size: int, max_model_len: int | None = None) -> tuple[int, dict]:
    """A capacity the run cannot fill: 1.25 x the blocks its requests could hold together if each held its whole
    sequence from its arrival (``queued_ts``) to its last token (at least one ``max_model_len`` sequence)."""
    q = run.requests
    need = np.ceil((run.prompt_tokens + run.output_tokens) / block_size)
    t = np.concatenate([q["queued_ts"].to_numpy(float), q["last_token_ts"].to_numpy(float)])
    delta = np.concatenate([need, -need])
    order = np.lexsort((delta, t))  # at equal times, releases (negative) first
    peak = float(np.cumsum(delta[order]).max(initial=0.0))
    floor = int(np.ceil((max_model_len or int(need.max(initial=1)) * block_size) / block_size))
    blocks = int(max(np.ceil(1.25 * peak), floor)) + 1
    return blocks, {"peak_upper_bound_blocks": int(peak), "margin": 1.25}


def _block_size(run: MeasuredRun, gauge: tuple[int, dict] | None) -> tuple[int, str]:
    e = run.engine
    if e.recorded("block_size"):
        return e.block_size, f"run {run.name}: {e.sources['block_size']}"
    if gauge is not None:
        r = gauge[1]["block_size_residuals"]
        return gauge[1]["block_size"], (
            f"INFERRED from the trace (run {run.name} records no block_size): of {sorted(map(int, r))}, the block size "
            f"whose block-rounded in-flight tokens best explain the recorded kv_cache_pct over "
            f"{gauge[1]['ticks_used']} ticks, vLLM's default {e.block_size} unless another is "
            f"{100 * DEFAULT_BLOCK_MARGIN:.0f} % better (relative squared residuals "
            + ", ".join(f"{b}: {v:.3g}" for b, v in r.items()) + ")")
    return e.block_size, (f"ASSUMED vLLM's default {e.block_size} (run {run.name} records no block_size and no "
                          "usable KV-usage gauge to infer it from)")


def kv_capacity(run: MeasuredRun, gpu: GpuEntry | None, model: ModelEntry | None, *,
                until_s: float | None = None, max_model_len: int | None = None) -> KVCapacity:
    """The run's capacity and block size, best source first.

    1. measured (``kv_cache.num_gpu_blocks`` or the resolved cache config);
    2. the memory rule, when the run recorded its device memory (0.04 % off on the RTX 4090 run);
    3. the KV-usage gauge, when recorded (about 6 % high on the RTX 4090 run: timestamps cannot tell which
       requests sit preempted, and tick times are known to a fraction of a second);
    4. the memory rule with the GPU table's nominal memory;
    5. with neither a known GPU and model nor a usable gauge: **not binding** (``nonbinding_blocks``), said so.
    The memory rule needs ``gpu`` and ``model`` (``None``: unknown). A block size the run does not record is
    inferred from the gauge when there is one (``usage_estimate_blocks``), else vLLM's default 16 is assumed.
    Every estimate lists the other available estimates in ``detail["alternatives"]``.
    """
    e = run.engine
    sizes = None if e.recorded("block_size") else BLOCK_SIZES
    gauge = usage_estimate_blocks(run, until_s=until_s, block_sizes=sizes, num_gpu_blocks=e.num_gpu_blocks)
    bs, bs_src = _block_size(run, gauge)
    if e.num_gpu_blocks is not None:
        return KVCapacity(num_gpu_blocks=e.num_gpu_blocks, measured=True, method="measured", block_size=bs,
                          block_size_source=bs_src,
                          source=f"measured: {e.sources.get('num_gpu_blocks', 'meta.json')} of run {run.name}")
    mem = None if gpu is None or model is None else _memory_capacity(run, gpu, model, bs)
    alternatives = {} if mem is None else {"memory_profile": mem.num_gpu_blocks}
    if gauge is not None:
        alternatives["kv_usage_gauge"] = gauge[0]
    if (gauge is None and mem is not None and not mem.detail["memory_measured"]
            and mem.detail["total_memory_bytes"] >= NO_MEMORY_BYTES):
        raise ValueError(f"run {run.name} records no num_gpu_blocks, no KV-usage gauge and no device memory, and "
                         "--gpu-spec gives no memory=: pass memory=BYTES in --gpu-spec (e.g. memory=80G)")
    if gauge is not None and (mem is None or not mem.detail["memory_measured"]):
        blocks, detail = gauge
        detail["alternatives"] = alternatives
        return KVCapacity(num_gpu_blocks=blocks, measured=False, method="kv_usage_gauge", detail=detail,
                          block_size=bs, block_size_source=bs_src,
                          source=f"INFERRED from the trace (run {run.name} records no num_gpu_blocks): blocks held by "
                                 f"in-flight requests over the recorded kv_cache_pct, {detail['ticks_used']} ticks")
    if mem is not None:
        mem.detail["alternatives"] = alternatives
        return KVCapacity(num_gpu_blocks=mem.num_gpu_blocks, measured=False, method=mem.method, detail=mem.detail,
                          source=mem.source, block_size=bs, block_size_source=bs_src)
    blocks, detail = nonbinding_blocks(run, bs, max_model_len)
    why = ("its times are a client's (they do not say when the engine held the tokens)" if run.client_side
           and run.kv_cache_recorded else "it records no usable kv_cache_pct gauge")
    return KVCapacity(num_gpu_blocks=blocks, measured=False, method="not_binding", detail=detail, block_size=bs,
                      block_size_source=bs_src,
                      source=f"NOT BINDING (assumed): run {run.name} records no num_gpu_blocks, its model or GPU is "
                             f"unknown (no memory rule) and {why}; {blocks} blocks = 1.25 x the most its requests "
                             "could hold together, so the simulated cache never preempts. If the real engine was "
                             "KV-bound, record kv_cache.num_gpu_blocks or the KV-usage gauge")


def _gauge_error(run: MeasuredRun, profile, until_s: float | None, seed: int) -> float:
    """How far the replay's gauges are from the recorded ones up to ``until_s``: the mean absolute difference of
    the KV usage (fraction) plus that of the running requests relative to their recorded mean. A saturated cache
    reads ~100 % whatever its size; how many requests it holds then is what tells the size."""
    g = simulate_run(run, profile, seed=seed).gauges.set_index("t")
    ts = run.timeseries.set_index("t")
    t = ts.index[ts.index.isin(g.index)]
    tau = t.to_numpy() * run.meta.tick_seconds + run.tick_origin_s
    t = t[tau <= (until_s if until_s is not None else np.inf)]
    out = 0.0
    for col, scale in (("kv_cache_usage_perc", 1.0), ("running", np.nanmean(ts.loc[t, "running"].to_numpy()))):
        d = np.abs(g.loc[t, col].to_numpy(float) - ts.loc[t, col].to_numpy(float))
        d = d[np.isfinite(d)]
        if not len(d) or not scale > 0:
            return np.inf if col == "kv_cache_usage_perc" else out
        out += float(d.mean()) / scale
    return out


def refine_capacity_by_replay(runs: Sequence[MeasuredRun], splits: Sequence[float | None], profile, *,
                              seed: int = 0, factors: tuple[float, float] = (0.67, 1.5),
                              points: int = 9) -> tuple[int, dict]:
    """``num_gpu_blocks`` whose replay best reproduces the recorded KV-usage gauge (fit part of every run).

    The timestamp estimate (``usage_estimate_blocks``) cannot see which requests sit preempted, and a client's
    times do not say when the engine held the tokens; the replay can: it runs vLLM's scheduler with the
    calibrated step times, so its gauge moves, saturates and preempts as the engine's did when the capacity is
    right. A log grid of ``points`` capacities between ``factors`` x the profile's, then the best neighbourhood
    halved twice; the objective is the gauges' difference (KV usage and running requests, ``_gauge_error``)
    summed over the runs with a recorded KV gauge. Never below one longest request of the runs (it could not be served).
    """
    use = [(r, s) for r, s in zip(runs, splits, strict=True) if r.kv_cache_recorded]
    c0, e = profile.engine.num_gpu_blocks, profile.engine
    if not use:
        return c0, {}
    longest = max(int((r.prompt_tokens + r.output_tokens).max(initial=1)) for r in runs)
    c_min = int(np.ceil(longest / e.block_size)) + 2
    cache: dict[int, float] = {}

    def blocks(log_c: float) -> int:
        return max(c_min, int(round(c0 * np.exp(log_c))))

    def err(log_c: float) -> float:
        c = blocks(log_c)
        if c not in cache:
            mml = min(e.max_model_len, (c - 1) * e.block_size)
            prof = profile.replace(engine=replace(e, num_gpu_blocks=c, max_model_len=mml))
            cache[c] = sum(_gauge_error(r, prof, s, seed) for r, s in use)
        return cache[c]

    grid = np.linspace(np.log(factors[0]), np.log(factors[1]), points)
    step = grid[1] - grid[0]
    best = min(grid, key=err)
    for _ in range(2):
        step /= 2
        best = min((best - step, best, best + step), key=err)
    c = blocks(best)
    return c, {"start_blocks": c0, "gauge_mae": cache[c], "gauge_mae_start": err(0.0), "replays": len(cache)}
