"""The MASLatency-CMDP-v0 side of ``maslat train``, ``maslat evaluate`` and ``maslat experiment``."""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path

from traces.atomic import atomic_open, write_text

from ..checkpoints import save_checkpoint
from ._common import emit_json, format_table, progress

__all__ = ["CMDP_METHODS", "add_cmdp_args", "evaluate_cmdp", "experiment_cmdp", "is_cmdp_checkpoint", "train_cmdp"]

CMDP_METHODS = ("estimators", "ppo_lagrangian", "masrouter")
METRIC_COLUMNS = ("quality_pct", "slo_attainment", "goodput", "latency_p50_s", "latency_p95_s", "cost_usd_per_query",
                  "calls_per_query", "large_model_share", "deepthink_share")


def add_cmdp_args(p, *, experiment: bool = False, dataset: bool = False, load_default: str | None = "idle") -> None:
    g = p.add_argument_group("MASLatency-CMDP-v0 (ppo_lagrangian, masrouter, estimators, experiment cmdp)")
    if not experiment:
        g.add_argument("--load", default=load_default,
                       help=f"load regime: idle | busy | bursty | shift (default {load_default or 'the checkpoint s'})")
    g.add_argument("--slo-factor", type=float, nargs="+", default=None, metavar="F",
                   help="training: SLO factor LOW HIGH drawn per episode; evaluation: the factors to test. A "
                        "factor multiplies each query's reference latency (its topology with the strongest model "
                        "and DeepThink on idle replicas). Defaults per task kind: math train 0.6 2.2, test "
                        "0.75 1 1.5 2; code train 1.8 4.5, test 2 2.5 3 4 (code answers hardly shrink, so "
                        "tighter code SLOs are infeasible under load)")
    g.add_argument("--steps", type=int, default=None, help="PPO-Lagrangian environment steps (default 36000)")
    g.add_argument("--cost", default="violation", choices=("violation", "overrun_frac", "overrun_s"),
                   help="the constrained cost: 1 per episode that misses its SLO (default), the overrun as a "
                        "fraction of the SLO, or the overrun in seconds (info['cost'])")
    g.add_argument("--cost-limit", type=float, default=None, help="the limit d on the mean episodic cost "
                                                                  "(default 0.01 for violation)")
    g.add_argument("--reward", default="counterfactual", choices=("counterfactual", "expected", "sampled"),
                   help="PPO-Lagrangian's reward advantage: per call, its action's effect on the probability that "
                        "the final answer is right, the other calls as made (default); GAE on that probability "
                        "for the whole episode (expected); or GAE on the sampled 0/1 answer (sampled)")
    g.add_argument("--adv-norm", default="joint", choices=("joint", "separate"),
                   help="standardise A_r - lambda A_c as one (default: lambda in the units of quality per unit "
                        "of cost) or each advantage apart, then (A_r - lambda A_c) / (1 + lambda) (OmniSafe)")
    g.add_argument("--lambda-lr", type=float, default=None,
                   help="step size of the gradient Lagrangian's multiplier (Adam; default: PPOLagArgs.lambda_lr)")
    g.add_argument("--lagrangian", default="gradient", choices=("gradient", "pid"),
                   help="multiplier update: OmniSafe's gradient ascent or the PID Lagrangian")
    g.add_argument("--estimator", default="default",
                   help="estimator bundle (.npz from `maslat train estimators`; default: the shipped one) or none")
    if experiment or not dataset:
        return
    d = p.add_argument_group("estimator dataset (maslat train estimators)")
    d.add_argument("--tasks", nargs="+", default=["mbpp", "gsm8k", "humaneval", "math"],
                   help="Phase 1 runs these tasks' train splits (the seed's pilot is mbpp alone)")
    d.add_argument("--concurrency", type=int, nargs="+", default=[1, 10, 50, 200, 500],
                   help="Phase 2 background concurrency levels: the seed's 1 10 50, plus 200 and 500, which the "
                        "busy regimes of two H100 replicas per model reach (200-400 running requests per pool); "
                        "give `1 10 50` for the seed's levels exactly")
    d.add_argument("--max-prompts", type=int, default=300, help="Phase-1 prompts replayed in Phase 2 (seeded sample)")
    d.add_argument("--data", type=Path, default=None,
                   help="train on an existing dataset directory instead: phase2.csv and phase2_aux.csv from this "
                        "command or from a live `maslat collect --phase2` run")
    d.add_argument("--prompts", type=Path, default=None,
                   help="with --data from a live run: its Phase-1 prompts file (default: found via meta.json)")
    d.add_argument("--estimator-steps", type=int, default=4000, help="Adam steps per estimator MLP")
    d.add_argument("--dataset-out", type=Path, default=None,
                   help="write intermediate_prompts.csv, phase2.csv and phase2_aux.csv here (default: beside --out)")


