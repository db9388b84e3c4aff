"""maslat bench sim: 1,000,000 requests through 8 H100 replicas at 80 % of saturation."""

from __future__ import annotations

import multiprocessing as mp
import os
import resource
import sys
import time

from ._common import add_json_flag, emit_json, format_table

HELP = "simulator speed: N requests through R replicas at a fraction of saturation, with and without jumps"
DESCRIPTION = """\
Measures the simulator, one simulation per process on one core. First the saturation throughput of one
replica is measured by simulation (an overloaded replica, Azure-conv lengths); then --requests Poisson
arrivals at --load x saturation x --replicas run through the cluster with decode-run jumps (the default
engine), in a fresh process.

While that runs (on the machine's second core; --serial waits for it instead), the comparisons run, each in
its own fresh process: the first --stepwise-requests of the same arrivals with jumps and step by step (jumps
off), and the first --reference-requests with the literal per-request vLLM algorithm (the reference mode,
several times slower per step, hence the shorter prefix). All must produce identical latency statistics; the
gains are ratios of their wall and CPU times, measured in this run. The engine counters say why the gain is
what it is: step boundaries (one per single step, one per jumped run), jumps, mean steps per jump.
``phases_s`` says where the whole command's time went.

A second, smaller scenario (--long-requests, 0 skips it) has long outputs at a light load, where
nothing interrupts the decodes for hundreds of steps: there the jumps pay off.

Defaults are the acceptance scenario: 1,000,000 requests, 8 x h100-llama-3.1-8b, load 0.8. The comparison
prefixes (30,000 step by step, 3,000 with the reference algorithm) are sized so that, together with the
long-output scenario, they finish on the second core well before the main run: the whole command then takes
the saturation measurement plus the main run.
"""

LONG_PROMPT_TOKENS, LONG_OUTPUT_TOKENS, LONG_RATE_PER_S = 512, 2048, 2.0
SOAK_SAMPLES = 50  # RSS samples over a soak (evenly spaced in simulated time)
SOAK_FLAT_MB = 16.0  # growth of the fitted RSS line over the sampled span still called flat


def configure(p) -> None:
    p.add_argument("--requests", type=int, default=1_000_000)
    p.add_argument("--replicas", type=int, default=8)
    p.add_argument("--profile", default="h100-llama-3.1-8b")
    p.add_argument("--load", type=float, default=0.8, help="fraction of measured saturation throughput")
    p.add_argument("--router", default="round_robin")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-stepwise", action="store_true", help="only run the default (jumping) engine")
    p.add_argument("--stepwise-requests", type=int, default=30_000,
                   help="the step-by-step comparison runs on this prefix of the arrivals (default 30,000)")
    p.add_argument("--reference-requests", type=int, default=3_000,
                   help="the reference-algorithm comparison runs on this prefix of the arrivals (default 3,000; "
                        "0 skips it)")
    p.add_argument("--serial", action="store_true",
                   help="run the comparisons after the main run instead of beside it on a second core")
    p.add_argument("--long-requests", type=int, default=300,
                   help=f"requests of the long-output scenario ({LONG_PROMPT_TOKENS}-token prompts, "
                        f"{LONG_OUTPUT_TOKENS}-token outputs, Poisson {LONG_RATE_PER_S} req/s); 0 skips it")
    p.add_argument("--soak", type=int, default=0, metavar="N",
                   help="instead of the comparison: run N requests (records not kept), sample the process's RSS "
                        f"{SOAK_SAMPLES} times and report its slope (MB per million requests); e.g. 10000000")
    add_json_flag(p)


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


def engine_counters(world, wall_s: float) -> dict:
    """Steps, step boundaries and jumps summed over the replicas, and the wall time per step and boundary.

    A boundary is one engine ``begin``/``complete`` pair (one SimPy event): a single step, or a decode run
    of ``k`` steps jumped in closed form.
    """
    cores = [r.core for r in world.replicas]
    steps = sum(c.num_steps for c in cores)
    jumps = sum(c.num_jumps for c in cores)
    jumped = sum(c.num_jumped_steps for c in cores)
    boundaries = steps - jumped + jumps
    return {"engine_steps": steps, "step_boundaries": boundaries, "jumps": jumps, "jumped_steps": jumped,
            "jumped_step_fraction": jumped / steps if steps else 0.0,
            "mean_steps_per_jump": jumped / jumps if jumps else 0.0,
            "truncated_jumps": sum(c.num_truncated_jumps for c in cores),
            "us_per_step": 1e6 * wall_s / steps if steps else float("nan"),
            "us_per_boundary": 1e6 * wall_s / boundaries if boundaries else float("nan")}


def _scenario(params: dict, queue) -> None:
    from sim import PoissonArrivals, PoolSpec, Workload, load_profile, make_world
    from sim.summary import latency_summary

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
               "simulated_s": world.now, "summary": s, "counters": engine_counters(world, wall)})


