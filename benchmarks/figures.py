"""Regenerate the README's figures under ``docs/figures/`` (``make figures``): deterministic, one core,
a few minutes.

    python benchmarks/figures.py [--out docs/figures] [--only pareto,goodput,cdf] [--json]

- ``pareto.png``: LAMaS vs MaAS (and ablations) on GSM8K, one seed, the paper's protocol in simulation
  (``agents.experiment.run_experiment``), score against CP tokens and CP seconds, the paper's points as stars.
- ``goodput_vs_slo.png``: the CMDP experiment (``agents.cmdp_experiment``) on GSM8K, idle and busy regimes,
  one seed, a shortened PPO-Lagrangian budget (the full experiment trains 36,000 steps per regime).
- ``cdf_<run>.png``: measured vs simulated TTFT/TPOT/E2E CDFs of the two measured vLLM 0.19.0 runs in
  ``$MASLAT_TRACES_DIR/vllm/`` (LLMServingSim's validation runs, MIT, github.com/casys-kaist/LLMServingSim),
  each calibrated from its own trace by ``traces.calibrate.calibrate_run`` and replayed by
  ``traces.replay.simulate_run``: derived data, committed with the source named.

Every random stream is seeded and torch runs on one thread, so the same code gives the same PNGs.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS = ("rtxpro6000-llama-3.1-8b", "rtx4090-llama-3.1-8b")
PARETO_METHODS = ("lamas", "maas", "lamas_lambda0", "lamas_no_cp", "single_cot")


def _known(name: str, registry) -> str:
    """``name`` as the registry spells it (underscores or hyphens), or a clear error."""
    for n in (name, name.replace("_", "-")):
        if n in registry:
            return n
    raise ValueError(f"method {name!r} is not in {sorted(registry)}: update benchmarks/figures.py")


def pareto(out: Path) -> dict:
    """LAMaS vs MaAS on GSM8K, seed 0."""
    from agents.experiment import METHODS, run_experiment
    from maslat.plots import pareto_plot

    methods = [_known(m, METHODS) for m in PARETO_METHODS]
    summary = run_experiment("gsm8k", [0], methods).to_json()
    path = pareto_plot(summary, out / "pareto.png")
    keys = ("score_pct", "cp_tokens_mean", "cp_seconds_mean")
    return {"path": str(path), "methods": {m: {k: summary["methods"][m][k] for k in keys} for m in methods}}


def goodput(out: Path) -> dict:
    """Goodput against the SLO on GSM8K, idle and busy regimes, seed 0."""
    from agents.cmdp_experiment import CMDPExperimentConfig, run_cmdp_experiment
    from agents.ppo_lagrangian import PPOLagArgs
    from maslat.plots import goodput_plot

    cfg = CMDPExperimentConfig(task="gsm8k", seeds=(0,), regimes=("idle", "busy"), eval_queries=12,
                               ppo=PPOLagArgs(total_steps=6000, steps_per_epoch=1000))
    summary = run_cmdp_experiment(cfg)["summary"]
    path = goodput_plot(summary, out / "goodput_vs_slo.png")
    return {"path": str(path), "goodput": {r: {p: m["goodput"] for p, m in d.items()}
                                           for r, d in summary["regimes"].items()}}


def cdfs(out: Path) -> dict:
    """Measured vs simulated CDFs of every measured run, each calibrated from itself."""
    from maslat.plots import cdf_figure, save_figure
    from traces.calibrate import calibrate_run
    from traces.paths import traces_dir
    from traces.replay import latency_errors, simulate_run
    from traces.runs import read_run

    res = {}
    for name in RUNS:
        run = read_run(traces_dir() / "vllm" / name)
        simulated = simulate_run(run, calibrate_run(run).profile)
        errs = latency_errors(run, simulated)
        title = (f"{name}: measured (vLLM 0.19.0, LLMServingSim run) vs simulated after calibration, "
                 f"{len(run)} requests")
        path = save_figure(cdf_figure(run, simulated, title=title), out / f"cdf_{name}.png")
        res[name] = {"path": str(path), "error_pct": {m: {s: round(v["error_pct"], 2) for s, v in st.items()}
                                                      for m, st in errs.items()}}
    return res


FIGURES = {"pareto": pareto, "goodput": goodput, "cdf": cdfs}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "figures", help="folder for the PNGs")
    p.add_argument("--only", default=",".join(FIGURES),
                   help=f"comma-separated subset of {', '.join(FIGURES)}")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (the figures and their numbers) last")
    args = p.parse_args(argv)
    which = [w.strip() for w in args.only.split(",") if w.strip()]
    bad = [w for w in which if w not in FIGURES]
    if bad:
        p.error(f"--only: unknown figures {bad}; choose from {', '.join(FIGURES)}")
    import torch

    torch.set_num_threads(1)
    report = {}
    for w in which:
        t0 = time.perf_counter()
        report[w] = FIGURES[w](args.out)
        report[w]["wall_s"] = round(time.perf_counter() - t0, 1)
        print(f"{w}: {report[w]['wall_s']} s", flush=True)
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