def _estimator_spec(args):
    return "none" if args.estimator == "none" else args.estimator


# ------------------------------------------------------------------------------------------ training
def train_cmdp(args) -> int:
    import torch

    torch.set_num_threads(1)
    if args.method == "estimators":
        return _train_estimators(args)
    return _train_policy(args)


def _train_estimators(args) -> int:
    from agents.estimators import EstimatorArgs, train_estimators
    from envs.cmdp_catalog import ROLE_NAMES, STRATEGY_NAMES, default_models
    from envs.cmdp_dataset import Phase2Config, phase1, phase2, read_phase2, write_csv
    from envs.estimators import save_bundle
    from traces.phase2 import read_prompts

    models = default_models(args.replicas)
    names = tuple(m.name for m in models)
    out = args.out or Path("runs") / "estimators" / "estimators.npz"
    if out.suffix != ".npz":
        out = out / "estimators.npz"
    t0 = time.perf_counter()
    prompts = None
    if args.data is not None:
        p2, aux = read_phase2(args.data / "phase2.csv")
        if aux is None:
            raise ValueError(f"{args.data}: phase2_aux.csv is needed (TTFT EMA and the Phase-1 row of each probe)")
        if (aux["query"] < 0).any():      # a live run: embed its prompts' text
            pfile = args.prompts or _prompts_of(args.data)
            prompts = [t for t, _ in read_prompts(pfile)]
        source = {"dataset": str(args.data)}
    else:
        p1 = phase1(tuple(args.tasks), seed=args.seed, models=models)
        cfg = Phase2Config(concurrency=tuple(args.concurrency), max_prompts=args.max_prompts, seed=args.seed)
        n = min(len(p1), cfg.max_prompts or len(p1)) * len(STRATEGY_NAMES) * len(models) * len(cfg.concurrency)
        with progress(n, "phase 2 probes", unit="probe") as bar:
            p2, aux = phase2(p1, cfg, models=models, progress=bar.update)
        ddir = args.dataset_out or out.parent
        write_csv(p1, ddir / "intermediate_prompts.csv")
        write_csv(p2, ddir / "phase2.csv")
        write_csv(aux, ddir / "phase2_aux.csv")
        print(f"dataset: {len(p1)} Phase-1 prompts, {len(p2)} Phase-2 rows in {ddir}", file=sys.stderr)
        source = {"phase1_tasks": list(args.tasks), "phase1_prompts": len(p1), "phase2": {
            "concurrency": list(cfg.concurrency), "max_prompts": cfg.max_prompts, "rows": len(p2), "seed": args.seed}}
    t_data = time.perf_counter() - t0
    nets, metrics = train_estimators(p2, aux, names, EstimatorArgs(seed=args.seed, steps=args.estimator_steps),
                                     prompt_texts=prompts)
    meta = {"models": list(names), "roles": list(ROLE_NAMES), "strategies": list(STRATEGY_NAMES),
            "profiles": [m.profile for m in models], "replicas": args.replicas, "source": source, "metrics": metrics,
            "command": "maslat " + " ".join(sys.argv[1:]) if sys.argv and "maslat" in sys.argv[0] else None}
    save_bundle(out, nets, meta)
    mp = metrics["mape_pct"]
    cal = metrics["calibration"]
    rows = [[k, mp[k]] for k in ("ttft", "tpot", "output_tokens", "total_latency")]
    print(format_table(rows, ["held-out MAPE (%)", "value"]))
    print(format_table([[c, v["ttft"], v["total_latency"]] for c, v in metrics["mape_pct_by_concurrency"].items()],
                       ["concurrency N", "TTFT MAPE %", "total MAPE %"]))
    print(f"calibration of T_total: {100 * cal['within_prediction']:.1f} % of calls finished within their "
          f"prediction; measured/predicted {cal['measured_over_predicted']:.3f}; slope {cal['slope']:.3f}")
    print(f"bundle: {out}  (dataset {t_data:.0f} s, training {time.perf_counter() - t0 - t_data:.0f} s)")
    if args.json:
        emit_json({"bundle": str(out), "models": list(names), **metrics, "dataset_s": t_data,
                   "wall_s": time.perf_counter() - t0})
    return 0


