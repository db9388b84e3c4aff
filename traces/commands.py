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
sim.latency.PhysicsStepModel by NNLS (or, when the GPU or the model's shape is unknown, those of the
shape-free sim.latency_linear.LinearStepModel: chosen automatically and named in the report; a block size
the run does not record is inferred from its KV-usage gauge), then refines three multipliers by replaying the runs until the
simulated TTFT/TPOT/E2E distributions match the measured ones. Runs collected over HTTP (maslat collect:
client-side times, no scheduled_ts) are calibrated too: the fit also estimates the client-side constant
(API server frontend + HTTP), written as the profile's overheads.frontend_s, and the replays compare
client-side times. Prints a fit report (coefficients with units, residuals, replay errors per run) and
writes a profile that `sim.load_profile(PATH)` loads. Deterministic; seconds per run.

The model's shape comes from --model-config (a Hugging Face config.json or its directory), else the served
model directory, the local Hugging Face cache ($HF_HOME/hub), or the bundled catalogue (sim/data/models.json:
Llama 3.x, Qwen2.5/Qwen3 dense and MoE, Mistral/Mixtral, DeepSeek-V2-Lite/V3, gpt-oss, Gemma 2/3). The
hardware comes from --gpu-spec, --gpu, meta.hardware.device_name or the run's name (sim/data/gpus.json);
a CPU engine (vllm-cpu) needs --gpu-spec. The report names both sources.

examples:
  maslat calibrate ../shared/traces/vllm/rtx4090-llama-3.1-8b --out rtx4090.json
  maslat calibrate runs/light runs/heavy --gpu h100-sxm --out h100.json     # two collected load levels
  maslat calibrate RUN --model-config my-model/ --gpu-spec peak_flops=362T,mem_bw=864G --out p.json
  python -m traces.calibrate RUN --out p.json --fit-fraction 0.5 --json
"""

REPLAY_HELP = "replay a measured vLLM run through the simulator and report errors (TTFT/TPOT/E2E, queues)"
REPLAY_DESCRIPTION = """\
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


def _skip_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip malformed or implausible lines of requests.jsonl / timeseries.csv and count them "
                        "(skipped_lines in the report) instead of refusing the run")


def _read_runs(paths: list[Path], skip_bad: bool) -> list:
    """Read every run first (a bad line is refused before any work, or skipped and said on stderr)."""
    from .runs import read_run

    runs = [read_run(p, skip_bad=skip_bad) for p in paths]
    for run in runs:
        for name, n in run.skipped.items():
            if n:
                print(f"{run.path}: skipped {n} bad line(s) of {name} (--skip-bad-lines), e.g.", file=sys.stderr)
                for msg in run.skipped_detail.get(name, [])[:3]:
                    print(f"  {msg}", file=sys.stderr)
    return runs


def _skipped(runs: list, detail: bool = False) -> dict:
    """Skipped lines per file (``detail``: their messages), per run when there are several."""
    of = (lambda r: dict(r.skipped_detail)) if detail else (lambda r: dict(r.skipped))
    return {run.name: of(run) for run in runs} if len(runs) > 1 else of(runs[0])


def configure_calibrate(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", type=Path, nargs="+", metavar="RUN",
                   help="measured run directories of one engine (requests.jsonl, timeseries.csv, meta.json)")
    p.add_argument("--out", type=Path, required=True, help="where to write the calibrated profile (.json)")
    p.add_argument("--fit-fraction", type=_fraction, default=None,
                   help="fit only on requests that arrived in this first fraction of the arrival window")
    p.add_argument("--gpu", default=None, help="GPU key or device name when meta.json does not record it "
                                               "(e.g. rtx4090, rtxpro6000, h100-sxm)")
    p.add_argument("--gpu-spec", default=None, metavar="SPEC",
                   help="a device that is not in the catalogue, by its peak rates: peak_flops=..,mem_bw=..[,memory=..,"
                        "interconnect=nvlink4|pcie4x16|B/s,kind=gpu|cpu] (SI suffixes: 989T, 3.35T, 80G); "
                        "needed for CPU engines (vllm-cpu)")
    p.add_argument("--model-config", type=Path, default=None, metavar="PATH",
                   help="the served model's Hugging Face config.json (or its directory); default: the served model "
                        "directory, the local Hugging Face cache, then the bundled catalogue")
    p.add_argument("--name", default=None, help="profile name (default: the runs' directory names joined by +)")
    p.add_argument("--step-time-model", choices=("auto", "physics", "linear"), default="auto",
                   help="step-time model to fit: physics (needs the GPU and the model's shape), linear (shape-free, "
                        "fitted from the batches alone) or auto (default: physics when both are known, else linear)")
    p.add_argument("--max-evals", type=int, default=None,
                   help="replays the refinement may spend (default 15 per multiplier: 45, or 60 for client-side runs)")
    p.add_argument("--seed", type=int, default=0, help="world seed of the replays (default 0)")
    p.add_argument("--report", type=Path, default=None, help="also write the full fit report as JSON here")
    _skip_flag(p)
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (the fit report and the profile path) as the last line")


