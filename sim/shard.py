"""One pool simulated replica by replica, bit for bit like the whole world.

When the router's choice does not depend on the replicas' state (``routing.static_assignment``: round robin),
the arrival times, lengths and replica of every request are fixed before the simulation starts, and the
replicas never interact: replica ``i`` sees exactly its own requests, at their times. Each replica can then
run in a world of its own (a *shard*, possibly in another process), and the shards' outcomes merge into
what the whole world would have recorded::

    draw_workload ──► times, prompt, output ──► static_assignment ──► replica of each request
                                                      │
                  simulate_shard(replica 0) ... simulate_shard(replica R-1)   (independent)
                                                      │
                                        merge_shards ──► records in submission order, summed counters,
                                                         summed histograms, latency summary

A shard's requests keep the whole world's sequence numbers and ids. Exact, not approximate: the tests
compare a sharded run's records, counters, histograms and summary with the single world's, in every engine
mode. What a shard cannot reproduce: cluster-wide gauges (``World.num_finished`` mid-run), state-dependent
routers (least-loaded, KV-aware, vLLM's DP balancing) and clients that wait for completions.
"""

from __future__ import annotations

import resource
import time
from heapq import heappush
from itertools import islice
from operator import attrgetter

import numpy as np

from .records import _FLOAT_COLS, _INT_COLS, _STATUS_NAME
from .request import Request
from .summary import core_counters, summarize
from .workload import _CHUNK
from .world import PoolSpec, make_world, named_rng

__all__ = ["draw_workload", "merge_shards", "shard_requests", "simulate_shard"]

_HISTOGRAMS = ("itl", "ttft", "iteration_tokens")
_OK = "FINISHED_LENGTH_CAPPED"  # the status of a request served to its end (what summaries count)


