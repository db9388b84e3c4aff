"""``maslat train estimators``: the two-phase dataset in simulation (or a live run's), then F_lat and F_len."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from ..checkpoints import HEADER_KEY, CheckpointHeader
from ._common import add_json_flag, emit_json, format_table, progress
from ._options import add_dataclass_options, dataclass_kwargs

__all__ = ["configure_estimators", "train_estimators_command"]

ARGS = "a_"


def configure_estimators(p, spec) -> None:
    """The estimators' own options (``agents.estimators.EstimatorArgs``) and the dataset's."""
    add_dataclass_options(p.add_argument_group("estimator training (agents.estimators.EstimatorArgs)"),
                          spec.args_type, prefix=ARGS, choices=spec.choices, aliases=spec.aliases)
    d = p.add_argument_group("estimator dataset")
    d.add_argument("--tasks", nargs="+", default=["mbpp", "gsm8k", "humaneval", "math"],
                   help="Phase 1 runs these tasks' train splits (the seed's pilot is mbpp alone)")
    d.add_argument("--concurrency", type=int, nargs="+", default=[1, 10, 50, 200, 500],
                   help="Phase 2 background concurrency levels: the seed's 1 10 50, plus 200 and 500, which the "
                        "busy regimes of two H100 replicas per model reach (200-400 running requests per pool); "
                        "give `1 10 50` for the seed's levels exactly")
    d.add_argument("--max-prompts", type=int, default=300, help="Phase-1 prompts replayed in Phase 2 (seeded sample)")
    d.add_argument("--replicas", type=int, default=2, help="replicas of each model's pool (default 2)")
    d.add_argument("--data", type=Path, default=None,
                   help="train on an existing dataset directory instead: phase2.csv and phase2_aux.csv from this "
                        "command or from a live `maslat collect --phase2` run")
    d.add_argument("--prompts", type=Path, default=None,
                   help="with --data from a live run: its Phase-1 prompts file (default: found via meta.json)")
    d.add_argument("--dataset-out", type=Path, default=None,
                   help="write intermediate_prompts.csv, phase2.csv and phase2_aux.csv here (default: beside --out)")
    p.add_argument("--out", type=Path, default=None,
                   help="the bundle (.npz, or a directory for estimators.npz; default runs/estimators/estimators.npz)")
    add_json_flag(p)


def train_estimators_command(args, spec) -> int:
    from envs.cmdp_catalog import ROLE_NAMES, STRATEGY_NAMES, default_models
    from envs.cmdp_dataset import Phase2Config, phase1, phase2, read_phase2, write_csv
    from envs.estimators import save_bundle
    from traces.phase2 import read_prompts

    models = default_models(args.replicas)
    names = tuple(m.name for m in models)
    out = args.out or Path("runs") / "estimators" / "estimators.npz"
    if out.suffix != ".npz":
        out = out / "estimators.npz"
    est = spec.make_args(**dataclass_kwargs(args, spec.args_type, prefix=ARGS))
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
        p1 = phase1(tuple(args.tasks), seed=est.seed, models=models)
        cfg = Phase2Config(concurrency=tuple(args.concurrency), max_prompts=args.max_prompts, seed=est.seed)
        n = min(len(p1), cfg.max_prompts or len(p1)) * len(STRATEGY_NAMES) * len(models) * len(cfg.concurrency)
        with progress(n, "phase 2 probes", unit="probe") as bar:
            p2, aux = phase2(p1, cfg, models=models, progress=bar.update)
        ddir = args.dataset_out or out.parent
        write_csv(p1, ddir / "intermediate_prompts.csv")
        write_csv(p2, ddir / "phase2.csv")
        write_csv(aux, ddir / "phase2_aux.csv")
        print(f"dataset: {len(p1)} Phase-1 prompts, {len(p2)} Phase-2 rows in {ddir}", file=sys.stderr)
        source = {"phase1_tasks": list(args.tasks), "phase1_prompts": len(p1), "phase2": {
            "concurrency": list(cfg.concurrency), "max_prompts": cfg.max_prompts, "rows": len(p2), "seed": est.seed}}
    t_data = time.perf_counter() - t0
    nets, metrics = spec.train(p2, aux, names, est,
                                     prompt_texts=prompts)
    meta = {"models": list(names), "roles": list(ROLE_NAMES), "strategies": list(STRATEGY_NAMES),
            "profiles": [m.profile for m in models], "replicas": args.replicas, "source": source, "metrics": metrics,
            "command": "maslat " + " ".join(sys.argv[1:]) if sys.argv and "maslat" in sys.argv[0] else None,
            HEADER_KEY: asdict(CheckpointHeader(method=spec.name, args=asdict(est)))}
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