def _prompts_of(run_dir: Path) -> Path:
    """The Phase-1 file a live Phase-2 run was collected from (its ``meta.json``), or one beside it."""
    beside = run_dir / "intermediate_prompts.csv"
    if beside.is_file():
        return beside
    meta = run_dir / "meta.json"
    if meta.is_file():
        p = json.loads(meta.read_text()).get("collector", {}).get("phase2", {}).get("prompts_csv")
        if p and Path(p).is_file():
            return Path(p)
    raise FileNotFoundError(f"{run_dir}: cannot find the Phase-1 prompts of this run; pass --prompts FILE")


def _slo_range(args) -> tuple[float, float]:
    from agents.cmdp_experiment import default_slo

    f = args.slo_factor or list(default_slo(args.task)[1])
    if len(f) == 1:
        return (f[0], f[0])
    if len(f) != 2:
        raise ValueError("--slo-factor takes LOW HIGH for training")
    return (f[0], f[1])


def ppo_args(args, **over):
    from agents.ppo_lagrangian import PPOLagArgs

    limit = args.cost_limit if args.cost_limit is not None else DEFAULT_COST_LIMIT[args.cost]
    kw = {"cost": args.cost, "cost_limit": limit, "lagrangian": args.lagrangian, "reward": args.reward,
          "adv_norm": args.adv_norm, "seed": getattr(args, "seed", 0),
          **over}
    if args.steps is not None:
        kw["total_steps"] = args.steps
    if args.lambda_lr is not None:
        kw["lambda_lr"] = args.lambda_lr
    return PPOLagArgs(**kw)


#: default limits d per cost kind
DEFAULT_COST_LIMIT = {"violation": 0.01, "overrun_frac": 0.002, "overrun_s": 0.02}


def _train_policy(args) -> int:

    from agents.masrouter import MasRouterArgs, train_masrouter
    from agents.ppo_lagrangian import train_ppo_lagrangian
    from envs.cmdp import MASLatencyCMDPEnv

    load = args.load if args.method == "ppo_lagrangian" else "idle"
    env = MASLatencyCMDPEnv(args.task, "train", load=load, slo_factor=_slo_range(args), estimator=_estimator_spec(args),
                            cost="overrun")  # agents.ppo_lagrangian.COSTS reads the overrun from info["cost"]
    out = args.out or Path("runs") / f"{args.method}-{args.task}-{load}-{args.seed}"
    t0 = time.perf_counter()
    if args.method == "ppo_lagrangian":
        a = ppo_args(args)
        with progress(a.total_steps // a.steps_per_epoch * a.steps_per_epoch, f"PPO-Lagrangian on {args.task}/{load}",
                      unit="step") as bar:
            pol, hist = train_ppo_lagrangian(env, a, progress=bar.update)
        state = pol.state_dict()
        meta = {"kind": "ppo_lagrangian", "task": args.task, "load": load, "args": pol.args,
                "slo_factor": list(_slo_range(args))}
    else:
        a = MasRouterArgs(seed=args.seed)
        with progress(len(env.queries) * a.epochs, f"MasRouter on {args.task}", unit="query") as bar:
            pol, hist = train_masrouter(env, a, progress=bar.update)
        state = pol.state_dict()
        meta = {"kind": "masrouter", "task": args.task, "load": load, "args": pol.args}
    wall = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint({**meta, "state": state, "estimator": args.estimator}, out / "policy.pt")
    with atomic_open(out / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(hist[0]))
        w.writeheader()
        w.writerows(hist)
    last = hist[-1]
    print(f"trained {args.method} on {args.task}/{load} (seed {args.seed}) in {wall:.1f} s")
    print(format_table([[k, v] for k, v in last.items()], ["last epoch", "value"]))
    if args.method == "ppo_lagrangian":
        print(f"time: simulation {last['time/simulate_s']:.1f} s, learning {last['time/learn_s']:.1f} s")
    print(f"checkpoint: {out / 'policy.pt'}   metrics: {out / 'metrics.csv'}")
    if args.json:
        emit_json({"checkpoint": str(out / "policy.pt"), "metrics_csv": str(out / "metrics.csv"), "wall_s": wall,
                   "method": args.method, "task": args.task, "load": load, **{k.replace("/", "_"): v for k, v in last.items()}})
    return 0


