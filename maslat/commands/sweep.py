"""maslat sweep: a Ray Tune grid over simulator settings, one seeded simulation per point."""

from __future__ import annotations

import sys
import time

from ._common import add_json_flag, emit_json, format_table
from ._ray import add_ray_args, ray_map_from_args

HELP = "a grid over simulator settings (Ray Tune): `maslat sweep --param max_num_seqs=64,128 --param rate=5,10`"
DESCRIPTION = """\
Simulate one pool of replicas at every point of a grid over engine settings (any scalar field of the
profile's engine: max_num_seqs, max_num_batched_tokens, num_gpu_blocks, enable_prefix_caching, ...) and
pool/load settings (replicas, router, rate, burst_cv, duration, seed, prompt_tokens, output_tokens). Each point
is a pure, seeded simulation, so the table is the same bit for bit however the points were scheduled:
the points run as a Ray Tune grid (tune.grid_search) on a local Ray cluster, or on the cluster at --ray
ADDRESS; --serial runs them in this process instead (no Ray needed). Rows are in grid order, the first
--param varying slowest. A point that fails after --ray-retries retries fails the command, naming it.

examples:
  maslat sweep --param max_num_seqs=64,128,256 --param rate=10,20 --duration 60
  maslat sweep --profile h100-llama-3.1-8b --param replicas=1,2 --param router=round_robin,least_kv --json
  maslat sweep --param max_num_batched_tokens=1024,2048 --serial
"""


def configure(p) -> None:
    p.add_argument("--param", action="append", required=True, metavar="NAME=V1,V2",
                   help="a setting and its values (repeatable; the grid is every combination)")
    p.add_argument("--profile", default="h100-llama-3.1-8b", help="embedded profile name or path to a profile JSON")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--router", default="round_robin", help="round_robin | least_outstanding | least_kv")
    p.add_argument("--rate", type=float, default=10.0, help="mean arrival rate, requests/s (default 10)")
    p.add_argument("--burst-cv", type=float, default=None, help="gamma arrivals with this CV instead of Poisson")
    p.add_argument("--duration", type=float, default=60.0, help="simulated seconds of arrivals (default 60)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt-tokens", type=int, help="fixed prompt length instead of Azure-conv lengths")
    p.add_argument("--output-tokens", type=int, help="fixed output length instead of Azure-conv lengths")
    p.add_argument("--serial", action="store_true", help="run the points in this process instead of Ray Tune")
    add_ray_args(p, required=True)
    add_json_flag(p)


def run(args) -> int:
    from maslat.sweep import METRICS, grid, parse_param, serial_grid, tune_grid

    params: dict = {}
    for text in args.param:
        name, values = parse_param(text)
        if name in params:
            raise ValueError(f"--param {name} given twice; put all its values in one --param {name}=V1,V2")
        params[name] = values
    base = {"profile": args.profile, "replicas": args.replicas, "router": args.router, "rate": args.rate,
            "burst_cv": args.burst_cv, "duration": args.duration, "seed": args.seed,
            "prompt_tokens": args.prompt_tokens, "output_tokens": args.output_tokens}
    t0 = time.perf_counter()
    if args.serial:
        rows = serial_grid(base, grid(params))
    else:
        with ray_map_from_args(args, "sweep"):
            rows = tune_grid(base, params, max_failures=args.ray_retries)
    wall = time.perf_counter() - t0
    shown = ("ttft_s_p50", "ttft_s_p90", "tpot_s_p50", "e2e_s_p90", "throughput_req_per_s", "preemptions", "rejected")
    print(format_table([[r[k] for k in params] + [r[m] for m in shown] for r in rows], [*params, *shown]))
    print(f"{len(rows)} point(s) in {wall:.1f} s wall ({'serial' if args.serial else 'Ray Tune'})", file=sys.stderr)
    if args.json:
        emit_json({"base": base, "params": params, "metrics": list(METRICS), "rows": rows, "wall_s": wall})
    return 0
