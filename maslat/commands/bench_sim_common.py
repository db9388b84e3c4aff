"""What the ``maslat bench sim`` scenarios share: the Azure-conv lengths, the saturation measurement, the
engine counters, one scenario in a fresh process."""

from __future__ import annotations

import multiprocessing as mp
import resource
import time


def azure_conv_lengths() -> tuple:
    """The Azure-conv (prompt, output) arrays, read once by the command and handed to every scenario process
    (parsing the CSV's timestamps costs more than passing the arrays)."""
    from traces.azure import azure_trace

    tr = azure_trace("conv")
    return tr.prompt_tokens, tr.output_tokens


def _lengths(params: dict | None = None):
    from sim import EmpiricalLengths, FixedLengths

    if params is not None and params.get("fixed_lengths"):
        return FixedLengths(*params["fixed_lengths"])
    arrays = params.get("length_arrays") if params is not None else None
    return EmpiricalLengths(*(arrays if arrays is not None else azure_conv_lengths()))


def measure_saturation(profile_name: str, seed: int, n: int = 4000, length_arrays: tuple | None = None) -> float:
    """Requests/s one replica completes when overloaded (middle 80 % of completions)."""
    import numpy as np

    from sim import PoissonArrivals, PoolSpec, Workload, load_profile, make_world

    world = make_world(PoolSpec(name="p", profile=load_profile(profile_name)), seed=seed, sample_interval_s=None)
    Workload(pool="p", arrivals=PoissonArrivals(1000.0), lengths=_lengths({"length_arrays": length_arrays}),
             num_requests=n, name="sat").start(world)
    world.run_until_idle()
    done = np.sort(world.records.columns()["last_token_s"])
    lo, hi = int(0.1 * n), int(0.9 * n)
    return (hi - lo) / (done[hi] - done[lo])


def engine_counters(counters: list[dict], wall_s: float) -> dict:
    """Steps, step boundaries and jumps summed over the replicas (``sim.summary.core_counters`` of each), and
    the wall time per step and boundary.

    A boundary is one engine ``begin``/``complete`` pair (one SimPy event): a single step, or a decode run
    of ``k`` steps jumped in closed form.
    """
    steps = sum(c["num_steps"] for c in counters)
    jumps = sum(c["num_jumps"] for c in counters)
    jumped = sum(c["num_jumped_steps"] for c in counters)
    boundaries = steps - jumped + jumps
    return {"engine_steps": steps, "step_boundaries": boundaries, "jumps": jumps, "jumped_steps": jumped,
            "jumped_step_fraction": jumped / steps if steps else 0.0,
            "mean_steps_per_jump": jumped / jumps if jumps else 0.0,
            "truncated_jumps": sum(c["num_truncated_jumps"] for c in counters),
            "us_per_step": 1e6 * wall_s / steps if steps else float("nan"),
            "us_per_boundary": 1e6 * wall_s / boundaries if boundaries else float("nan")}


def _scenario(params: dict, queue) -> None:
    from sim import PoissonArrivals, PoolSpec, Workload, load_profile, make_world
    from sim.summary import core_counters, latency_summary

    world = make_world(PoolSpec(name="p", profile=load_profile(params["profile"]), replicas=params["replicas"],
                                router=params["router"]), seed=params["seed"], jumps=params["jumps"],
                       force_reference=params.get("force_reference", False))
    Workload(pool="p", arrivals=PoissonArrivals(params["rate"]), lengths=_lengths(params),
             num_requests=params["requests"], name="bench").start(world)
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    world.run_until_idle()
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    s = latency_summary(world)
    queue.put({"wall_s": wall, "cpu_s": cpu, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "simulated_s": world.now, "summary": s, "counters": engine_counters([core_counters(r.core) for r in world.replicas], wall)})


def _cpu_s_all_processes() -> float:
    """User + system CPU seconds of this process and its finished children (the scenario processes)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _start_fresh_process(params: dict, target=_scenario) -> tuple:
    """Start ``target(params, queue)`` in a fresh process; ``_collect`` waits for its result. Forked where the
    platform can (the child inherits the imported simulator instead of importing it again: ~0.5 CPU seconds
    per process), spawned elsewhere."""
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=target, args=(params, q))
    proc.start()
    return proc, q


def _collect(handle: tuple) -> dict:
    proc, q = handle
    out = q.get()
    proc.join()
    return out


def _in_fresh_process(params: dict, target=_scenario) -> dict:
    return _collect(_start_fresh_process(params, target))