# ------------------------------------------------------------------------------------------ evaluation
def is_cmdp_checkpoint(path: str, *, trust: bool = False) -> bool:
    from ..checkpoints import load_checkpoint_file

    if not Path(path).is_file():
        return False
    try:
        ck = load_checkpoint_file(path, trust=trust)
    except Exception:  # noqa: BLE001 - not a torch file, or refused: let the LAMaS loader report it
        return False
    return isinstance(ck, dict) and ck.get("kind") in ("ppo_lagrangian", "masrouter")


def load_policy(path: str, *, trust: bool = False):
    from agents.masrouter import MasRouterPolicy
    from agents.ppo_lagrangian import PPOLagPolicy

    from ..checkpoints import load_checkpoint_file

    ck = load_checkpoint_file(path, trust=trust)
    if ck["kind"] == "ppo_lagrangian":
        return PPOLagPolicy.from_state(ck["state"]), ck
    return MasRouterPolicy.from_state(ck["state"]), ck


def evaluate_cmdp(args) -> int:
    import numpy as np
    import pandas as pd

    from agents.cmdp_experiment import evaluate, summarise
    from envs.cmdp import MASLatencyCMDPEnv

    pol, ck = load_policy(args.checkpoint, trust=getattr(args, "trust_checkpoint", False))
    task = args.task or ck["task"]
    load = args.load or ck["load"]
    from agents.cmdp_experiment import default_slo

    factors = args.slo_factor or list(default_slo(task)[0])
    env = MASLatencyCMDPEnv(task, args.split, load=load, estimator=_estimator_spec(args) if args.estimator != "default"
                            else ck.get("estimator", "default"), warmup_s=20.0)
    n = min(args.num_queries, len(env.queries))
    queries = [int(q) for q in np.random.Generator(np.random.PCG64(np.random.SeedSequence([args.seed, 11]))).permutation(
        len(env.queries))[:n]]
    with progress(n * len(factors), f"evaluate {ck['kind']} on {task}/{load}", unit="episode") as bar:
        rows = pd.DataFrame(evaluate(pol, env, queries, factors, args.seed, load, bar.update))
    s = summarise(rows)
    m = s["regimes"][load][pol.name]
    print(format_table([[k, m[k]] for k in METRIC_COLUMNS], ["metric", f"{pol.name} on {load}"]))
    per = s["by_slo"][load][pol.name]
    print(format_table([[f, v["slo_attainment"], v["goodput"], v["quality_pct"], v["latency_p95_s"]] for f, v in per.items()],
                       ["SLO factor", "attainment", "goodput", "quality %", "p95 s"]))
    if args.json:
        emit_json({"policy": pol.name, "task": task, "load": load, "split": args.split, **m, "by_slo": per})
    return 0


# ------------------------------------------------------------------------------------------ experiment
def experiment_cmdp(args) -> int:
    import torch

    from agents.cmdp_experiment import POLICIES, CMDPExperimentConfig, episodes_total, run_cmdp_experiment
    from agents.masrouter import MasRouterArgs

    torch.set_num_threads(1)
    factors = tuple(args.slo_factor) if args.slo_factor else None
    cfg = CMDPExperimentConfig(task=args.task, seeds=tuple(range(args.first_seed, args.first_seed + args.seeds)),
                               regimes=tuple(args.regimes), slo_factors=factors, eval_queries=args.eval_queries,
                               policies=tuple(args.policies or POLICIES), ppo=ppo_args(args, seed=0),
                               masrouter=MasRouterArgs(), estimator=_estimator_spec(args))
    with progress(episodes_total(cfg), f"cmdp experiment ({args.task}, {args.seeds} seed(s))", unit="step") as bar:
        res = run_cmdp_experiment(cfg, progress=bar.update, log=lambda s: print(s, file=sys.stderr))
    summary = res["summary"]
    print(results_table(summary))
    print(findings_text(summary))
    print(_training_note(summary))
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


