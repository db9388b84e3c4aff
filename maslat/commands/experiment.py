"""maslat experiment lamas|cmdp: the LAMaS paper's protocol, or the system-aware CMDP study, in simulation."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from traces.atomic import output_path, write_text

from ._cmdp import add_cmdp_args, experiment_cmdp
from ._common import add_json_flag, emit_json, progress
from ._mas import add_cluster_args, cluster_from_args, curves_plot, pareto_plot, results_table
from ._ray import add_ray_args, ray_map_from_args

HELP = "reproduce an experiment in simulation: `maslat experiment lamas|cmdp --task gsm8k --seeds 3`"
DESCRIPTION = """\
maslat experiment lamas: LAMaS (arXiv 2601.10560) against MaAS, ablations and static baselines.

For every seed and method: train on the task's train split (4 epochs in file order, more on a small split to
reach 120 Adam steps, e.g. 14 on HumanEval; --epochs 4 is the paper's protocol; batches of 4 run
concurrently, Adam lr 0.01), then run the test split once at concurrency 30 on the simulated cluster with
background load. Methods: lamas (parallel, critical-path credit, lambda_t 0.005, EMA normalisation), maas
(sequential, score - 3 cost, no baseline), lamas_lambda0, lamas_no_cp, lamas_sequential, single_cot,
all_parallel. The table gives mean ± std over seeds of: score %, CP length in tokens exactly as LAMaS
reports it (mean, p90), $ per query at gpt-4o-mini prices, critical-path seconds under contention (mean,
p90) and LLM calls per query; then LAMaS's CP-token and CP-second reductions against MaAS.

maslat experiment cmdp: system-aware orchestration under a latency SLO (MASLatency-CMDP-v0, seed 002).

For every seed: one PPO-Lagrangian policy per load regime (idle, busy, bursty, shift), trained on the train
split with SLOs drawn per episode; the load-blind MasRouter-style router (quality - cost_rate x $); then
every policy (ppo_lagrangian, masrouter, always_large_deepthink, always_small_flash, greedy_fastest and the
lookahead oracle that knows the future load) on the same test queries at every SLO factor, each episode from
the same seeded world. The table gives per regime: quality %, SLO attainment, goodput (correct and within
the SLO), p50/p95 latency, $ per query and calls per query (pooled over SLO factors; mean ± std over seeds).
Plots: goodput against the SLO per regime; the Lagrange multiplier and episodic cost during training.

examples:
  maslat experiment lamas --task gsm8k --seeds 3 --plots out/lamas
  maslat experiment cmdp --task gsm8k --seeds 3 --plots out/cmdp --json
  maslat experiment cmdp --task humaneval --seeds 1 --regimes busy shift --eval-queries 30
  maslat experiment lamas --task humaneval --seeds 1 --methods lamas maas --json
  maslat experiment lamas --task math --load-factors 0.5 2 --json
  maslat experiment cmdp --task gsm8k --seeds 4 --ray            # seeds x regimes as Ray tasks, local cluster
  maslat experiment lamas --seeds 8 --ray ray://head:10001       # on a cluster (maslatency installed there)
"""


def configure(p) -> None:
    p.add_argument("name", choices=("lamas", "cmdp"), help="which experiment")
    p.add_argument("--task", default="gsm8k", help="gsm8k | math | humaneval | mbpp")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds, 0..N-1 (default 3)")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--methods", nargs="+", default=None, help="lamas: subset of methods (default: all)")
    p.add_argument("--policies", nargs="+", default=None, help="cmdp: subset of policies (default: all)")
    p.add_argument("--regimes", nargs="+", default=["idle", "busy", "bursty", "shift"], help="cmdp: load regimes")
    p.add_argument("--eval-queries", type=int, default=60, help="cmdp: test queries per regime and SLO factor")
    p.add_argument("--epochs", type=int, default=None,
                   help="lamas: passes over the train split (default: 4, more on a small split to reach 120 Adam steps)")
    p.add_argument("--load-factors", type=float, nargs="*", default=[],
                   help="also re-test the trained controllers at these multiples of the background rate")
    p.add_argument("--plots", type=Path, help="write the plots here (lamas: pareto.png, curves.png; cmdp: "
                                             "goodput_vs_slo.png, training.png)")
    p.add_argument("--out", type=Path, help="write summary.json here (cmdp: also episodes.csv)")
    add_cluster_args(p)
    add_cmdp_args(p, experiment=True)
    add_ray_args(p)
    add_json_flag(p)


def run(args) -> int:
    with ray_map_from_args(args, f"{args.name} trials") as map_fn:
        args.map_fn = map_fn
        return _run(args)


def _run(args) -> int:
    import torch

    if args.name == "cmdp":
        return experiment_cmdp(args)
    from agents.experiment import episodes_per_seed, run_experiment
    from agents.lamas import METHODS

    if args.out:
        output_path(args.out, (".json",), what="--out")  # checked before hours of work, not after
    torch.set_num_threads(1)
    methods = args.methods or list(METHODS)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    total = episodes_per_seed(args.task, methods, args.epochs, args.load_factors) * len(seeds)
    t0 = time.perf_counter()
    with progress(total, f"lamas experiment ({args.task}, {len(seeds)} seed(s))", unit="episode") as bar:
        res = run_experiment(args.task, seeds, methods, cluster=cluster_from_args(args),
                             load_factors=args.load_factors, epochs=args.epochs, progress=bar.update,
                             map_fn=args.map_fn)
    summary = res.to_json()
    summary["wall_s"] = time.perf_counter() - t0
    print(results_table(summary["methods"]))
    s = summary.get("savings")
    if s:
        print(f"\nLAMaS vs MaAS: CP tokens -{s['cp_tokens_reduction_pct']:.1f} % (± {s['cp_tokens_reduction_pct_std']:.1f}), "
              f"CP seconds -{s['cp_seconds_reduction_pct']:.1f} % (± {s['cp_seconds_reduction_pct_std']:.1f}), "
              f"score {s['score_gap_points']:+.2f} points; {100 * s['seconds_over_tokens']:.0f} % of the token "
              f"saving survives as seconds")
    pub = summary.get("published")
    if pub:
        print(f"paper: LAMaS {pub['lamas']['score_pct']} % / {pub['lamas']['cp_tokens_mean']} tok, MaAS "
              f"{pub['maas']['score_pct']} % / {pub['maas']['cp_tokens_mean']} tok, CP -{pub['cp_reduction_pct']:.1f} %")
    for f, d in summary.get("loads", {}).items():
        sv = d["savings"]
        if sv:
            print(f"background x{f}: CP tokens -{sv['cp_tokens_reduction_pct']:.1f} %, CP seconds "
                  f"-{sv['cp_seconds_reduction_pct']:.1f} %")
    print(f"wall time {summary['wall_s']:.1f} s", file=sys.stderr)
    if args.plots:
        p1 = pareto_plot(summary, args.plots / "pareto.png")
        p2 = curves_plot(res.curves, args.plots / "curves.png")
        print(f"plots: {p1}, {p2}")
    if args.out:
        write_text(args.out, json.dumps(summary, indent=1))
    if args.json:
        emit_json(summary)
    return 0
