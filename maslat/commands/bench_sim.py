"""maslat bench sim: 1,000,000 requests through 8 H100 replicas at 80 % of saturation."""

from __future__ import annotations

import json
import os
import sys
import time

from ._common import add_json_flag, emit_json, format_table
from .bench_sim_common import (
    _collect,
    _cpu_s_all_processes,
    _in_fresh_process,
    _start_fresh_process,
    azure_conv_lengths,
    engine_counters,
    measure_saturation,
)
from .bench_sim_shard import collect_sharded, shardable, start_sharded
from .bench_sim_soak import SOAK_FLAT_MB, SOAK_SAMPLES, _soak, soak_slope

__all__ = ["SOAK_FLAT_MB", "azure_conv_lengths", "configure", "engine_counters", "measure_saturation", "run",
           "soak_slope"]

HELP = "simulator speed: N requests through R replicas at a fraction of saturation, with and without jumps"
DESCRIPTION = """\
Measures the simulator. First the saturation throughput of one replica is measured by simulation (an
overloaded replica, Azure-conv lengths); then --requests Poisson arrivals at --load x saturation x --replicas
run through the cluster with decode-run jumps (the default engine).

With a router that ignores the replicas' state (round robin) the replicas never interact, so the main run is
sharded: the arrivals are drawn once, --workers forked processes simulate one replica at a time, and their
records and counters merge into exactly the single world's (sim.shard; --single-world also runs the single
world, in this invocation, and reports the speed-up and whether the results are identical). The comparisons
then fill the same workers. Other routers (and --workers 0) run the single world in a fresh process, with
the comparisons beside it, one after another, each in its own process.

The comparisons: the first --stepwise-requests of the same arrivals with jumps and step by step (jumps off),
and the first --reference-requests with the literal per-request vLLM algorithm (the reference mode, several
times slower per step, hence the shorter prefix). All must produce identical latency statistics; the gains
are ratios of their wall and CPU times, measured in this run. The engine counters say why the gain is what
it is: step boundaries (one per single step, one per jumped run), jumps, mean steps per jump. ``phases_s``
says where the whole command's time went (with sharding, ``main_s`` includes the comparisons).

A second, smaller scenario (--long-requests, 0 skips it) has long outputs at a light load, where
nothing interrupts the decodes for hundreds of steps: there the jumps pay off.

Defaults are the acceptance scenario: 1,000,000 requests, 8 x h100-llama-3.1-8b, load 0.8, comparison
prefixes of 30,000 (step by step) and 3,000 (reference algorithm) requests.
"""

LONG_PROMPT_TOKENS, LONG_OUTPUT_TOKENS, LONG_RATE_PER_S = 512, 2048, 2.0


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
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="processes simulating the replicas of the main run (default: the CPU count; 0: one "
                        "world in one process, as for a router that looks at the replicas)")
    p.add_argument("--single-world", action="store_true",
                   help="also run the main scenario as one world in one process, after the rest, and report the "
                        "sharded run's speed-up over it and whether their results are identical")
    p.add_argument("--serial", action="store_true",
                   help="run the comparisons after the main run instead of beside it on a second core")
    p.add_argument("--long-requests", type=int, default=300,
                   help=f"requests of the long-output scenario ({LONG_PROMPT_TOKENS}-token prompts, "
                        f"{LONG_OUTPUT_TOKENS}-token outputs, Poisson {LONG_RATE_PER_S} req/s); 0 skips it")
    p.add_argument("--soak", type=int, default=0, metavar="N",
                   help="instead of the comparison: run N requests (records not kept), sample the process's RSS "
                        f"{SOAK_SAMPLES} times and report its slope (MB per million requests); e.g. 10000000")
    add_json_flag(p)


def _identical(a: dict, b: dict) -> bool:
    return all(a["summary"][k] == b["summary"][k] for k in ("ttft_s", "tpot_s", "e2e_s", "engine_steps"))


def _long_params(args) -> dict:
    """The long-output scenario (without ``jumps``): decode runs are long, so jumps replace most steps."""
    return {"profile": args.profile, "replicas": args.replicas, "router": args.router, "seed": args.seed,
            "rate": LONG_RATE_PER_S, "requests": args.long_requests,
            "fixed_lengths": (LONG_PROMPT_TOKENS, LONG_OUTPUT_TOKENS)}


def _long_json(args, fast: dict, step: dict) -> dict:
    return {"scenario": f"{args.long_requests} requests, {args.replicas} x {args.profile}, Poisson at "
                        f"{LONG_RATE_PER_S} req/s, {LONG_PROMPT_TOKENS}-token prompts, {LONG_OUTPUT_TOKENS}-token "
                        f"outputs, router {args.router}",
            "requests": args.long_requests, "wall_s": fast["wall_s"], "stepwise_wall_s": step["wall_s"],
            "jump_speedup": step["wall_s"] / fast["wall_s"], "identical_results": _identical(fast, step),
            "jumps": fast["counters"], "stepwise": step["counters"]}


