"""Latency summaries from a world's records (numpy only).

The statistics are taken over the finished requests in submission order (``seq_id``), not in the order they
finished: a mean is a float sum, whose last bits depend on the order, and submission order is the one order a
world simulated in one piece and the same world simulated replica by replica (``sim.shard``) share.
"""

from __future__ import annotations

import numpy as np

__all__ = ["COUNTERS", "PERCENTILES", "core_counters", "latency_summary", "summarize"]

PERCENTILES = (50, 90, 99)

#: engine counters a summary sums over replicas (``EngineCore`` attributes)
COUNTERS = ("num_steps", "num_jumps", "num_jumped_steps", "num_truncated_jumps", "num_preemptions",
            "prefix_cache_hits", "prefix_cache_queries")


def core_counters(core) -> dict[str, int]:
    """One engine's ``COUNTERS``."""
    return {k: int(getattr(core, k)) for k in COUNTERS}


def _stats(x: np.ndarray) -> dict[str, float]:
    if len(x) == 0:
        return {"mean": float("nan"), **{f"p{p}": float("nan") for p in PERCENTILES}}
    out = {"mean": float(np.mean(x))}
    for p, v in zip(PERCENTILES, np.percentile(x, PERCENTILES), strict=True):
        out[f"p{p}"] = float(v)
    return out


def latency_summary(world, pool: str | None = None) -> dict:
    """TTFT/TPOT/E2E/queue statistics (engine-side, run-format definitions), throughput and counters."""
    rs = world.records
    reps = [r for r in world.replicas if pool is None or r.pool == pool]
    return summarize(rs.columns(), rs.status, dict(world.rejected), [core_counters(r.core) for r in reps],
                     world.now, pool_col=rs.pool if pool is not None else None, pool=pool)


def summarize(cols: dict, status: list[str] | None, rejected: dict, counters: list[dict], now_s: float, *,
              pool_col: list[str] | None = None, pool: str | None = None, ok: np.ndarray | None = None) -> dict:
    """``latency_summary`` from its parts: record columns (``RecordStore.columns``) and statuses (or ``ok``,
    the mask of the records whose status is ``FINISHED_LENGTH_CAPPED``), rejection counts, each replica's
    ``core_counters`` and the simulated time."""
    if not cols:
        return {"finished": 0, "rejected": rejected}
    if ok is None:
        ok = np.fromiter(map("FINISHED_LENGTH_CAPPED".__eq__, status), bool, len(status))  # ~3x np.array(...)
    else:
        ok = ok.copy()
    if pool is not None:
        ok &= np.array(pool_col) == pool
    seq = cols["seq_id"][ok]
    order = None if len(seq) < 2 or bool(np.all(seq[1:] > seq[:-1])) else np.argsort(seq, kind="stable")

    def col(name: str) -> np.ndarray:
        x = cols[name][ok]
        return x if order is None else x[order]

    q, s, f, last, arrival = col("queued_s"), col("scheduled_s"), col("first_token_s"), col("last_token_s"), col("arrival_s")
    out_tok = col("output_tokens")
    tpot = np.where(out_tok > 1, (last - f) / np.maximum(out_tok - 1, 1), 0.0)
    span = (last.max() - arrival.min()) if len(q) else float("nan")
    total = {k: sum(c[k] for c in counters) for k in COUNTERS}
    return {
        "finished": int(len(q)),
        "rejected": rejected,
        "ttft_s": _stats(f - q),
        "tpot_s": _stats(tpot[out_tok > 1]),
        "e2e_s": _stats(last - q),
        "queue_s": _stats(s - q),
        "client_e2e_s": _stats(col("done_s") - arrival),
        "throughput_req_per_s": float(len(q) / span) if span and span > 0 else float("nan"),
        "output_tokens_per_s": float(out_tok.sum() / span) if span and span > 0 else float("nan"),
        "preemptions": total["num_preemptions"],
        "preempted_requests": int((col("num_preemptions") > 0).sum()),
        "prefix_cache_hit_rate": total["prefix_cache_hits"] / max(1, total["prefix_cache_queries"]),
        "engine_steps": total["num_steps"],
        "simulated_s": float(now_s),
    }