def _training_note(summary: dict) -> str:
    t = summary["timing"]
    parts = [f"{r} {sum(v) / len(v):.0f} s" for r, v in t["train_ppo_s"].items()]
    return ("PPO-Lagrangian training time per regime (mean over seeds): " + ", ".join(parts)
            + f"; total wall {summary['wall_s']:.0f} s") if parts else f"total wall {summary['wall_s']:.0f} s"


def findings_text(summary: dict) -> str:
    lines = ["\nfindings (target: PPO-Lagrangian attains the SLO on >= 95 % of queries, highest non-oracle goodput):"]
    for reg, f in summary.get("findings", {}).items():
        lines.append(
            f"  {reg:7s} PPO-Lagrangian attainment {f['ppo_slo_attainment']:.3f} (lowest over SLOs "
            f"{f['ppo_min_attainment_over_slos']:.3f}) {'meets' if f['ppo_meets_target'] else 'MISSES'} the target; "
            f"goodput {f['ppo_goodput']:.3f} vs best other {f['best_other']} {f['best_other_goodput']:.3f} "
            f"({'highest' if f['ppo_highest_goodput'] else 'NOT highest'}; oracle {f['oracle_goodput'] or float('nan'):.3f})"
            + (f"; MasRouter attains {f['masrouter_slo_attainment']:.3f}" if f["masrouter_slo_attainment"] is not None
               else ""))
    return "\n".join(lines)


def results_table(summary: dict) -> str:
    out = []
    for reg, pols in summary["regimes"].items():
        rows = []
        for name, m in pols.items():
            sd = summary["seeds"] > 1
            def pm(k, scale=1.0, m=m, sd=sd):
                return f"{scale * m[k]:.3g}" + (f" ± {scale * m[k + '_std']:.2g}" if sd and k + "_std" in m else "")
            rows.append([name, pm("quality_pct"), pm("slo_attainment"), pm("goodput"), m["latency_p50_s"],
                         m["latency_p95_s"], m["cost_usd_per_query"], m["calls_per_query"]])
        out.append(f"\nload regime: {reg}  (SLO factors {summary['slo_factors']}, {summary['eval_queries']} test queries "
                   f"each, {summary['seeds']} seed(s))")
        out.append(format_table(rows, ["policy", "quality %", "SLO attainment", "goodput", "p50 s", "p95 s", "$/query",
                                       "calls"]))
    return "\n".join(out)


def goodput_plot(summary: dict, path: Path) -> Path:
    from maslat.plots import _plt, save_figure

    plt = _plt()
    regs = list(summary["by_slo"])
    fig, axes = plt.subplots(1, len(regs), figsize=(4.2 * len(regs), 3.6), squeeze=False)
    for ax, reg in zip(axes[0], regs, strict=True):
        for pol, per in summary["by_slo"][reg].items():
            fs = sorted(per, key=float)
            ax.plot([float(f) for f in fs], [per[f]["goodput"] for f in fs], marker="o",
                    ls="--" if pol == "oracle" else "-", label=pol, lw=2.2 if pol == "ppo_lagrangian" else 1.2)
        ax.set_title(reg)
        ax.set_xlabel("SLO (x reference latency)")
        ax.set_ylabel("goodput (correct and within SLO)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{summary['task']}: goodput against the SLO")
    return save_figure(fig, path, dpi=110)


def training_plot(curves: dict, path: Path, cost_limit: float) -> Path:
    from maslat.plots import _plt, save_figure

    plt = _plt()
    ppo = {k: v for k, v in curves.items() if k.startswith("ppo_lagrangian/")}
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8))
    for k, hist in ppo.items():
        label = "/".join(k.split("/")[1:])
        steps = [h["steps"] for h in hist]
        a1.plot(steps, [h["constraint/lambda"] for h in hist], label=label)
        a2.plot(steps, [h["constraint/episode_cost"] for h in hist], label=label)
    a2.axhline(cost_limit, color="k", ls=":", label="cost limit d")
    a1.set_title("Lagrange multiplier")
    a2.set_title("mean episodic cost (last rollout)")
    for a in (a1, a2):
        a.set_xlabel("environment steps")
        a.grid(alpha=0.3)
    a2.legend(fontsize=7)
    return save_figure(fig, path, dpi=110)
