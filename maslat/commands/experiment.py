"""maslat experiment lamas|cmdp: the LAMaS paper's protocol, or the system-aware CMDP study, in simulation."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from traces.atomic import atomic_open, output_path, write_text

from ._common import add_json_flag, emit_json, progress
from ._options import add_dataclass_options, dataclass_kwargs
from ._ray import add_ray_args, ray_map_from_args

HELP = "reproduce an experiment in simulation: `maslat experiment lamas|cmdp|apwa --task gsm8k --seeds 3`"
DESCRIPTION = """\
maslat experiment lamas: LAMaS (arXiv 2601.10560) against MaAS, ablations and static baselines.
maslat experiment cmdp: system-aware orchestration under a latency SLO (MASLatency-CMDP-v0).
maslat experiment apwa: APWA against a centralised agent, a sequential chain and a width-4 map over N rows.
`maslat experiment lamas|cmdp|apwa --help` lists each one's options.

examples:
  maslat experiment lamas --task gsm8k --seeds 3 --plots out/lamas
  maslat experiment cmdp --task gsm8k --seeds 3 --plots out/cmdp --json
  maslat experiment cmdp --task humaneval --seeds 1 --regimes busy shift --eval-queries 30
  maslat experiment lamas --task humaneval --seeds 1 --methods lamas maas --json
  maslat experiment lamas --task math --load-factors 0.5 2 --json
  maslat experiment apwa --items 10,30,100,300 --json --plots out/apwa
  maslat experiment cmdp --task gsm8k --seeds 4 --ray            # seeds x regimes as Ray tasks, local cluster
  maslat experiment lamas --seeds 8 --ray ray://head:10001       # on a cluster (maslatency installed there)
