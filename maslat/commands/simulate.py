"""maslat simulate: run one pool of replicas under Poisson/bursty load or a replayed arrival trace."""

from __future__ import annotations

import time
from pathlib import Path

from ._common import add_json_flag, emit_json, format_table, progress

HELP = "simulate a pool of replicas under generated or replayed load and print latency statistics"
DESCRIPTION = """\
Simulate N replicas of a serving profile behind a router.

Load is Poisson (default) or bursty gamma arrivals at --rate requests/s for --duration simulated
seconds, with prompt/output lengths sampled from the Azure 2023 conversation trace (or fixed with
--prompt-tokens/--output-tokens). --trace replays an Azure-format CSV (arrival times and lengths).

Latencies follow the vLLM run format: TTFT = first token - queued, TPOT = decode time / (outputs - 1),
E2E = last token - queued.

examples:
  maslat simulate --profile h100-llama-3.1-8b --replicas 2 --rate 20 --duration 120
  maslat simulate --trace ../shared/traces/azure2023/AzureLLMInferenceTrace_code.csv --replicas 4 --json
"""


def configure(p) -> None:
    p.add_argument("--profile", default="h100-llama-3.1-8b", help="embedded profile name or path to a profile JSON")
    p.add_argument("--replicas", type=int, default=1, help="replicas in the pool (default 1)")
    p.add_argument("--router", default="round_robin", help="round_robin | least_outstanding | least_kv")
    p.add_argument("--rate", type=float, default=10.0, help="mean arrival rate, requests/s (default 10)")
    p.add_argument("--burst-cv", type=float, default=None,
                   help="gamma arrivals with this coefficient of variation instead of Poisson")
    p.add_argument("--duration", type=float, default=60.0, help="simulated seconds of arrivals (default 60)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trace", type=Path, help="replay an Azure-format CSV (TIMESTAMP,ContextTokens,GeneratedTokens)")
    p.add_argument("--time-scale", type=float, default=1.0, help="stretch (>1) or compress (<1) trace arrival gaps")
    p.add_argument("--prompt-tokens", type=int, help="fixed prompt length instead of Azure-conv lengths")
    p.add_argument("--output-tokens", type=int, help="fixed output length instead of Azure-conv lengths")
    p.add_argument("--no-prefix-caching", action="store_true", help="turn vLLM's prefix cache off")
    p.add_argument("--records", type=Path, help="write per-request records (.csv, .parquet, .jsonl or .json)")
    p.add_argument("--timeseries", type=Path, help="write the sampled gauges (.csv, .parquet, .jsonl or .json)")
    p.add_argument("--plots", type=Path, help="write latency CDFs and queue time-series plots (PNG) here")
    add_json_flag(p)


#: table formats --records / --timeseries write, by suffix (any other suffix is refused, never silently CSV)
TABLE_SUFFIXES = (".csv", ".parquet", ".jsonl", ".json")


def _write(df, path: Path) -> None:
    """Write a table in the format its suffix names, atomically (``traces.atomic``)."""
    from traces.atomic import atomic_open

    suffix = path.suffix.lower()
    with atomic_open(path, "wb" if suffix == ".parquet" else "w", newline="" if suffix == ".csv" else None) as f:
        if suffix == ".parquet":
            df.to_parquet(f, index=False)
        elif suffix == ".csv":
            df.to_csv(f, index=False)
        else:  # one JSON object per row (.jsonl) or one JSON array of them (.json)
            df.to_json(f, orient="records", lines=suffix == ".jsonl", date_format="iso")