def draw_workload(seed: int, name: str, arrivals, lengths, num_requests: int, start_s: float = 0.0) -> tuple:
    """``(arrival_s, prompt_tokens, output_tokens)`` arrays of the first ``num_requests`` requests that
    ``Workload(name=name, arrivals=arrivals, lengths=lengths, num_requests=..., start_s=start_s)`` submits in
    a fresh world of seed ``seed``: the same streams, drawn in the same chunks, times summed in the same
    order (``np.cumsum`` adds left to right, as the workload does)."""
    gaps = np.fromiter(islice(arrivals.gaps(named_rng(seed, f"{name}/arrivals")), num_requests), np.float64)
    if len(gaps) < num_requests:
        raise ValueError(f"the arrival process ends after {len(gaps)} of {num_requests} requests")
    t = np.cumsum(np.concatenate(([float(start_s)], gaps)))[1:]
    rng = named_rng(seed, f"{name}/lengths")
    chunks = [lengths.draw(rng, _CHUNK) for _ in range(-(-num_requests // _CHUNK))]
    prompt = np.concatenate([np.asarray(p, np.int64) for p, _ in chunks])[:num_requests]
    output = np.concatenate([np.asarray(o, np.int64) for _, o in chunks])[:num_requests]
    return t, prompt, output


def shard_requests(assignment: np.ndarray, replica: int) -> np.ndarray:
    """Indices (0-based submission order) of the requests routed to ``replica``."""
    return np.flatnonzero(assignment == replica)


class _Feed:
    """Submits pre-drawn requests at their times, each under its whole-world sequence number (what
    ``Workload._fire`` does, from arrays): one event per arrival, re-armed like the workload's."""

    def __init__(self, world, pool: str, t_s, prompt, output, seq_ids):
        self.world, self.pool = world, pool
        (self.rep,) = world.cluster.pools[pool]
        self.t, self.p, self.o, self.seq = t_s.tolist(), prompt.tolist(), output.tolist(), seq_ids.tolist()
        self.i = 0

    def start(self) -> None:
        self.world.active_sources += 1
        if self.t:
            self.world.env.call_at(self.t[0], self._fire)
        else:
            self._stop()

    def _stop(self) -> None:
        self.world.active_sources -= 1
        self.world._maybe_idle()

    def _fire(self, tick) -> None:
        """``World._submit(pool, p, o)`` to the one replica, numbered ``seq_ids[i]`` (inlined, without the
        router and the checks a pre-drawn request needs not: this runs once per request;
        ``tests/test_shard.py`` holds it to the whole world's records)."""
        world, i, rep = self.world, self.i, self.rep
        world._seq = seq = self.seq[i]
        p, o = self.p[i], self.o[i]
        now = world.env._now
        req = Request(f"{self.pool}-{seq}", p, o, now)
        req.seq_id = seq
        world.num_submitted += 1
        req.replica = rep.index
        if p < 1 or o < 1 or p + o > rep._max_model_len:
            world._reject(rep, req, rep.core.validate(req))
        else:
            rep.outstanding += 1
            rep.submit(req, now + rep._frontend_s)
        self.i = i = i + 1
        if i >= len(self.t):
            self._stop()
            return
        env = world.env
        heappush(env._queue, (self.t[i], 1, next(env._eid), tick))  # env.call_again(tick, t)


class _Rows:
    """The shard world's record store: keeps each finished (or rejected) request and its done time, one list
    append each, and builds ``RecordStore``'s columns from them once, at the end (``_columns``)."""

    __slots__ = ("reqs", "done")

    def __init__(self) -> None:
        self.reqs: list[Request] = []
        self.done: list[float] = []

    def add(self, r: Request, pool: str, done_s: float) -> None:
        self.reqs.append(r)
        self.done.append(done_s)

    def _columns(self, replica: int) -> dict:
        """``RecordStore.columns`` (its row values, at the end: a finished request no longer changes)."""
        reqs, n = self.reqs, len(self.reqs)
        if not n:
            return {}

        def col(attr: str, dtype) -> np.ndarray:
            return np.fromiter(map(attrgetter(attr), reqs), dtype, n)

        f = {c: col(a, np.float64) for c, a in zip(_FLOAT_COLS[:-1], ("arrival_time", "queued_ts", "scheduled_ts",
                                                                     "first_token_ts", "last_token_ts"), strict=True)}
        return {**f, "done_s": np.array(self.done, np.float64), "replica": np.full(n, replica, np.int64),
                "prompt_tokens": col("num_prompt_tokens", np.int64), "output_tokens": col("_num_output_tokens", np.int64),
                "num_preemptions": col("num_preemptions", np.int64),
                "num_cached_tokens": np.maximum(col("num_cached_tokens", np.int64), 0),  # -1 (never scheduled): 0
                "seq_id": col("seq_id", np.int64)}


def simulate_shard(spec: PoolSpec, replica: int, t_s, prompt, output, seq_ids, *, seed: int = 0,
                   sample_interval_s: float | None = 1.0, strings: bool = True, **world_kwargs) -> dict:
    """Replica ``replica`` of pool ``spec`` alone, serving the given requests (``seq_ids``: their 1-based
    numbers in the whole world's submission order). Returns plain data (picklable): record columns, which
    records finished (``ok``), with ``strings`` also their statuses, ids and reject reasons (lists of
    strings: slow to send between processes), rejections, engine counters and histograms, time series, the
    simulated time at the end, and the CPU and wall seconds and peak RSS of the process."""
    cpu0, t0 = time.process_time(), time.perf_counter()
    blocks = spec.num_gpu_blocks_per_replica
    one = PoolSpec(name=spec.name, profile=spec.profile, replicas=1,
                   num_gpu_blocks_per_replica=None if blocks is None else (blocks[replica],))
    world = make_world(one, seed=seed, sample_interval_s=sample_interval_s, **world_kwargs)
    rows = world.records = _Rows()
    _Feed(world, spec.name, np.asarray(t_s, np.float64), np.asarray(prompt, np.int64),
          np.asarray(output, np.int64), np.asarray(seq_ids, np.int64)).start()
    world.run_until_idle()
    core = world.replicas[0].core
    cols = rows._columns(replica)
    ts = {k: np.frombuffer(a, np.float64).copy() for k, a in world.timeseries._cols.items()}
    ts["replica"][:] = replica
    running, waiting, used, gen = core.gauges(world.now)  # what the sampler would read from now on (idle)
    idle_sample = (running, waiting, used / core.kv.num_usable, core.prompt_tokens, gen, core.num_preemptions)
    hists = {h: (list(getattr(core, h).counts), getattr(core, h).count, getattr(core, h).sum) for h in _HISTOGRAMS}
    status = [_STATUS_NAME[r.status] for r in rows.reqs]
    ok = np.fromiter(map(_OK.__eq__, status), bool, len(status))
    text = {"status": status, "request_id": [r.request_id for r in rows.reqs],
            "reject_reason": [r.reject_reason for r in rows.reqs]} if strings else {}
    return {"replica": replica, "columns": cols, "ok": ok, **text, "rejected": dict(world.rejected), "now_s": world.now,
            "counters": core_counters(core), "histograms": hists, "timeseries": ts,
            "idle_sample": idle_sample, "sample_interval_s": sample_interval_s,
            "state": (core.generation_tokens, core.prompt_tokens, core.num_finished, core.num_aborted,
                      core.ttft_ema_s, core.kv.free, core.t),
            "cpu_s": time.process_time() - cpu0, "wall_s": time.perf_counter() - t0,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _sample_until(shard: dict, now_s: float) -> None:
    """Append the samples the whole world takes of this replica after the shard ended (it sat idle: its
    gauges stood still) up to the whole world's end, at the times the sampler would have used."""
    interval = shard["sample_interval_s"]
    ts = shard["timeseries"]
    if interval is None:
        return
    t = float(ts["t_s"][-1]) if len(ts["t_s"]) else 0.0
    extra = []
    while t + interval <= now_s:
        t = t + interval
        extra.append(t)
    if extra:
        row = (shard["replica"], *shard["idle_sample"])
        for k, v in zip(("replica", "running", "waiting", "kv_cache_usage_perc", "prompt_tokens_total",
                         "generation_tokens_total", "num_preemptions_total"), row, strict=True):
            ts[k] = np.concatenate([ts[k], np.full(len(extra), float(v))])
        ts["t_s"] = np.concatenate([ts["t_s"], np.array(extra)])


def merge_shards(shards: list[dict]) -> dict:
    """The whole world's outcome from its shards: records in submission order (``seq_id``; their strings only
    if every shard sent them), time series in
    (time, replica) order, rejections and counters summed, histograms summed bucket by bucket, per-replica
    counters and histograms in replica order, and the latency summary (``sim.summary.summarize``)."""
    shards = sorted(shards, key=lambda s: s["replica"])
    parts = [s for s in shards if s["columns"]]
    strings = all("status" in s for s in shards)
    cols, ok, text = {}, np.zeros(0, bool), {k: [] for k in ("status", "request_id", "reject_reason")}
    if parts:
        order = np.argsort(np.concatenate([s["columns"]["seq_id"] for s in parts]), kind="stable")
        cols = {k: np.concatenate([s["columns"][k] for s in parts])[order] for k in (*_FLOAT_COLS, *_INT_COLS)}
        ok = np.concatenate([s["ok"] for s in parts])[order]
        if strings:
            idx = order.tolist()
            for key, out in text.items():
                flat = [x for s in parts for x in s[key]]
                out.extend(flat[i] for i in idx)
    now_s = max(s["now_s"] for s in shards)
    for s in shards:
        _sample_until(s, now_s)
    ts_order = np.lexsort((np.concatenate([s["timeseries"]["replica"] for s in shards]),
                           np.concatenate([s["timeseries"]["t_s"] for s in shards])))
    timeseries = {k: np.concatenate([s["timeseries"][k] for s in shards])[ts_order] for k in shards[0]["timeseries"]}
    rejected: dict[str, int] = {}
    for s in shards:
        for reason, n in s["rejected"].items():
            rejected[reason] = rejected.get(reason, 0) + n
    rejected = dict(sorted(rejected.items()))
    counters = [s["counters"] for s in shards]
    hist = {}
    for h in _HISTOGRAMS:
        per = [s["histograms"][h] for s in shards]
        hist[h] = ([sum(c) for c in zip(*(p[0] for p in per), strict=True)], sum(p[1] for p in per))
    return {"columns": cols, "ok": ok, **(text if strings else {}), "rejected": rejected, "now_s": now_s,
            "counters": counters, "histograms": hist, "per_replica_histograms": [s["histograms"] for s in shards],
            "timeseries": timeseries, "state": [s["state"] for s in shards],
            "summary": summarize(cols, None, rejected, counters, now_s, ok=ok)}