def _comparison_jobs(args, base: dict) -> dict:
    """name -> scenario parameters of the comparison runs: the stepwise prefix (with jumps unless the prefix
    is the whole run), the reference prefix (fast, then reference), the long outputs (jumps, then stepwise)."""
    jobs = {}
    m = 0 if args.skip_stepwise else min(args.requests, args.stepwise_requests)
    r = 0 if args.skip_stepwise else min(args.requests, args.reference_requests)
    if r:
        jobs["reference"] = {**base, "requests": r, "jumps": False, "force_reference": True}
    if m:
        jobs["stepwise"] = {**base, "requests": m, "jumps": False}
        if m != args.requests:  # else the main run is the jumping side
            jobs["stepwise_jumps"] = {**base, "requests": m, "jumps": True}
    if args.long_requests:
        jobs["long_stepwise"] = {**_long_params(args), "jumps": False}
        jobs["long_jumps"] = {**_long_params(args), "jumps": True}
    if r:
        jobs["reference_fast"] = {**base, "requests": r, "jumps": False}
    return jobs  # longest first (at the defaults), so that the shard workers end together


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


def _single_world_json(fast: dict, single: dict) -> dict:
    """The main run (sharded, or not) against the same scenario as one world in one process."""
    same = json.dumps(fast["summary"], sort_keys=True) == json.dumps(single["summary"], sort_keys=True)
    return {"wall_s": single["wall_s"], "cpu_s": single["cpu_s"], "peak_rss_mb": single["peak_rss_mb"],
            "identical_results": same and fast["counters"]["engine_steps"] == single["counters"]["engine_steps"],
            "speedup": single["wall_s"] / fast["wall_s"], "cpu_ratio": fast["cpu_s"] / single["cpu_s"]}


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
    if "single_world" in out:
        sw = out["single_world"]
        print(f"main run {'sharded' if out['sharded'] else 'as one world'} vs one world in one process: "
              f"{sw['speedup']:.2f}x wall ({out['wall_s']:.2f} s vs {sw['wall_s']:.2f} s; CPU {out['cpu_s']:.2f} s vs "
              f"{sw['cpu_s']:.2f} s, one run); identical results: {sw['identical_results']}")
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
    jobs = _comparison_jobs(args, base)
    print(f"running {args.requests:,} requests with jumps" + (f", and the comparisons ({', '.join(jobs)})"
                                                             if jobs else "") + " ...", file=sys.stderr)
    t_main = time.perf_counter()
    sharded = args.workers > 0 and shardable(base)
    serial = args.serial or "stepwise" in jobs and "stepwise_jumps" not in jobs  # a comparison needs the main run
    if sharded:  # the comparisons fill the same workers (two processes on two cores), unless --serial
        fast = collect_sharded(start_sharded({**base, "jumps": True}, args.workers, None if serial else jobs))
        phases["main_s"] = time.perf_counter() - t_main
        done = fast.pop("jobs")
    else:  # the main run in one process, the comparisons one after another in others (beside it)
        main, fast, done = _start_fresh_process({**base, "jumps": True}), None, {}
        if serial:
            fast = _collect(main)
            phases["main_s"] = time.perf_counter() - t_main
    for name, job in jobs.items():
        if name not in done:
            done[name] = _in_fresh_process(job)
    if fast is None:
        fast = _collect(main)
        phases["main_s"] = time.perf_counter() - t_main
    step = ref = long_out = None
    if "stepwise" in done:
        step = (done.get("stepwise_jumps", fast), done["stepwise"])
        phases["stepwise_s"] = sum(x["wall_s"] for x in step if x is not fast)
    if "reference" in done:
        ref = _reference_json(done["reference_fast"], done["reference"])
        phases["reference_s"] = done["reference_fast"]["wall_s"] + done["reference"]["wall_s"]
    if "long_stepwise" in done:
        long_out = _long_json(args, done["long_jumps"], done["long_stepwise"])
        phases["long_outputs_s"] = done["long_jumps"]["wall_s"] + done["long_stepwise"]["wall_s"]
    single = None
    if args.single_world:
        print(f"running {args.requests:,} requests with jumps as one world ...", file=sys.stderr)
        t0 = time.perf_counter()
        single = _in_fresh_process({**base, "jumps": True})
        phases["single_world_s"] = time.perf_counter() - t0
    out = _main_json(args, sat, rate, fast, step)
    out["sharded"] = fast.get("shards")
    if single is not None:
        out["single_world"] = _single_world_json(fast, single)
    if ref is not None:
        out["reference"] = ref
    if long_out is not None:
        out["long_outputs"] = long_out
    phases["whole_command_s"] = time.perf_counter() - t_start
    out["phases_s"] = phases
    out["whole_command_cpu_s"] = _cpu_s_all_processes()  # steadier than wall time on a shared machine
    out["comparisons_beside_main"] = bool(jobs) and not serial
    _print_table(out)
    print("where the command's time went" + (" (the comparisons ran beside the main run)"
                                             if out["comparisons_beside_main"] else "") + ": "
          + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items()))
    if args.json:
        emit_json(out)
    return 0