def run_calibrate(args) -> int:
    from .atomic import output_path, write_text
    from .calibrate import calibrate_runs, format_report

    if args.max_evals is not None and args.max_evals < 5:
        raise ValueError("--max-evals must be at least 5 (the initial simplex of up to four multipliers)")
    output_path(args.out, (".json",), what="--out")  # checked before the work, not after
    if args.report is not None:
        output_path(args.report, (".json",), what="--report")
    runs = _read_runs(args.runs, args.skip_bad_lines)
    with _bar(args.max_evals, "refining") as bar:
        res = calibrate_runs(runs, fit_fraction=args.fit_fraction, seed=args.seed, gpu=args.gpu,
                             gpu_spec=args.gpu_spec, model_config=args.model_config, name=args.name,
                             max_evals=args.max_evals, step_time_model=args.step_time_model, progress=bar.update)
    cmd = ["maslat calibrate", *map(_portable, args.runs), "--out", str(args.out)]
    if args.fit_fraction is not None:
        cmd += ["--fit-fraction", str(args.fit_fraction)]
    if args.gpu is not None:
        cmd += ["--gpu", args.gpu]
    if args.gpu_spec is not None:
        cmd += ["--gpu-spec", args.gpu_spec]
    if args.model_config is not None:
        cmd += ["--model-config", str(args.model_config)]
    if args.step_time_model != "auto":
        cmd += ["--step-time-model", args.step_time_model]
    profile = res.profile.replace(derived_from={**res.profile.derived_from, "command": " ".join(cmd)})
    write_text(args.out, profile.to_json())  # atomic: a failed write leaves the old profile
    print(format_report(res.report))
    print(f"model shape: {res.report['model_source']}\nhardware: {res.report['hardware_source']}")
    print(f"wrote profile {res.profile.name!r} to {args.out} ({res.report['wall_s']:.1f} s); step-time model "
          f"{res.report['step_time_model']!r}")
    if args.report is not None:
        write_text(args.report, json.dumps(_clean(res.report), indent=2) + "\n")
    if args.json:
        _emit_json({"profile_path": str(args.out), "profile": res.profile.name, **res.report,
                    "skipped_lines": _skipped(runs), "skipped_examples": _skipped(runs, detail=True)})
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
    _skip_flag(p)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")


def _replay_table(out: dict) -> str:
    rows = [f"{'metric':8s} {'stat':5s} {'measured':>12s} {'simulated':>12s} {'error %':>8s}"]
    for m, stats in out["metrics"].items():
        for s, v in stats.items():
            cells = [f"{'n/a':>{w}s}" if x is None else format(x, f)
                     for x, w, f in ((v["measured"], 12, "12.5g"), (v["simulated"], 12, "12.5g"),
                                     (v["error_pct"], 8, "+8.2f"))]
            rows.append(f"{m:8s} {s:5s} " + " ".join(cells))
    return "\n".join(rows)


def run_replay(args) -> int:
    import sim

    from .atomic import output_dir
    from .replay import replay_run

    prof = sim.load_profile(args.profile)
    if args.plots is not None:
        output_dir(args.plots, what="--plots")
    run = _read_runs([args.run], args.skip_bad_lines)[0]
    with _bar(45 if args.fit_fraction else 0, "calibrating") as bar:
        out = replay_run(run, prof, fit_fraction=args.fit_fraction, seed=args.seed, plots_dir=args.plots,
                         progress=bar.update)
    out["profile"] = str(args.profile)
    out["skipped_lines"] = _skipped([run])
    out["skipped_examples"] = _skipped([run], detail=True)
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
          + (f"; undefined: {', '.join(b['undefined'])}" if b.get("undefined") else ""))
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
    except (ValueError, OSError) as e:  # OSError: a full disk, a folder where a file goes...
        print(f"python -m traces.calibrate: error: {e}", file=sys.stderr)
        return 2