def _cpu_s_all_processes() -> float:
    """User + system CPU seconds of this process and its finished children (the scenario processes)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


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


def _start_fresh_process(params: dict, target=_scenario) -> tuple:
    """Start ``target(params, queue)`` in a fresh (spawned) process; ``_collect`` waits for its result."""
    ctx = mp.get_context("spawn")
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


def _identical(a: dict, b: dict) -> bool:
    return all(a["summary"][k] == b["summary"][k] for k in ("ttft_s", "tpot_s", "e2e_s", "engine_steps"))


def _long_outputs(args) -> dict:
    """The long-output scenario, both engines: decode runs are long, so jumps replace most steps."""
    params = {"profile": args.profile, "replicas": args.replicas, "router": args.router, "seed": args.seed,
              "rate": LONG_RATE_PER_S, "requests": args.long_requests,
              "fixed_lengths": (LONG_PROMPT_TOKENS, LONG_OUTPUT_TOKENS)}
    print(f"running {args.long_requests:,} long-output requests with jumps, then step by step ...", file=sys.stderr)
    fast = _in_fresh_process({**params, "jumps": True})
    step = _in_fresh_process({**params, "jumps": False})
    return {"scenario": f"{args.long_requests} requests, {args.replicas} x {args.profile}, Poisson at "
                        f"{LONG_RATE_PER_S} req/s, {LONG_PROMPT_TOKENS}-token prompts, {LONG_OUTPUT_TOKENS}-token "
                        f"outputs, router {args.router}",
            "requests": args.long_requests, "wall_s": fast["wall_s"], "stepwise_wall_s": step["wall_s"],
            "jump_speedup": step["wall_s"] / fast["wall_s"], "identical_results": _identical(fast, step),
            "jumps": fast["counters"], "stepwise": step["counters"]}


def _main_json(args, sat: float, rate: float, fast: dict, step: dict | None) -> dict:
    n = fast["summary"]["finished"]
    out = {
        "scenario": f"{args.requests} requests, {args.replicas} x {args.profile}, Poisson at {args.load:.0%} of "
                    f"saturation ({rate:.2f} req/s), Azure-conv lengths, router {args.router}",
        "requests": args.requests,
        "finished": n,
        "saturation_req_per_s_per_replica": sat,
        "offered_rate_req_per_s": rate,
        "wall_s": fast["wall_s"],
        "cpu_s": fast["cpu_s"],
        "requests_per_s": args.requests / fast["wall_s"],
        "sim_s_per_wall_s": fast["simulated_s"] / fast["wall_s"],
        "peak_rss_mb": fast["peak_rss_mb"],
        "simulated_s": fast["simulated_s"],
        "engine_steps": fast["summary"]["engine_steps"],
        "latency": {k: fast["summary"][k] for k in ("ttft_s", "tpot_s", "e2e_s")},
        "jumps": fast["counters"],
    }
    if step is not None:
        sub, step = step
        m = sub["summary"]["finished"]
        out["stepwise"] = {"requests": m, "wall_s": step["wall_s"], "cpu_s": step["cpu_s"],
                           "jumps_wall_s": sub["wall_s"], "requests_per_s": m / step["wall_s"],
                           "sim_s_per_wall_s": step["simulated_s"] / step["wall_s"],
                           "peak_rss_mb": step["peak_rss_mb"], "identical_results": _identical(sub, step),
                           "engine_steps": step["summary"]["engine_steps"],
                           "us_per_step": step["counters"]["us_per_step"]}
        out["jump_speedup"] = step["wall_s"] / sub["wall_s"]
        out["jump_speedup_cpu"] = step["cpu_s"] / sub["cpu_s"]   # steadier than wall time on a shared machine
        out["stepwise"]["jumps_cpu_s"] = sub["cpu_s"]
    return out


def _reference_json(fast: dict, ref: dict) -> dict:
    """The fast engine (jumps off) against the literal per-request algorithm on the same prefix."""
    return {"requests": ref["summary"]["finished"], "wall_s": ref["wall_s"], "cpu_s": ref["cpu_s"],
            "fast_wall_s": fast["wall_s"], "fast_cpu_s": fast["cpu_s"], "identical_results": _identical(fast, ref),
            "fast_speedup": ref["wall_s"] / fast["wall_s"], "fast_speedup_cpu": ref["cpu_s"] / fast["cpu_s"],
            "engine_steps": ref["summary"]["engine_steps"], "us_per_step": ref["counters"]["us_per_step"]}


def _print_table(out: dict) -> None:
    j = out["jumps"]
    rows = [["with jumps", out["wall_s"], out["requests_per_s"], out["sim_s_per_wall_s"], out["peak_rss_mb"],
             j["step_boundaries"], j["us_per_boundary"]]]
    if "stepwise" in out:
        s = out["stepwise"]
        rows.append([f"step by step (first {s['requests']:,})", s["wall_s"], s["requests_per_s"], s["sim_s_per_wall_s"],
                     s["peak_rss_mb"], s["engine_steps"], s["us_per_step"]])
    print(out["scenario"])
    print(format_table(rows, ["engine", "wall_s", "requests/s", "sim_s/wall_s", "peak_rss_mb", "boundaries",
                              "us/boundary"]))
    print(f"{out['engine_steps']:,} engine steps; {j['jumps']:,} jumps cover {j['jumped_step_fraction']:.0%} of "
          f"them, {j['mean_steps_per_jump']:.2f} steps per jump")
    if "stepwise" in out:
        s = out["stepwise"]
        print(f"jump speed-up on the first {s['requests']:,} requests {out['jump_speedup']:.2f}x wall "
              f"({out['jump_speedup_cpu']:.2f}x CPU; {s['jumps_wall_s']:.2f} s with jumps, {s['wall_s']:.2f} s step by "
              f"step, one run); identical results: {s['identical_results']}")
    if "reference" in out:
        rf = out["reference"]
        print(f"step by step vs the reference algorithm on the first {rf['requests']:,} requests: "
              f"{rf['fast_speedup']:.1f}x wall ({rf['fast_speedup_cpu']:.1f}x CPU; {rf['fast_wall_s']:.2f} s vs "
              f"{rf['wall_s']:.2f} s, one run); identical results: {rf['identical_results']}")
    if "long_outputs" in out:
        lo = out["long_outputs"]
        print(f"{lo['scenario']}: {lo['wall_s']:.2f} s with jumps, {lo['stepwise_wall_s']:.2f} s step by step "
              f"({lo['jump_speedup']:.1f}x, {lo['jumps']['mean_steps_per_jump']:.0f} steps per jump); identical "
              f"results: {lo['identical_results']}")


def run(args) -> int:
    if (args.requests < 1 or args.replicas < 1 or not 0 < args.load or args.long_requests < 0
            or args.stepwise_requests < 0 or args.reference_requests < 0 or args.soak < 0):
        raise ValueError("--requests and --replicas must be >= 1, --load > 0, --long-requests, "
                         "--stepwise-requests, --reference-requests and --soak >= 0")
    if args.soak:
        return _soak(args)
    t_start = time.perf_counter()
    phases = {}
    print(f"measuring saturation of one {args.profile} replica with Azure-conv lengths ...", file=sys.stderr)
    lengths = azure_conv_lengths()
    sat = measure_saturation(args.profile, args.seed, length_arrays=lengths)
    phases["saturation_s"] = time.perf_counter() - t_start
    rate = args.load * sat * args.replicas
    print(f"saturation {sat:.2f} req/s per replica; offering {rate:.2f} req/s to {args.replicas} replicas",
          file=sys.stderr)
    base = {"profile": args.profile, "replicas": args.replicas, "router": args.router, "seed": args.seed,
            "rate": rate, "requests": args.requests, "length_arrays": lengths}
    print(f"running {args.requests:,} requests with jumps ...", file=sys.stderr)
    t_main = time.perf_counter()
    main = _start_fresh_process({**base, "jumps": True})
    fast = None
    m = 0 if args.skip_stepwise else min(args.requests, args.stepwise_requests)
    if args.serial or m == args.requests:  # the comparison needs the main run's result, or --serial
        fast = _collect(main)
        phases["main_s"] = time.perf_counter() - t_main
    step = ref = None
    if m:
        print(f"running the first {m:,} requests with jumps, then step by step ...", file=sys.stderr)
        t0 = time.perf_counter()
        sub = fast if m == args.requests else _in_fresh_process({**base, "requests": m, "jumps": True})
        step = (sub, _in_fresh_process({**base, "requests": m, "jumps": False}))
        phases["stepwise_s"] = time.perf_counter() - t0
    r = 0 if args.skip_stepwise else min(args.requests, args.reference_requests)
    if r:
        print(f"running the first {r:,} requests step by step, then with the reference algorithm ...",
              file=sys.stderr)
        t0 = time.perf_counter()
        ref = _reference_json(_in_fresh_process({**base, "requests": r, "jumps": False}),
                              _in_fresh_process({**base, "requests": r, "jumps": False, "force_reference": True}))
        phases["reference_s"] = time.perf_counter() - t0
    long_out = None
    if args.long_requests:
        t0 = time.perf_counter()
        long_out = _long_outputs(args)
        phases["long_outputs_s"] = time.perf_counter() - t0
    if fast is None:
        fast = _collect(main)
        phases["main_s"] = time.perf_counter() - t_main
    out = _main_json(args, sat, rate, fast, step)
    if ref is not None:
        out["reference"] = ref
    if long_out is not None:
        out["long_outputs"] = long_out
    phases["whole_command_s"] = time.perf_counter() - t_start
    out["phases_s"] = phases
    out["whole_command_cpu_s"] = _cpu_s_all_processes()  # steadier than wall time on a shared machine
    out["comparisons_beside_main"] = not args.serial and m != args.requests
    _print_table(out)
    print("where the command's time went" + (" (the comparisons ran beside the main run)"
                                             if out["comparisons_beside_main"] else "") + ": "
          + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items()))
    if args.json:
        emit_json(out)
    return 0
