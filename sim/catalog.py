"""The project's one catalogue of GPUs and models, kept as data with a source per number.

``sim/data/gpus.json`` holds each GPU's dense BF16 peak, memory bandwidth, memory and the link between
GPUs of a tensor-parallel group (an interconnect kind with its per-direction bandwidth);
``sim/data/models.json`` holds an excerpt of each model's ``config.json`` and the sizes its publisher
states. Model shapes (``ModelSpec``, parameter counts) are derived from the config excerpts by
``sim.modelshape`` -- the same rule that reads a user's own ``config.json`` (``traces.hfconfig``).

The files are read on first use (``gpus()``, ``models()``, ``interconnects()``), never at import.
A new GPU or model is one more object in the JSON files.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field, replace
from importlib import resources
from types import MappingProxyType
from typing import Any

from .config import HardwareSpec
from .modelshape import ModelEntry, model_entry_from_config

__all__ = ["GpuEntry", "Interconnect", "ModelEntry", "find_model", "find_model_variant", "gpus", "interconnects", "lookup_gpu",
           "lookup_model", "match_gpu_in_text", "models", "normalise_name"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Interconnect:
    """A link between GPUs: its key (``"nvlink4"``), name, per-direction bandwidth and source."""

    key: str
    name: str
    bw_bytes_per_s: float
    source: str


@dataclass(frozen=True, slots=True, kw_only=True)
class GpuEntry:
    """One GPU: its ``HardwareSpec`` plus the names it goes by and where each number comes from."""

    key: str
    aliases: tuple[str, ...]
    spec: HardwareSpec
    sources: dict[str, str] = field(default_factory=dict)


def _data(name: str) -> dict[str, Any]:
    return json.loads((resources.files("sim") / "data" / name).read_text(encoding="utf-8"))


@functools.cache
def interconnects() -> MappingProxyType[str, Interconnect]:
    """Interconnect kinds by key (``sim/data/gpus.json`` ``interconnects``)."""
    raw = _data("gpus.json")["interconnects"]
    return MappingProxyType({k: Interconnect(key=k, **v) for k, v in raw.items()})


def _gpu(raw: dict[str, Any]) -> GpuEntry:
    link = interconnects()[raw["interconnect"]] if raw.get("interconnect") else None
    spec = HardwareSpec(name=raw["name"], peak_flops=float(raw["peak_flops"]),
                        mem_bw_bytes_per_s=float(raw["mem_bw_bytes_per_s"]), memory_bytes=raw["memory_bytes"],
                        interconnect_bw_bytes_per_s=link.bw_bytes_per_s if link else None,
                        interconnect=link.key if link else None, kind=raw.get("kind", "gpu"))
    sources = dict(raw["sources"])
    if link is not None:
        sources["interconnect_bw_bytes_per_s"] = f"{link.name}: {link.source}; link: {sources.pop('interconnect')}"
    return GpuEntry(key=raw["key"], aliases=tuple(raw["aliases"]), spec=spec, sources=sources)


@functools.cache
def gpus() -> MappingProxyType[str, GpuEntry]:
    """GPUs by key (``sim/data/gpus.json``)."""
    return MappingProxyType({e.key: e for e in map(_gpu, _data("gpus.json")["gpus"])})


def _model(raw: dict[str, Any]) -> ModelEntry:
    src = f"config.json of {raw['id']} ({raw['config_source']})"
    sources = {"published_params": raw["published_source"]}
    if raw.get("published_active_excludes_input_embedding"):
        sources["published_active_params"] = "counted without the input embedding"
    if raw.get("note"):
        sources["note"] = raw["note"]
    entry = model_entry_from_config(raw["config"], name=raw["id"], source=src,
                                    where=f"sim/data/models.json {raw['id']}", aliases=tuple(raw["aliases"]),
                                    published_params=raw["published_params"],
                                    published_active_params=raw.get("published_active_params"), sources=sources)
    if "num_params" in raw:  # a stated total instead of the derived one (the entry says why)
        entry = replace(entry, spec=replace(entry.spec, num_params=float(raw["num_params"])),
                        sources={**entry.sources, "num_params": raw["num_params_source"]})
    return entry


@functools.cache
def models() -> MappingProxyType[str, ModelEntry]:
    """Models by Hugging Face id (``sim/data/models.json``)."""
    return MappingProxyType({e.spec.name: e for e in map(_model, _data("models.json")["models"])})


def normalise_name(s: str) -> str:
    return re.sub(r"[^a-z0-9]", "", s.lower())


def match_gpu_in_text(text: str) -> GpuEntry | None:
    """The GPU whose longest alias appears in ``text`` (a device name or a run name), or ``None``."""
    t = normalise_name(text)
    best, best_len = None, 0
    for e in gpus().values():
        for a in e.aliases:
            if a in t and len(a) > best_len:
                best, best_len = e, len(a)
    return best


def lookup_gpu(name: str) -> GpuEntry:
    """The entry for a GPU key (``"rtx4090"``) or device name (``"NVIDIA GeForce RTX 4090"``)."""
    if name in gpus():
        return gpus()[name]
    e = match_gpu_in_text(name)
    if e is None:
        raise ValueError(f"unknown GPU {name!r}; known: {sorted(gpus())}. Pass its peak rates instead: "
                         "--gpu-spec peak_flops=...,mem_bw=...[,memory=...,interconnect=...] (or add it to "
                         "sim/data/gpus.json with a source per number)")
    return e


def find_model(name: str) -> ModelEntry | None:
    """The entry for a model id (case-insensitive, aliases accepted; a trailing ``/`` or an ``org/`` prefix of
    a local path's last component are tolerated), or ``None``."""
    low = name.strip().rstrip("/").lower()
    for key, e in models().items():
        if low == key.lower() or low in (a.lower() for a in e.aliases):
            return e
    return None


#: name endings of fine-tuned, quantised or re-dated variants that keep the base model's shape
_VARIANT_SUFFIX = re.compile(r"[-_.](instruct|chat|it|base|hf|pt|fp8|fp8-dynamic|awq|gptq|gptq-int4|gptq-int8|int4|"
                             r"int8|w4a16|w8a8|bnb-4bit|thinking|\d{4})$")


def find_model_variant(name: str) -> tuple[ModelEntry, str] | None:
    """The entry for ``name`` or for the base model it is a variant of, and how it matched; ``None`` if neither.

    A variant is matched by its last path component (the org and any local directory are dropped:
    ``/models/Llama-3.1-8B-Instruct``, ``unsloth/Qwen3-30B-A3B``) after removing endings that keep the shape
    (``-Instruct``, ``-2507``, ``-FP8``, ``-AWQ``, ...), one at a time.
    """
    e = find_model(name)
    if e is not None:
        return e, "exact"
    index: dict[str, ModelEntry] = {}
    for entry in models().values():
        for n in (entry.spec.name, *entry.aliases):
            key = n.split("/")[-1].lower()
            while key not in index:  # the name and its shorter forms (gemma-3-27b-it -> gemma-3-27b)
                index[key] = entry
                key = _VARIANT_SUFFIX.sub("", key)
    cand = name.strip().rstrip("/").split("/")[-1].lower()
    while cand:
        if cand in index:
            return index[cand], f"{name!r} taken as a variant of {index[cand].spec.name!r} (same shape) by its name"
        shorter = _VARIANT_SUFFIX.sub("", cand)
        if shorter == cand:
            return None
        cand = shorter
    return None


def lookup_model(name: str) -> ModelEntry:
    """Like ``find_model`` but unknown models raise a ``ValueError`` that says what to pass."""
    e = find_model(name)
    if e is None:
        raise ValueError(f"unknown model {name!r}; catalogue: {sorted(models())}. Pass its config.json with "
                         "--model-config PATH (or add it to sim/data/models.json with its source)")
    return e
