"""Serving profiles: small JSON files that pin hardware, model, parallelism, engine limits, step-time
coefficients and per-request overheads, each number with its source.

Embedded profiles live in ``sim/profiles/*.json`` and load by name (``load_profile("h100-llama-3.1-8b")``);
any other profile loads by path. Schema (``schema_version`` 1)::

    {"schema_version": 1, "name": str, "description": str,
     "hardware": {"name", "peak_flops", "mem_bw_bytes_per_s", "memory_bytes", "interconnect_bw_bytes_per_s"?,
                  "interconnect"?, "kind"? ("gpu" | "cpu")},
     "model": {"name", "num_layers", "hidden_size", "num_q_heads", "num_kv_heads", "head_dim",
               "num_params", "embedding_params", "dtype_bytes",
               MoE and MLA, optional: "active_params", "num_experts", "num_experts_per_tok",
               "num_shared_experts", "kv_latent_dim"},
     "parallel": {"tensor_parallel_size", "expert_parallel"?, "data_parallel_size"?},
     "engine": {EngineConfig fields},
     "latency": {"model": "physics" | "linear", "coefficients": {name: value}},
     "overheads": {"frontend_s", "post_decode_s", "per_output_token_s"},
     "sources": {"<section>.<field>" or "<section>": str},
     "derived_from": {...}?}

``hardware`` and ``model`` may be absent (``None``) only with the shape-free latency model ``"linear"``
(``sim.latency_linear``), which needs neither; the physics model refuses a profile without them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from .config import EngineConfig, HardwareSpec, ModelSpec, Overheads, ParallelConfig
from .latency_linear import LINEAR_MODEL

__all__ = ["Profile", "ProfileError", "list_profiles", "load_profile", "profile_from_dict", "profile_path"]

SCHEMA_VERSION = 1


class ProfileError(ValueError):
    """A profile file that cannot be used; the message names the file and the field."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Profile:
    name: str
    description: str = ""
    hardware: HardwareSpec | None = None
    model: ModelSpec | None = None
    parallel: ParallelConfig = ParallelConfig()
    engine: EngineConfig
    latency_model: str = "physics"
    latency_coefficients: dict[str, float] = field(default_factory=dict)
    overheads: Overheads = Overheads()
    sources: dict[str, str] = field(default_factory=dict)
    derived_from: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        missing = [k for k in ("hardware", "model") if getattr(self, k) is None]
        if missing and self.latency_model != LINEAR_MODEL:
            raise ValueError(f"profile {self.name!r}: latency model {self.latency_model!r} needs the profile's "
                             f"{' and '.join(missing)} (its basis is built from the GPU's peak rates and the model's "
                             f"shape); give {'it' if len(missing) == 1 else 'them'}, or use the shape-free latency model {LINEAR_MODEL!r}")

    def to_dict(self) -> dict[str, Any]:
        ov = {f.name: getattr(self.overheads, f.name) for f in fields(Overheads) if f.name != "sources"}
        out: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "name": self.name,
            "description": self.description,
            **({} if self.hardware is None else {"hardware": _compact(self.hardware)}),
            **({} if self.model is None else {"model": _compact(self.model)}),
            "parallel": _compact(self.parallel),
            "engine": asdict(self.engine),
            "latency": {"model": self.latency_model, "coefficients": dict(self.latency_coefficients)},
            "overheads": ov,
            "sources": dict(self.sources),
        }
        if self.derived_from is not None:
            out["derived_from"] = self.derived_from
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    def replace(self, **changes: Any) -> Profile:
        """A new profile with some top-level fields replaced (configs are never mutated)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update(changes)
        return Profile(**d)


#: optional fields added after schema 1 was first written: left out of a profile's JSON while at their
#: defaults, so a dense single-GPU profile writes exactly what it wrote before
_OPTIONAL_FIELDS = {HardwareSpec: ("interconnect", "kind"),
                    ModelSpec: ("active_params", "num_experts", "num_experts_per_tok", "num_shared_experts",
                                "kv_latent_dim"),
                    ParallelConfig: ("expert_parallel", "data_parallel_size")}


def _compact(config) -> dict[str, Any]:
    out = asdict(config)
    defaults = {f.name: f.default for f in fields(config)}
    for name in _OPTIONAL_FIELDS[type(config)]:
        if out[name] == defaults[name]:
            del out[name]
    return out


def _section(data: dict, key: str, where: str) -> dict:
    if key not in data:
        hint = (f" (only the shape-free latency model {LINEAR_MODEL!r} runs without it)"
                if key in ("hardware", "model") else "")
        raise ProfileError(f"{where}: missing section {key!r}{hint}")
    v = data[key]
    if not isinstance(v, dict):
        raise ProfileError(f"{where}: section {key!r} must be an object, got {type(v).__name__}")
    return v


def _build(cls, values: dict, where: str, section: str):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ProfileError(f"{where}: unknown field(s) {unknown} in {section!r}; known: {sorted(known)}")
    try:
        return cls(**values)
    except TypeError as e:  # missing required field
        raise ProfileError(f"{where}: section {section!r}: {e}") from None
    except ValueError as e:
        raise ProfileError(f"{where}: section {section!r}: {e}") from None


def profile_from_dict(data: dict, where: str = "<profile>") -> Profile:
    """Validate and build a profile; every error names ``where`` and the offending field."""
    if not isinstance(data, dict):
        raise ProfileError(f"{where}: a profile must be a JSON object")
    version = data.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise ProfileError(f"{where}: schema_version {version!r} is not supported (expected {SCHEMA_VERSION})")
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise ProfileError(f"{where}: field 'name' must be a non-empty string")
    lat = _section(data, "latency", where)
    shape_free = lat.get("model", "physics") == LINEAR_MODEL
    hardware = None if shape_free and "hardware" not in data else _build(
        HardwareSpec, _section(data, "hardware", where), where, "hardware")
    model = None if shape_free and "model" not in data else _build(
        ModelSpec, _section(data, "model", where), where, "model")
    parallel = _build(ParallelConfig, data.get("parallel", {}), where, "parallel")
    engine = _build(EngineConfig, _section(data, "engine", where), where, "engine")
    coeffs = lat.get("coefficients", {})
    if not isinstance(coeffs, dict):
        raise ProfileError(f"{where}: latency.coefficients must be an object")
    overheads = _build(Overheads, data.get("overheads", {}), where, "overheads")
    prof = Profile(
        name=name,
        description=str(data.get("description", "")),
        hardware=hardware,
        model=model,
        parallel=parallel,
        engine=engine,
        latency_model=str(lat.get("model", "physics")),
        latency_coefficients={str(k): v for k, v in coeffs.items()},
        overheads=overheads,
        sources=dict(data.get("sources", {})),
        derived_from=data.get("derived_from"),
    )
    # Build the step-time model once so that bad coefficients fail here, naming the file.
    from .latency import make_step_time_model

    try:
        make_step_time_model(prof)
    except ValueError as e:
        raise ProfileError(f"{where}: latency: {e}") from None
    return prof


def _embedded_dir():
    return resources.files("sim") / "profiles"


def list_profiles() -> list[str]:
    """Names of the embedded profiles."""
    return sorted(p.name[:-5] for p in _embedded_dir().iterdir() if p.name.endswith(".json"))


def profile_path(name: str) -> Path:
    return Path(str(_embedded_dir() / f"{name}.json"))


def load_profile(name_or_path: str | Path) -> Profile:
    """Load an embedded profile by name, or any profile JSON by path."""
    p = Path(name_or_path)
    if p.suffix == ".json" or p.exists():
        if not p.exists():
            raise ProfileError(f"{p}: no such profile file")
        where = str(p)
        text = p.read_text()
    else:
        names = list_profiles()
        if str(name_or_path) not in names:
            raise ProfileError(f"unknown profile {str(name_or_path)!r}; embedded profiles: {names} (or give a path to a .json file)")
        where = f"sim/profiles/{name_or_path}.json"
        text = (_embedded_dir() / f"{name_or_path}.json").read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ProfileError(f"{where}: line {e.lineno} column {e.colno}: invalid JSON: {e.msg}") from None
    return profile_from_dict(data, where)
