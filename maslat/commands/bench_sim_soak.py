"""``maslat bench sim --soak N``: N requests with no records kept, the process's RSS sampled; is it flat?"""

from __future__ import annotations

import os
import resource
import sys
import time

from ._common import emit_json, format_table
from .bench_sim_common import _in_fresh_process, _lengths, azure_conv_lengths, measure_saturation

SOAK_SAMPLES = 50  # RSS samples over a soak (evenly spaced in simulated time)
SOAK_FLAT_MB = 16.0  # growth of the fitted RSS line over the sampled span still called flat


def _rss_mb() -> float:
    """Resident set size now (``/proc/self/statm``); the peak where ``/proc`` is missing."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _soak_scenario(params: dict, queue) -> None:
    """N requests with no per-request records and no time series kept: what is left should not grow."""
    from sim import PoissonArrivals, PoolSpec, Workload, load_profile, make_world

    world = make_world(PoolSpec(name="p", profile=load_profile(params["profile"]), replicas=params["replicas"],
                                router=params["router"]), seed=params["seed"], sample_interval_s=None,
                       keep_records=False)
    n = params["requests"]
    Workload(pool="p", arrivals=PoissonArrivals(params["rate"]), lengths=_lengths(params), num_requests=n,
             name="bench").start(world)
    samples = [(0, _rss_mb())]
    interval = n / params["rate"] / SOAK_SAMPLES

    def sample(tick) -> None:
        samples.append((world.num_finished, _rss_mb()))
        if world.num_finished + world.num_rejected < n:
            world.env.call_again(tick, world.now + interval)

    world.env.call_at(interval, sample)
    t0 = time.perf_counter()
    world.run_until_idle()
    wall = time.perf_counter() - t0
    samples.append((world.num_finished, _rss_mb()))
    queue.put({"wall_s": wall, "finished": world.num_finished, "samples": samples, "simulated_s": world.now,
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def soak_slope(samples: list[tuple[int, float]], n: int) -> dict:
    """Least-squares RSS slope over the samples after the first 20 % of requests (the warm-up fills the
    queues, free lists and caches), in MB per million finished requests, and whether it is flat."""
    import numpy as np

    x = np.array([f for f, _ in samples], float)
    y = np.array([m for _, m in samples], float)
    keep = x >= 0.2 * n
    if keep.sum() < 3:
        return {"slope_mb_per_million": float("nan"), "growth_mb": float("nan"), "flat": False}
    slope = float(np.polyfit(x[keep] / 1e6, y[keep], 1)[0])
    growth = slope * (x[keep].max() - x[keep].min()) / 1e6
    return {"slope_mb_per_million": slope, "growth_mb": growth, "flat": bool(growth <= SOAK_FLAT_MB),
            "rss_after_warmup_mb": float(y[keep][0]), "rss_end_mb": float(y[-1])}


def _soak(args) -> int:
    lengths = azure_conv_lengths()
    print(f"measuring saturation of one {args.profile} replica with Azure-conv lengths ...", file=sys.stderr)
    sat = measure_saturation(args.profile, args.seed, length_arrays=lengths)
    rate = args.load * sat * args.replicas
    print(f"soak: {args.soak:,} requests at {rate:.2f} req/s, sampling RSS ...", file=sys.stderr)
    res = _in_fresh_process({"profile": args.profile, "replicas": args.replicas, "router": args.router,
                             "seed": args.seed, "rate": rate, "requests": args.soak, "length_arrays": lengths},
                            _soak_scenario)
    out = {"soak_requests": args.soak, "finished": res["finished"], "wall_s": res["wall_s"],
           "requests_per_s": res["finished"] / res["wall_s"], "peak_rss_mb": res["peak_rss_mb"],
           "simulated_s": res["simulated_s"], **soak_slope(res["samples"], args.soak),
           "rss_samples": [[f, round(m, 2)] for f, m in res["samples"]]}
    print(format_table([[args.soak, out["wall_s"], out["peak_rss_mb"], out["rss_after_warmup_mb"], out["rss_end_mb"],
                         out["slope_mb_per_million"], out["flat"]]],
                       ["requests", "wall_s", "peak_rss_mb", "rss_after_warmup_mb", "rss_end_mb", "MB/M requests",
                        "flat"]))
    if args.json:
        emit_json(out)
    return 0
