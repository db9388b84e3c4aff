"""What is known of measured runs' hardware and model, and the step-time family that follows.

``resolve_model_and_hardware`` is the one place that decides: the hardware from ``--gpu-spec`` / ``gpu=`` /
``meta.hardware.device_name`` / the run's name (catalogue GPUs in ``sim.catalog``; a CPU engine has no table peak),
the model's shape from ``--model-config``, the served model directory, the local Hugging Face cache or the
catalogue (``traces.hfconfig.resolve_shape``). ``None`` means unknown; ``family_choice`` then picks the shape-free
step-time model (``sim.latency_linear``) and says why.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import sim

from .hardware import GPUS, GpuEntry, ModelEntry, gpu_spec_entry, is_cpu_run, lookup_gpu, match_gpu_in_text
from .hfconfig import ResolvedShape, resolve_shape, unknown_shape_message
from .runs import MeasuredRun

__all__ = ["STEP_TIME_CHOICES", "Shape", "family_choice", "resolve_model_and_hardware", "resolve_shape_of_runs"]

#: ``step_time_model=`` values: "auto" (physics when the GPU and the model's shape are known, else linear)
STEP_TIME_CHOICES = ("auto", "physics", "linear")


def _gpu(runs: Sequence[MeasuredRun], gpu: str | None, gpu_spec: str | None,
         hardware: sim.HardwareSpec | None) -> tuple[GpuEntry | None, str]:
    """The runs' hardware and where it came from; ``(None, why)`` when it is unknown.

    Order: ``hardware=`` (a replay's profile), ``--gpu-spec``, ``--gpu``, then per run
    ``meta.hardware.device_name`` or the run directory's name. A CPU run (``traces.hardware.is_cpu_run``) has
    no table peak: without ``--gpu-spec`` its hardware is unknown.
    """
    if hardware is not None and gpu is None and gpu_spec is None:
        return GpuEntry(key="given", aliases=(), spec=hardware, sources={}), "given by the caller"
    cpu = [r.name for r in runs if is_cpu_run(r.meta)]
    if gpu_spec is not None:
        return gpu_spec_entry(gpu_spec, kind="cpu" if cpu else None), f"given (--gpu-spec {gpu_spec!r})"
    if gpu is not None:
        return lookup_gpu(gpu), f"given (gpu={gpu!r})"
    if cpu:
        return None, (f"run(s) {', '.join(cpu)} were served by vLLM's CPU backend, and a CPU has no reliable peak "
                      "from a table")
    found = []
    for run in runs:
        name = (run.meta.hardware or {}).get("device_name")
        if isinstance(name, str) and name:
            e, src = match_gpu_in_text(name), f"meta.hardware.device_name {name!r}"
            if e is None:
                return None, f"run {run.name}: device {name!r} is not in the catalogue (sim/data/gpus.json)"
        else:
            e = match_gpu_in_text(run.name)
            src = f"not recorded in meta.json; identified from the run directory name {run.name!r}"
            if e is None:
                return None, (f"run {run.name}: meta.json has no hardware.device_name and the run's name names no "
                              f"catalogue GPU (known: {sorted(GPUS)}; pass --gpu KEY for one of them)")
        found.append((e, src))
    if len({e.key for e, _ in found}) > 1:
        raise ValueError(f"the runs were measured on different GPUs ({[e.key for e, _ in found]}); calibrate them "
                         "separately")
    return found[0]


#: bytes per weight of vLLM's ``--dtype`` (``auto`` serves float32 checkpoints in float16: 2 bytes)
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "half": 2, "auto": 2, "float32": 4, "float": 4}


def _served_dtype(shape: ResolvedShape, run: MeasuredRun) -> ResolvedShape:
    """The shape with the bytes per weight the engine served (``engine_kwargs.dtype``), not the checkpoint's."""
    served = _DTYPE_BYTES.get(run.engine.dtype)
    if served is None or served == shape.entry.spec.dtype_bytes:
        return shape
    entry = replace(shape.entry, spec=replace(shape.entry.spec, dtype_bytes=served))
    return replace(shape, entry=entry, source=f"{shape.source}; served as {run.engine.dtype} "
                                              f"({run.engine.sources.get('dtype')})")


def _model(runs: Sequence[MeasuredRun], model_config: str | Path | None) -> tuple[ResolvedShape | None, str]:
    """The served model's shape (``traces.hfconfig.resolve_shape``); ``(None, why)`` when it is unknown."""
    names = [[r.engine.model, r.meta.model] for r in runs]
    shapes = [resolve_shape(n, model_config=model_config) for n in names]
    if any(s is None for s in shapes):
        return None, unknown_shape_message(next(n for n, s in zip(names, shapes, strict=True) if s is None))
    shapes = [_served_dtype(s, r) for s, r in zip(shapes, runs, strict=True)]
    if len({s.entry.spec for s in shapes}) > 1:
        raise ValueError(f"the runs served different models ({[r.meta.model for r in runs]}); calibrate them "
                         "separately")
    return shapes[0], shapes[0].source


def resolve_model_and_hardware(runs: Sequence[MeasuredRun], *, gpu: str | None = None, gpu_spec: str | None = None,
                               hardware: sim.HardwareSpec | None = None, model_config: str | Path | None = None
                               ) -> tuple[GpuEntry | None, str, ResolvedShape | None, str]:
    """(GPU entry or None, hardware source, shape or None, model source): ``None`` = unknown, and then the
    calibration fits the shape-free step-time model (``_family_choice``)."""
    gpu_entry, gpu_src = _gpu(runs, gpu, gpu_spec, hardware)
    shape, model_src = _model(runs, model_config)
    return gpu_entry, gpu_src, shape, model_src


@dataclass(frozen=True, slots=True, kw_only=True)
class Shape:
    """What is known of the runs' hardware and model; ``None`` for what is not (``*_src`` then says why)."""

    gpu: GpuEntry | None
    gpu_src: str
    model: ModelEntry | None
    model_src: str
    model_kind: str | None = None


def resolve_shape_of_runs(runs: Sequence[MeasuredRun], *, gpu: str | None, gpu_spec: str | None,
                          hardware: sim.HardwareSpec | None, model_config: str | Path | None) -> Shape:
    """``resolve_model_and_hardware`` as a ``Shape``."""
    gpu_entry, gpu_src, resolved, model_src = resolve_model_and_hardware(
        runs, gpu=gpu, gpu_spec=gpu_spec, hardware=hardware, model_config=model_config)
    return Shape(gpu=gpu_entry, gpu_src=gpu_src, model=None if resolved is None else resolved.entry,
                 model_src=model_src, model_kind=None if resolved is None else resolved.kind)


def family_choice(shape: Shape, step_time_model: str) -> tuple[str, str]:
    """The step-time family to fit and why (``report["step_time_model"]``, ``["step_time_model_reason"]``)."""
    if step_time_model not in STEP_TIME_CHOICES:
        raise ValueError(f"step_time_model must be one of {STEP_TIME_CHOICES}, got {step_time_model!r}")
    missing = ([] if shape.model is not None else [f"the model's shape ({shape.model_src})"]) + (
        [] if shape.gpu is not None else [f"the hardware's peak rates ({shape.gpu_src})"])
    if step_time_model == "physics" and missing:
        raise ValueError("step_time_model='physics' needs " + " and ".join(missing) + "; pass --model-config PATH "
                         "for the model and --gpu-spec peak_flops=...,mem_bw=... (or --gpu KEY) for the hardware, or "
                         "use the shape-free model (step_time_model='auto' or 'linear', --step-time-model)")
    if step_time_model == "linear":
        return "linear", "asked for (step_time_model='linear'): the shape-free model, fitted from the batches alone"
    if missing:
        return "linear", ("shape-free model chosen automatically: unknown " + " and ".join(missing)
                          + ". Its terms (per step, prefill token, prefill attention unit, decode sequence, decode "
                            "context token) are fitted from the reconstructed batches alone")
    return "physics", (f"the GPU ({shape.gpu.spec.name}) and the model's shape ({shape.model.spec.name}) are known: "
                       "roofline basis x fitted efficiency factors")
