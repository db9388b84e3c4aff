"""Command-line front ends of calibration and replay (``maslat calibrate|replay`` and ``python -m traces.calibrate``).

They live here, under ``traces``, so that ``python -m traces.calibrate`` works without reaching up into
``maslat``; ``maslat/commands/{calibrate,replay}.py`` re-export them. With ``--json`` the last line of standard
output is one JSON object (NaN and infinities become ``null``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

__all__ = ["CALIBRATE_DESCRIPTION", "CALIBRATE_HELP", "REPLAY_DESCRIPTION", "REPLAY_HELP", "calibrate_main",
           "configure_calibrate", "configure_replay", "run_calibrate", "run_replay"]

CALIBRATE_HELP = "calibrate a serving profile from measured vLLM runs (step-time fit + replay refinement)"
CALIBRATE_DESCRIPTION = """\
Calibrate a simulator profile from one or more measured vLLM run directories of the same engine
(requests.jsonl, timeseries.csv, meta.json; see traces/runs.py), e.g. two load levels.

It reads the runs' engine settings, takes num_gpu_blocks from meta.json (or estimates it and says so),
reconstructs the engine's steps from the per-request timestamps, fits the step-time coefficients of
sim.latency.PhysicsStepModel by NNLS, then refines three multipliers by replaying the runs until the
simulated TTFT/TPOT/E2E distributions match the measured ones. Runs collected over HTTP (maslat collect:
client-side times, no scheduled_ts) are calibrated too: the fit also estimates the client-side constant
(API server frontend + HTTP), written as the profile's overheads.frontend_s, and the replays compare
client-side times. Prints a fit report (coefficients with units, residuals, replay errors per run) and
writes a profile that `sim.load_profile(PATH)` loads. Deterministic; seconds per run.

examples:
  maslat calibrate ../shared/traces/vllm/rtx4090-llama-3.1-8b --out rtx4090.json
  maslat calibrate runs/light runs/heavy --gpu h100-sxm --out h100.json     # two collected load levels
  python -m traces.calibrate RUN --out p.json --fit-fraction 0.5 --json
"""

REPLAY_HELP = "replay a measured vLLM run through the simulator and report errors (TTFT/TPOT/E2E, queues)"
REPLAY_DESCRIPTION = """\
Replay a measured run: every request enters the simulation at queued_ts - min(queued_ts) with its
measured lengths, on one replica with the run's engine settings. An engine-side run is replayed with no
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


def _clean(x: Any) -> Any:
    if isinstance(x, float):
        return None if math.isnan(x) or math.isinf(x) else x
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if hasattr(x, "item") and callable(x.item):  # numpy scalars
        return _clean(x.item())
    return x


def _emit_json(obj: dict) -> None:
    sys.stdout.write(json.dumps(_clean(obj)) + "\n")
    sys.stdout.flush()


def _bar(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="replay", file=sys.stderr, disable=not sys.stderr.isatty(),
                dynamic_ncols=True)


def _fraction(text: str) -> float:
    v = float(text)
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return v


def configure_calibrate(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", type=Path, nargs="+", metavar="RUN",
                   help="measured run directories of one engine (requests.jsonl, timeseries.csv, meta.json)")
    p.add_argument("--out", type=Path, required=True, help="where to write the calibrated profile (.json)")
    p.add_argument("--fit-fraction", type=_fraction, default=None,
                   help="fit only on requests that arrived in this first fraction of the arrival window")
    p.add_argument("--gpu", default=None, help="GPU key or device name when meta.json does not record it "
                                               "(e.g. rtx4090, rtxpro6000, h100-sxm)")
    p.add_argument("--name", default=None, help="profile name (default: the runs' directory names joined by +)")
    p.add_argument("--max-evals", type=int, default=None,
                   help="replays the refinement may spend (default 15 per multiplier: 45, or 60 for client-side runs)")
    p.add_argument("--seed", type=int, default=0, help="world seed of the replays (default 0)")
    p.add_argument("--report", type=Path, default=None, help="also write the full fit report as JSON here")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (the fit report and the profile path) as the last line")


