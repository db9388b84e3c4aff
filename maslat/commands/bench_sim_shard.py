"""``maslat bench sim``'s main run, replica by replica in worker processes (``sim.shard``).

With a router that decides without looking at the replicas (round robin), the parent draws the whole arrival
stream once (vectorised), the workers (forked, so they inherit the arrays and the imported simulator) take
replicas from a queue and simulate each alone, and the parent merges their outcomes: the same records,
counters and summary as the single world, bit for bit (``tests/test_shard.py``)::

    parent: draw_workload ─► assignment ─► queue of replica indices ──┐
    worker 1: simulate_shard(i) ... ─┐                                │
    worker 2: simulate_shard(j) ... ─┴─► results ─► parent: merge_shards ─► summary, counters
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import queue
import time

from .bench_sim_common import _lengths, _scenario, engine_counters


def _spec(params: dict):
    from sim import PoolSpec, load_profile

    return PoolSpec(name="p", profile=load_profile(params["profile"]), replicas=params["replicas"],
                    router=params["router"])


def shardable(params: dict) -> bool:
    """Whether the pool's router fixes each request's replica in advance (then the replicas run apart)."""
    from sim.routing import make_router, static_assignment

    return static_assignment(make_router(params["router"]), 1, params["replicas"]) is not None


class _Tagged:
    """``queue.put(x)`` as ``results.put((name, x))``: a comparison's ``_scenario`` reports through it."""

    def __init__(self, results, name: str):
        self.results, self.name = results, name

    def put(self, x) -> None:
        self.results.put((self.name, x))


def _worker(spec, who, t, p, o, params: dict, jobs: list, next_task, results) -> None:
    from sim.shard import shard_requests, simulate_shard

    # what the fork inherited is never garbage, and a simulation makes its cycles (world <-> replicas) once:
    # the cyclic collector runs once per task instead of every few hundred allocations (~4 % of the time)
    gc.freeze()
    gc.disable()
    while True:
        with next_task.get_lock():  # a shared counter, not a queue: no feeder thread in the parent
            i = next_task.value
            next_task.value = i + 1
        if i < spec.replicas:
            k = shard_requests(who, i)
            results.put((None, simulate_shard(spec, i, t[k], p[k], o[k], k + 1, seed=params["seed"],
                                              jumps=params["jumps"], strings=False,
                                              force_reference=params.get("force_reference", False))))
        elif i < spec.replicas + len(jobs):
            name, job = jobs[i - spec.replicas]
            _scenario(job, _Tagged(results, name))
        else:
            return
        gc.collect()  # the finished world


def start_sharded(params: dict, workers: int, jobs: dict | None = None) -> tuple:
    """Draw the workload and start ``workers`` forked processes on the replicas, then on ``jobs`` (name ->
    ``_scenario`` parameters: the comparisons, which fill the workers once the replicas are taken, so that
    two cores run two processes); ``collect_sharded`` waits."""
    from sim import PoissonArrivals
    from sim.routing import make_router, static_assignment
    from sim.shard import draw_workload

    t0, cpu0 = time.perf_counter(), time.process_time()
    spec, n = _spec(params), params["requests"]
    who = static_assignment(make_router(spec.router), n, spec.replicas)
    t, p, o = draw_workload(params["seed"], "bench", PoissonArrivals(params["rate"]), _lengths(params), n)
    jobs = list((jobs or {}).items())
    # forked, the workers inherit the arrays and the imported simulator (spawned where fork is missing)
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    next_task, results = ctx.Value("l", 0), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(spec, who, t, p, o, params, jobs, next_task, results))
             for _ in range(max(1, min(workers, spec.replicas + len(jobs))))]
    for proc in procs:
        proc.start()
    return procs, results, spec.replicas, len(jobs), t0, time.process_time() - cpu0


def collect_sharded(handle: tuple) -> dict:
    """The merged outcome, as ``bench_sim_common._scenario`` reports one world: wall seconds from the draw
    to the merged summary, CPU seconds of the draw, the shards and the merge, the largest worker's peak
    RSS, plus ``shards`` (workers, per-replica CPU seconds) and ``jobs`` (name -> the comparison's result)."""
    from sim.shard import merge_shards

    procs, results, replicas, num_jobs, t0, draw_cpu_s = handle
    shards, done = [], {}

    def get():
        while True:
            try:
                return results.get(timeout=1.0)
            except queue.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead:  # a worker failed: its traceback is on stderr; do not wait for ever
                    for p in procs:
                        p.terminate()
                    raise RuntimeError(f"a shard worker exited with status {dead[0]}") from None

    while len(shards) < replicas:  # the comparisons' results may come in between
        name, res = get()
        if name is None:
            shards.append(res)
        else:
            done[name] = res
    cpu0 = time.process_time()
    merged = merge_shards(shards)  # while the workers run the comparisons
    wall = time.perf_counter() - t0
    merge_cpu_s = time.process_time() - cpu0
    while len(done) < num_jobs:
        name, res = get()
        done[name] = res
    for proc in procs:
        proc.join()
    cpu = draw_cpu_s + sum(s["cpu_s"] for s in shards) + merge_cpu_s
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_mb": max(s["peak_rss_mb"] for s in shards), "jobs": done,
            "simulated_s": merged["now_s"], "summary": merged["summary"],
            "counters": engine_counters(merged["counters"], wall),
            "shards": {"workers": len(procs), "replicas": replicas, "draw_cpu_s": draw_cpu_s, "merge_cpu_s": merge_cpu_s,
                       "replica_cpu_s": [round(s["cpu_s"], 3) for s in sorted(shards, key=lambda s: s["replica"])]}}