"""
LAMAS_DESCRIPTION = """\
For every seed and method: train on the task's train split (4 epochs in file order, more on a small split to
reach 240 Adam steps, e.g. 27 on HumanEval, lambda_t 0.01 and a per-query baseline; --protocol paper is
LAMaS's own: 4 epochs, lambda_t 0.005, no per-query baseline; batches of 4 run concurrently, Adam lr 0.01),
then run the test split --test-repeats times (avg@K, default 8) at concurrency 30 on the simulated cluster
with background load, each run with fresh LLM outcomes, background and sampling (the same K runs' outcomes for
every method), and take the means: a seed's figures are avg@K. The table gives mean ± std over seeds of: score %, CP length in tokens exactly as LAMaS reports it (mean, p90), $ per
query at gpt-4o-mini prices, critical-path seconds under contention (mean, p90) and LLM calls per query;
then LAMaS's CP-token and CP-second reductions against MaAS.
"""
CMDP_DESCRIPTION = """\
For every seed: one PPO-Lagrangian policy per load regime, trained on the train split with SLOs drawn per
episode; the load-blind MasRouter-style router (quality - cost_rate x $); then every policy (ppo_lagrangian,
masrouter, the fixed rules and the lookahead oracle that knows the future load) on the same test queries at
every SLO factor, each episode from the same seeded world. The table gives per regime: quality %, SLO
attainment, goodput (correct and within the SLO), p50/p95 latency, $ per query and calls per query (pooled over
SLO factors; mean ± std over seeds). Plots: goodput against the SLO per regime; the Lagrange multiplier and
episodic cost during training.
"""


def _underscored(text: str) -> str:
    return text.replace("-", "_")


def configure(p) -> None:
    sub = p.add_subparsers(dest="name", metavar="EXPERIMENT", required=True)
    la = sub.add_parser("lamas", help="LAMaS against MaAS, ablations and static baselines (MASLatency-v0)",
                        description=LAMAS_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    _configure_lamas(la)
    cm = sub.add_parser("cmdp", help="PPO-Lagrangian, MasRouter, fixed rules and the oracle (MASLatency-CMDP-v0)",
                        description=CMDP_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    _configure_cmdp(cm)
    from .experiment_apwa import DESCRIPTION as APWA_DESCRIPTION

    ap = sub.add_parser("apwa", help="APWA against a centralised agent, a chain and a width-4 map",
                        description=APWA_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    _configure_apwa(ap)


def _common(p, plots: str, out: str) -> None:
    p.add_argument("--seeds", type=int, default=3, help="number of seeds, FIRST..FIRST+N-1 (default 3)")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--plots", type=Path, help=f"write the plots here ({plots})")
    p.add_argument("--out", type=Path, help=out)
    add_ray_args(p)
    add_json_flag(p)


def _configure_lamas(p) -> None:
    from agents.lamas import METHODS, TEST_REPEATS
    from envs import TASKS

    from ._mas import add_cluster_args

    p.add_argument("--task", default="gsm8k", choices=tuple(TASKS))
    p.add_argument("--methods", nargs="+", default=None, type=_underscored, choices=tuple(METHODS),
                   help="subset of the methods (default: all)")
    p.add_argument("--epochs", type=int, default=None,
                   help="passes over the train split (default: 4, more on a small split to reach 240 Adam steps)")
    p.add_argument("--protocol", default="robust", choices=("robust", "paper"),
                   help="how controllers train (agents.lamas.PROTOCOLS): robust (default) or the paper's own")
    p.add_argument("--restarts", type=int, default=None,
                   help="controllers trained per seed and method, one kept by a validation run of the train split "
                        "(agents.selection; default 1: three measured no better)")
    p.add_argument("--test-repeats", type=int, default=TEST_REPEATS, metavar="K",
                   help=f"avg@K: test runs per trained controller, each with fresh LLM outcomes, background and "
                        f"sampling, shared by all methods; figures are their means (default {TEST_REPEATS}: one "
                        f"131-query HumanEval run moves a seed's score gap by up to 2.4 points; 1: a single run)")
    p.add_argument("--load-factors", type=float, nargs="*", default=[],
                   help="also re-test the trained controllers at these multiples of the background rate")
    _common(p, "pareto.png, curves.png", "write summary.json here")
    add_cluster_args(p)


def _configure_cmdp(p) -> None:
    from agents.cmdp_experiment import POLICIES, CMDPExperimentConfig
    from agents.registry import get_method
    from envs import TASKS
    from envs.loads import REGIMES

    add_dataclass_options(p.add_argument_group("study (agents.cmdp_experiment.CMDPExperimentConfig)"),
                          CMDPExperimentConfig, prefix="x_", exclude=("seeds", "ppo", "masrouter", "estimator"),
                          choices={"task": tuple(TASKS), "regimes": tuple(REGIMES), "policies": POLICIES},
                          convert={"policies": _underscored}, aliases={"slo_factors": ("--slo-factor",)})
    p.add_argument("--estimator", default="default",
                   help="estimator bundle (.npz from `maslat train estimators`), default (the shipped one) or none")
    for name, option_prefix, prefix in (("ppo-lagrangian", "", "ppo_"), ("masrouter", "masrouter-", "mr_")):
        spec = get_method(name)
        g = p.add_argument_group(f"{name} ({spec.args_type.__module__}.{spec.args_type.__name__}; seed: each "
                                 f"experiment seed)")
        add_dataclass_options(g, spec.args_type, prefix=prefix, exclude=("seed",), choices=spec.choices,
                              aliases=spec.aliases, option_prefix=option_prefix, help_extra=spec.notes)
    _common(p, "goodput_vs_slo.png, training.png", "write summary.json and episodes.csv into this directory")


def _configure_apwa(p) -> None:
    from envs.apwa import METHODS

    from .experiment_apwa import add_apwa_args

    add_apwa_args(p)
    p.add_argument("--methods", nargs="+", default=None, type=_underscored, choices=tuple(METHODS),
                   help="subset of the methods (default: all)")
    _common(p, "makespan_vs_items.png, utility_vs_items.png", "write summary.json here")


def run(args) -> int:
    if args.name == "apwa":
        from .experiment_apwa import experiment_apwa

        return experiment_apwa(args)
    with ray_map_from_args(args, f"{args.name} trials") as map_fn:
        args.map_fn = map_fn
        return _run(args)


def _run(args) -> int:
    import torch

    torch.set_num_threads(1)
    return _experiment_cmdp(args) if args.name == "cmdp" else _experiment_lamas(args)


def _experiment_lamas(args) -> int:
    from agents.experiment import episodes_per_seed, run_experiment
    from agents.lamas import METHODS
    from maslat.plots import curves_plot, pareto_plot

    from ._mas import cluster_from_args, results_table

    if args.out:
        output_path(args.out, (".json",), what="--out")  # checked before hours of work, not after
    methods = args.methods or list(METHODS)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    if args.test_repeats < 1:
        raise ValueError("--test-repeats must be >= 1")
    total = episodes_per_seed(args.task, methods, args.epochs, args.load_factors, args.protocol,
                              args.restarts, args.test_repeats) * len(seeds)
    t0 = time.perf_counter()
    with progress(total, f"lamas experiment ({args.task}, {len(seeds)} seed(s))", unit="episode") as bar:
        res = run_experiment(args.task, seeds, methods, cluster=cluster_from_args(args),
                             load_factors=args.load_factors, epochs=args.epochs, progress=bar.update,
                             map_fn=args.map_fn, protocol=args.protocol, restarts=args.restarts,
                             test_repeats=args.test_repeats)
    summary = res.to_json()
    summary["wall_s"] = time.perf_counter() - t0
    summary["cpu_s"] = dict(res.cpu_s)   # summed over the trials, wherever they ran (Ray workers too)
    print(results_table(summary["methods"]))
    s = summary.get("savings")
    if s:
        print(f"\nLAMaS vs MaAS: CP tokens -{s['cp_tokens_reduction_pct']:.1f} % (± {s['cp_tokens_reduction_pct_std']:.1f}), "
              f"CP seconds -{s['cp_seconds_reduction_pct']:.1f} % (± {s['cp_seconds_reduction_pct_std']:.1f}), "
              f"score {s['score_gap_points']:+.2f} points; {100 * s['seconds_over_tokens']:.0f} % of the token "
              f"saving survives as seconds")
        print(f"per seed (avg@{args.test_repeats}; ± the gap's std over the {args.test_repeats} paired test runs):")
        for e in summary["per_seed"]:
            v = e["savings"]
            print(f"  seed {e['seed']}: CP tokens -{v['cp_tokens_reduction_pct']:.1f} %, score "
                  f"{v['score_gap_points']:+.2f} points (± {v['score_gap_points_repeat_std']:.2f})")
    pub = summary.get("published")
    if pub:
        print(f"paper: LAMaS {pub['lamas']['score_pct']} % / {pub['lamas']['cp_tokens_mean']} tok, MaAS "
              f"{pub['maas']['score_pct']} % / {pub['maas']['cp_tokens_mean']} tok, CP -{pub['cp_reduction_pct']:.1f} %")
    for f, d in summary.get("loads", {}).items():
        sv = d["savings"]
        if sv:
            print(f"background x{f}: CP tokens -{sv['cp_tokens_reduction_pct']:.1f} %, CP seconds "
                  f"-{sv['cp_seconds_reduction_pct']:.1f} %")
    cpu = summary["cpu_s"]
    print(f"wall time {summary['wall_s']:.1f} s; CPU s training {cpu.get('train', 0.0):.1f}, test runs "
          f"{cpu.get('test', 0.0):.1f}", file=sys.stderr)
    if args.plots:
        p1 = pareto_plot(summary, args.plots / "pareto.png")
        p2 = curves_plot(res.curves, args.plots / "curves.png")
        print(f"plots: {p1}, {p2}")
    if args.out:
        write_text(args.out, json.dumps(summary, indent=1))
    if args.json:
        emit_json(summary)
    return 0


def _experiment_cmdp(args) -> int:
    from agents.cmdp_experiment import CMDPExperimentConfig, episodes_total, run_cmdp_experiment
    from agents.registry import get_method
    from maslat.plots import goodput_plot, training_plot

    from ._cmdp_report import findings_text, results_table, training_note

    ppo, mr = get_method("ppo-lagrangian"), get_method("masrouter")
    cfg = CMDPExperimentConfig(**dataclass_kwargs(args, CMDPExperimentConfig, prefix="x_"),
                               seeds=tuple(range(args.first_seed, args.first_seed + args.seeds)),
                               ppo=ppo.make_args(**dataclass_kwargs(args, ppo.args_type, prefix="ppo_")),
                               masrouter=mr.make_args(**dataclass_kwargs(args, mr.args_type, prefix="mr_")),
                               estimator=args.estimator)
    with progress(episodes_total(cfg), f"cmdp experiment ({cfg.task}, {args.seeds} seed(s))", unit="step") as bar:
        res = run_cmdp_experiment(cfg, progress=bar.update, log=lambda s: print(s, file=sys.stderr),
                                  map_fn=getattr(args, "map_fn", None))
    summary = res["summary"]
    print(results_table(summary))
    print(findings_text(summary))
    print(training_note(summary))
    if args.plots:
        paths = [goodput_plot(summary, args.plots / "goodput_vs_slo.png"),
                 training_plot(res["curves"], args.plots / "training.png", cfg.ppo.cost_limit)]
        print("plots: " + ", ".join(str(p) for p in paths))
    if args.out:
        write_text(args.out / "summary.json", json.dumps(summary, indent=1, default=float))
        with atomic_open(args.out / "episodes.csv", "w", newline="") as f:
            res["rows"].to_csv(f, index=False)
    if args.json:
        emit_json(summary)
    return 0
