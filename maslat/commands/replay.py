"""maslat replay: replay a measured vLLM run through the simulator and compare (the library: ``traces.replay``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import add_json_flag, emit_json, progress
from ._runs import add_skip_flag, fraction, read_runs, skipped_lines

__all__ = ["DESCRIPTION", "HELP", "configure", "run"]

HELP = "replay a measured vLLM run through the simulator and report errors (TTFT/TPOT/E2E, queues)"
DESCRIPTION = """\
Replay a measured run: every request enters the simulation at queued_ts - min(queued_ts) with its
measured lengths, on one replica with the run's engine settings (a data-parallel run: data_parallel_size replicas behind
vLLM's own DP load balancing of the run's release). An engine-side run is replayed with no
frontend overhead and compared engine-side; a client-side run (maslat collect) reaches the engine the
profile's overheads.frontend_s after its send and is compared client-side (send to first/last output chunk).
Reports measured vs simulated mean/p50/p90/p99 of TTFT, TPOT and E2E with the signed error
100*(sim-measured)/measured, the mean absolute error of the running/waiting/KV-usage series (KV as a
fraction; null when the run did not record it), and whether the accuracy bar holds (|error| <= 5 % on
mean/p50/p90; 10 % on the held-out part with --fit-fraction), and the run's recompute preemptions: measured
(vllm:num_preemptions_total gained during a `maslat collect` run, meta.json collector.preemptions; null for
runs that did not record it) against simulated, agreeing within 10 % or 3 preemptions.

--fit-fraction F calibrates on the requests that arrived in the first fraction F of the arrival window
(the profile then only supplies the hardware) and reports errors on the other requests.

examples:
  maslat replay ../shared/traces/vllm/rtx4090-llama-3.1-8b --profile rtx4090-llama-3.1-8b --json
  maslat replay RUN --profile rtxpro6000-llama-3.1-8b --fit-fraction 0.5 --plots plots/
"""


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, help="measured run directory")
    p.add_argument("--profile", required=True, help="profile: embedded name or path to a profile .json")
    p.add_argument("--fit-fraction", type=fraction, default=None,
                   help="calibrate on this first fraction of the arrivals; report errors on the rest")
    p.add_argument("--plots", type=Path, default=None, help="write CDF and queue plots (PNG) into this directory")
    p.add_argument("--seed", type=int, default=0, help="world seed (default 0)")
    p.add_argument("--check", action="store_true", help="exit with status 1 when the accuracy bar fails")
    add_skip_flag(p)
    add_json_flag(p)


def _replay_table(out: dict) -> str:
    rows = [f"{'metric':8s} {'stat':5s} {'measured':>12s} {'simulated':>12s} {'error %':>8s}"]
    for m, stats in out["metrics"].items():
        for s, v in stats.items():
            cells = [f"{'n/a':>{w}s}" if x is None else format(x, f)
                     for x, w, f in ((v["measured"], 12, "12.5g"), (v["simulated"], 12, "12.5g"),
                                     (v["error_pct"], 8, "+8.2f"))]
            rows.append(f"{m:8s} {s:5s} " + " ".join(cells))
    return "\n".join(rows)


def run(args) -> int:
    import sim
    from traces.atomic import output_dir
    from traces.replay import replay_run

    prof = sim.load_profile(args.profile)
    if args.plots is not None:
        output_dir(args.plots, what="--plots")
    run = read_runs([args.run], args.skip_bad_lines)[0]
    with progress(45 if args.fit_fraction else 0, "calibrating", unit="replay") as bar:
        out = replay_run(run, prof, fit_fraction=args.fit_fraction, seed=args.seed, plots_dir=args.plots,
                         progress=bar.update)
    out["profile"] = str(args.profile)
    out["skipped_lines"] = skipped_lines([run])
    out["skipped_examples"] = skipped_lines([run], detail=True)
    part = (f"held-out requests after {out['split_s']:.1f} s ({out['evaluated_requests']})"
            if args.fit_fraction else f"all {out['evaluated_requests']} requests")
    print(f"run {out['run']}  profile {args.profile}  evaluated on {part}")
    print(_replay_table(out))
    print("time-series MAE: " + "  ".join(f"{k} {v if v is None else round(v, 4)}"
                                          for k, v in out["timeseries_mae"].items() if k != "per_engine"))
    for e, mae in out["timeseries_mae"].get("per_engine", {}).items():
        print(f"  engine {e}: " + "  ".join(f"{k} {v if v is None else round(v, 4)}" for k, v in mae.items()))
    dp = out["data_parallel"]
    if dp["data_parallel_size"] > 1:
        print(f"data parallel: {dp['data_parallel_size']} engines behind {dp['router']} "
              f"({dp['api_server_count']} API server(s)), num_gpu_blocks per engine {dp['num_gpu_blocks_per_engine']}")
    pre = out["preemptions"]
    print(f"preemptions (whole run): measured {'not recorded' if pre['measured'] is None else pre['measured']}, "
          f"simulated {pre['simulated']}" + ("" if pre["agree"] is None else
                                             f" ({'agree' if pre['agree'] else 'DISAGREE'}, {pre['tolerance']})"))
    b = out["bar"]
    print(f"accuracy bar |error| <= {b['threshold_pct']:g} % on {'/'.join(b['stats'])}: "
          f"{'PASS' if b['passed'] else 'FAIL'} "
          + (f"(worst {b['worst']} {b['worst_error_pct']:+.2f} %)" if b["worst"] else "(no defined error)")
          + (f"; undefined: {', '.join(b['undefined'])}" if b.get("undefined") else "")
          + (f"; within the DP routing envelope: {', '.join(b['passed_by_routing_envelope'])}"
             if b.get("passed_by_routing_envelope") else ""))
    if "plots" in out:
        print("plots: " + ", ".join(out["plots"].values()))
    if args.json:
        emit_json(out)
    return 1 if args.check and not b["passed"] else 0


