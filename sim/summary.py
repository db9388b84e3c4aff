"""Latency summaries from a world's records (numpy only)."""

from __future__ import annotations

import numpy as np

__all__ = ["latency_summary", "PERCENTILES"]

PERCENTILES = (50, 90, 99)


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
    cols = rs.columns()
    if not cols:
        return {"finished": 0, "rejected": dict(world.rejected)}
    ok = np.fromiter(map("FINISHED_LENGTH_CAPPED".__eq__, rs.status), bool, len(rs.status))  # ~3x np.array(...)
    if pool is not None:
        ok &= np.array(rs.pool) == pool
    q, s, f, last = cols["queued_s"][ok], cols["scheduled_s"][ok], cols["first_token_s"][ok], cols["last_token_s"][ok]
    out_tok = cols["output_tokens"][ok]
    tpot = np.where(out_tok > 1, (last - f) / np.maximum(out_tok - 1, 1), 0.0)
    span = (last.max() - cols["arrival_s"][ok].min()) if ok.any() else float("nan")
    reps = [r for r in world.replicas if pool is None or r.pool == pool]
    return {
        "finished": int(ok.sum()),
        "rejected": dict(world.rejected),
        "ttft_s": _stats(f - q),
        "tpot_s": _stats(tpot[out_tok > 1]),
        "e2e_s": _stats(last - q),
        "queue_s": _stats(s - q),
        "client_e2e_s": _stats(cols["done_s"][ok] - cols["arrival_s"][ok]),
        "throughput_req_per_s": float(ok.sum() / span) if span and span > 0 else float("nan"),
        "output_tokens_per_s": float(out_tok.sum() / span) if span and span > 0 else float("nan"),
        "preemptions": int(sum(r.core.num_preemptions for r in reps)),
        "preempted_requests": int((cols["num_preemptions"][ok] > 0).sum()),
        "prefix_cache_hit_rate": (sum(r.core.prefix_cache_hits for r in reps)
                                  / max(1, sum(r.core.prefix_cache_queries for r in reps))),
        "engine_steps": int(sum(r.core.num_steps for r in reps)),
        "simulated_s": float(world.now),
    }