def _workload(args):
    import numpy as np

    from sim import EmpiricalLengths, FixedLengths, GammaArrivals, PoissonArrivals, TraceArrivals, Workload

    if args.trace:
        from traces.azure import read_azure_trace

        tr = read_azure_trace(args.trace)
        keep = (tr.prompt_tokens >= 1) & (tr.output_tokens >= 1)
        wl = Workload(pool="pool", arrivals=TraceArrivals(tr.offsets_s[keep], time_scale=args.time_scale),
                      prompt_tokens=tr.prompt_tokens[keep], output_tokens=tr.output_tokens[keep],
                      until_s=args.duration if args.duration else None, name="trace")
        return wl, int((~keep).sum())
    if (args.prompt_tokens is None) != (args.output_tokens is None):
        raise ValueError("give both --prompt-tokens and --output-tokens, or neither")
    if args.prompt_tokens is not None:
        lengths = FixedLengths(args.prompt_tokens, args.output_tokens)
    else:
        from traces.azure import azure_trace

        tr = azure_trace("conv")
        lengths = EmpiricalLengths(tr.prompt_tokens, tr.output_tokens)
    arr = GammaArrivals(args.rate, args.burst_cv) if args.burst_cv else PoissonArrivals(args.rate)
    del np
    return Workload(pool="pool", arrivals=arr, lengths=lengths, until_s=args.duration, name="load"), 0


def run(args) -> int:
    from sim import PoolSpec, load_profile, make_world
    from sim.summary import latency_summary
    from traces.atomic import output_dir, output_path

    if args.replicas < 1:
        raise ValueError("--replicas must be >= 1")
    for what in ("records", "timeseries"):  # checked before the simulation, not after
        if getattr(args, what):
            output_path(getattr(args, what), TABLE_SUFFIXES, what=f"--{what}")
    if getattr(args, "plots", None):
        output_dir(args.plots, what="--plots")
    prof = load_profile(args.profile)
    if args.no_prefix_caching:
        from dataclasses import replace

        prof = prof.replace(engine=replace(prof.engine, enable_prefix_caching=False))
    world = make_world(PoolSpec(name="pool", profile=prof, replicas=args.replicas, router=args.router), seed=args.seed)
    wl, dropped = _workload(args)
    wl.start(world)
    t0 = time.perf_counter()
    bar = progress(args.duration if not args.trace else None, "simulated s", unit="s")
    step = max(1.0, (args.duration or 60) / 200)
    while world.active_sources or world.num_finished + sum(world.rejected.values()) < world.num_submitted:
        world.run(until=world.now + step)
        bar.update(min(step, max(0.0, (args.duration or 0) - bar.n)) if args.duration else step)
    bar.close()
    wall = time.perf_counter() - t0
    s = latency_summary(world)
    rows = [[m, s[m]["mean"], s[m]["p50"], s[m]["p90"], s[m]["p99"]] for m in ("ttft_s", "tpot_s", "e2e_s", "queue_s")]
    print(f"profile {prof.name}  replicas {args.replicas}  router {args.router}  seed {args.seed}")
    print(format_table(rows, ["metric", "mean", "p50", "p90", "p99"]))
    print(f"finished {s['finished']}  rejected {sum(s['rejected'].values())} {s['rejected'] or ''}  "
          f"throughput {s['throughput_req_per_s']:.3f} req/s ({s['output_tokens_per_s']:.0f} output tok/s)  "
          f"preemptions {s['preemptions']}  simulated {s['simulated_s']:.1f} s in {wall:.2f} s wall")
    if dropped:
        print(f"note: {dropped} trace rows with a zero prompt or output length were not submitted")
    if args.records:
        _write(world.records.to_dataframe(), args.records)
    if args.timeseries:
        _write(world.timeseries.to_dataframe(), args.timeseries)
    if getattr(args, "plots", None):
        from maslat.plots import latency_cdfs, queue_timeseries

        title = f"{prof.name} x {args.replicas} ({args.router})"
        latency_cdfs(world.records.to_dataframe(), args.plots / "latency_cdf.png", title)
        queue_timeseries(world.timeseries.to_dataframe(), args.plots / "queues.png", title)
        print(f"plots written to {args.plots}/")
    if args.json:
        emit_json({"profile": prof.name, "replicas": args.replicas, "router": args.router, "seed": args.seed,
                   "wall_s": wall, "dropped_trace_rows": dropped, **s})
    return 0