def run_calibrate(args) -> int:
    from .calibrate import calibrate_runs, format_report

    if args.max_evals is not None and args.max_evals < 5:
        raise ValueError("--max-evals must be at least 5 (the initial simplex of up to four multipliers)")
    with _bar(args.max_evals, "refining") as bar:
        res = calibrate_runs(args.runs, fit_fraction=args.fit_fraction, seed=args.seed, gpu=args.gpu,
                             name=args.name, max_evals=args.max_evals, progress=bar.update)
    cmd = ["maslat calibrate", *map(_portable, args.runs), "--out", str(args.out)]
    if args.fit_fraction is not None:
        cmd += ["--fit-fraction", str(args.fit_fraction)]
    if args.gpu is not None:
        cmd += ["--gpu", args.gpu]
    profile = res.profile.replace(derived_from={**res.profile.derived_from, "command": " ".join(cmd)})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(profile.to_json())
    print(format_report(res.report))
    print(f"wrote profile {res.profile.name!r} to {args.out} ({res.report['wall_s']:.1f} s)")
    if args.report is not None:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(_clean(res.report), indent=2) + "\n")
    if args.json:
        _emit_json({"profile_path": str(args.out), "profile": res.profile.name, **res.report})
    return 0


def _portable(run: Path) -> str:
    """The run path as ``$MASLAT_TRACES_DIR/...`` when it lies in the traces directory (for provenance)."""
    from .paths import ENV_VAR, TracesNotFound, traces_dir

    try:
        return f"${ENV_VAR}/{run.resolve().relative_to(traces_dir().resolve()).as_posix()}"
    except (TracesNotFound, ValueError):
        return str(run)


def configure_replay(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, help="measured run directory")
    p.add_argument("--profile", required=True, help="profile: embedded name or path to a profile .json")
    p.add_argument("--fit-fraction", type=_fraction, default=None,
                   help="calibrate on this first fraction of the arrivals; report errors on the rest")
    p.add_argument("--plots", type=Path, default=None, help="write CDF and queue plots (PNG) into this directory")
    p.add_argument("--seed", type=int, default=0, help="world seed (default 0)")
    p.add_argument("--check", action="store_true", help="exit with status 1 when the accuracy bar fails")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")


def _replay_table(out: dict) -> str:
    rows = [f"{'metric':8s} {'stat':5s} {'measured':>12s} {'simulated':>12s} {'error %':>8s}"]
    for m, stats in out["metrics"].items():
        for s, v in stats.items():
            rows.append(f"{m:8s} {s:5s} {v['measured']:12.5g} {v['simulated']:12.5g} {v['error_pct']:+8.2f}")
    return "\n".join(rows)


def run_replay(args) -> int:
    import sim

    from .replay import replay_run

    prof = sim.load_profile(args.profile)
    with _bar(45 if args.fit_fraction else 0, "calibrating") as bar:
        out = replay_run(args.run, prof, fit_fraction=args.fit_fraction, seed=args.seed, plots_dir=args.plots,
                         progress=bar.update)
    out["profile"] = str(args.profile)
    part = (f"held-out requests after {out['split_s']:.1f} s ({out['evaluated_requests']})"
            if args.fit_fraction else f"all {out['evaluated_requests']} requests")
    print(f"run {out['run']}  profile {args.profile}  evaluated on {part}")
    print(_replay_table(out))
    print("time-series MAE: " + "  ".join(f"{k} {v if v is None else round(v, 4)}"
                                          for k, v in out["timeseries_mae"].items()))
    pre = out["preemptions"]
    print(f"preemptions (whole run): measured {'not recorded' if pre['measured'] is None else pre['measured']}, "
          f"simulated {pre['simulated']}" + ("" if pre["agree"] is None else
                                             f" ({'agree' if pre['agree'] else 'DISAGREE'}, {pre['tolerance']})"))
    b = out["bar"]
    print(f"accuracy bar |error| <= {b['threshold_pct']:g} % on {'/'.join(b['stats'])}: "
          f"{'PASS' if b['passed'] else 'FAIL'} (worst {b['worst']} {b['worst_error_pct']:+.2f} %)")
    if "plots" in out:
        print("plots: " + ", ".join(out["plots"].values()))
    if args.json:
        _emit_json(out)
    return 1 if args.check and not b["passed"] else 0


def calibrate_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m traces.calibrate", description=CALIBRATE_DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    configure_calibrate(p)
    args = p.parse_args(argv)
    try:
        return run_calibrate(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"python -m traces.calibrate: error: {e}", file=sys.stderr)
        return 2
