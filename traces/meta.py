"""``meta.json`` of a measured run, and the engine settings it implies.

Settings resolve in this order (the first that has the field wins, and its source is recorded):
``resolved_config`` (the whole resolved ``VllmConfig``), then ``kv_cache``, then ``engine_kwargs``, then the
vLLM 0.19.0 defaults of ``docs/vllm.md#4-defaults``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from .errors import INT32_MAX, TraceFormatError, decode_utf8, line_of_key, loads, unicode_problem

__all__ = ["DEFAULT_SOURCE", "EngineSettings", "RunMeta", "TIMESTAMPS", "engine_settings", "parse_meta"]

#: how a setting's source starts when the run did not record it and vLLM's default is assumed
DEFAULT_SOURCE = "vLLM 0.19.0 default"

#: whose clock a run's request times are on (``collector.timestamps`` in ``meta.json``; ``"engine"`` when absent)
TIMESTAMPS = ("engine", "client")

_KNOWN = ("schema_version", "model", "vllm_version", "engine_kwargs", "dataset_path", "dataset_hash",
          "num_requests", "started_at", "finished_at", "tick_seconds", "kv_cache", "hardware", "resolved_config")


class _Where:
    def __init__(self, where: str, text: str | None):
        self.where, self.text = where, text

    def error(self, dotted: str, problem: str) -> TraceFormatError:
        """Point at the field's own line, or at its parent's when the field is missing."""
        line = None
        for key in reversed(dotted.split(".")):
            line = line_of_key(self.text, key)
            if line is not None:
                break
        loc = f"{self.where}:{line}" if line is not None else self.where
        return TraceFormatError(f"{loc}: field {dotted}: {problem}")


def _opt_dict(data: dict, key: str, w: _Where) -> dict | None:
    v = data.get(key)
    if v is not None and not isinstance(v, dict):
        raise w.error(key, f"must be an object or absent, got {type(v).__name__}")
    return v


@dataclass(frozen=True, kw_only=True)
class RunMeta:
    """The parsed ``meta.json`` (unknown keys are kept in ``extra``)."""

    schema_version: int = 1
    model: str
    vllm_version: str | None = None
    engine_kwargs: dict[str, Any]
    dataset_path: str | None = None
    dataset_hash: str | None = None
    num_requests: int | None = None
    started_at: str | None = None
    finished_at: str | None = None
    tick_seconds: float = 1.0
    kv_cache: dict[str, Any] | None = None
    hardware: dict[str, Any] | None = None
    resolved_config: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def timestamps(self) -> str:
        """Whose clock the request times are on: ``"engine"`` (vLLM's engine core, the default) or ``"client"``
        (``collector.timestamps``: a run collected over HTTP by ``traces.collect``)."""
        col = self.extra.get("collector")
        return col.get("timestamps", "engine") if isinstance(col, dict) else "engine"

    @property
    def started_at_epoch_s(self) -> float | None:
        return None if self.started_at is None else _epoch(self.started_at)

    @property
    def finished_at_epoch_s(self) -> float | None:
        return None if self.finished_at is None else _epoch(self.finished_at)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k in _KNOWN:
            v = getattr(self, k)
            if v is not None or k in ("vllm_version",):
                out[k] = v
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "meta.json", text: str | None = None) -> RunMeta:
        w = _Where(where, text)
        if not isinstance(data, dict):
            raise TraceFormatError(f"{where}: meta must be a JSON object, got {type(data).__name__}")
        bad = unicode_problem(data)
        if bad is not None:
            raise w.error(bad[0].split("[")[0], bad[1])
        model = data.get("model")
        if model is None and isinstance(data.get("engine_kwargs"), dict):
            model = data["engine_kwargs"].get("model")
        if not isinstance(model, str) or not model:
            raise w.error("model", f"must be a non-empty string (the served model), got {model!r}")
        ek = data.get("engine_kwargs")
        if not isinstance(ek, dict):
            raise w.error("engine_kwargs", f"must be an object with the engine's limits, got {ek!r}")
        tick = data.get("tick_seconds", 1.0)
        if not isinstance(tick, (int, float)) or isinstance(tick, bool) or not (tick > 0 and math.isfinite(tick)):
            raise w.error("tick_seconds", f"must be a positive number of seconds, got {tick!r}")
        for k in ("started_at", "finished_at"):
            v = data.get(k)
            if v is not None:
                problem = _time_problem(v)
                if problem is not None:
                    raise w.error(k, problem)
        n = data.get("num_requests")
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 0):
            raise w.error("num_requests", f"must be an integer >= 0, got {n!r}")
        col = data.get("collector")
        if col is not None and (not isinstance(col, dict) or col.get("timestamps", "engine") not in TIMESTAMPS):
            raise w.error("collector.timestamps", f"must be one of {TIMESTAMPS} (whose clock the request times are "
                          f"on), got {col.get('timestamps') if isinstance(col, dict) else col!r}")
        sv = data.get("schema_version", 1)
        if sv != 1:
            raise w.error("schema_version", f"version {sv!r} is not supported (expected 1)")
        return cls(schema_version=1, model=model, vllm_version=data.get("vllm_version"), engine_kwargs=ek,
                   dataset_path=data.get("dataset_path"), dataset_hash=data.get("dataset_hash"), num_requests=n,
                   started_at=data.get("started_at"), finished_at=data.get("finished_at"),
                   tick_seconds=float(tick), kv_cache=_opt_dict(data, "kv_cache", w),
                   hardware=_opt_dict(data, "hardware", w), resolved_config=_opt_dict(data, "resolved_config", w),
                   extra={k: v for k, v in data.items() if k not in _KNOWN})


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _time_problem(v: Any) -> str | None:
    """Why ``v`` is not a usable ``started_at``/``finished_at``, or ``None``. A time without a zone is refused,
    never read in the local zone of whoever reads it (which would move the run by hours)."""
    example = "2026-04-25T18:47:18.27Z"
    try:
        t = datetime.fromisoformat(v.replace("Z", "+00:00"))
    except (TypeError, ValueError, AttributeError):
        return f"must be an ISO-8601 time such as {example}, got {v!r}"
    if t.tzinfo is None:
        return f"{v!r} has no time zone; write it in UTC with a Z (e.g. {example}) or with an offset (+02:00)"
    return None


def parse_meta(path: str | Path) -> RunMeta:
    """Read and validate ``meta.json``; errors name the file, the line and the field."""
    path = Path(path)
    text = decode_utf8(path.read_bytes(), path)
    data, problem, line = loads(text)
    if problem is not None:
        raise TraceFormatError(f"{path}:{line}: {problem}")
    meta = RunMeta.from_dict(data, where=str(path), text=text)
    engine_settings(meta, where=str(path), text=text)  # fail early on bad limits
    return meta


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineSettings:
    """What the engine of a run was configured with (vLLM names). ``sources`` says where each value came from.

    ``max_model_len`` ``None`` means the model's default; ``num_gpu_blocks`` ``None`` means the run did not record
    its KV capacity (estimate it, and say so).

    Data parallelism: ``data_parallel_size`` engines behind ``api_server_count`` API servers (vLLM's
    ``--data-parallel-size``, ``--api-server-count``; the latter only from ``engine_kwargs``, default 1 as the
    ``vllm.entrypoints.openai.api_server`` module runs). vLLM's ``num_gpu_blocks`` is per engine (each profiles
    its own device); ``num_gpu_blocks_per_engine`` holds one per engine when the run recorded them
    (``kv_cache.num_gpu_blocks`` as a list, or ``kv_cache.num_gpu_blocks_per_engine`` as a list or an
    ``{"0": n, "1": m}`` object keyed by vLLM's ``engine`` label), and ``num_gpu_blocks`` is then engine 0's.
    """

    model: str
    tensor_parallel_size: int = 1
    enable_expert_parallel: bool = False
    data_parallel_size: int = 1
    api_server_count: int = 1
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int | None = None
    block_size: int = 16
    num_gpu_blocks: int | None = None
    enable_prefix_caching: bool = True
    scheduler_reserve_full_isl: bool = True
    long_prefill_token_threshold: int | None = None
    gpu_memory_utilization: float = 0.9
    dtype: str = "bfloat16"
    kv_cache_dtype: str = "auto"
    async_scheduling: bool | None = None
    policy: str = "fcfs"
    num_gpu_blocks_per_engine: tuple[int, ...] | None = None
    sources: dict[str, str] = field(default_factory=dict)

    def recorded(self, name: str) -> bool:
        """Whether the run recorded setting ``name`` (``False``: it is vLLM's default, assumed)."""
        return not self.sources.get(name, DEFAULT_SOURCE).startswith(DEFAULT_SOURCE)


# field -> (resolved_config section, kv_cache key, engine_kwargs key, default, kind)
_SETTINGS: dict[str, tuple[str | None, bool, bool, Any, str]] = {
    "tensor_parallel_size": ("parallel_config", False, True, 1, "pos_int"),
    "enable_expert_parallel": ("parallel_config", False, True, False, "bool"),
    "data_parallel_size": ("parallel_config", False, True, 1, "pos_int"),
    "api_server_count": (None, False, True, 1, "pos_int"),
    "max_num_seqs": ("scheduler_config", False, True, None, "pos_int"),
    "max_num_batched_tokens": ("scheduler_config", False, True, None, "pos_int"),
    "max_model_len": ("model_config", False, True, None, "opt_pos_int"),
    "block_size": ("cache_config", True, True, 16, "pos_int"),
    "num_gpu_blocks": ("cache_config", True, False, None, "opt_blocks"),
    "enable_prefix_caching": ("cache_config", True, True, True, "bool"),
    "scheduler_reserve_full_isl": ("scheduler_config", False, True, True, "bool"),
    "long_prefill_token_threshold": ("scheduler_config", False, True, None, "threshold"),
    "gpu_memory_utilization": ("cache_config", True, True, 0.9, "fraction"),
    "dtype": ("model_config", False, True, "bfloat16", "str"),
    "kv_cache_dtype": (None, False, True, "auto", "str"),
    "async_scheduling": ("scheduler_config", False, True, True, "opt_bool"),
    "policy": ("scheduler_config", False, True, "fcfs", "str"),
}


_INT32_WHY = "the largest count vLLM's model runner can hold (int32 tensors in vllm/v1/worker/gpu_model_runner.py)"
#: plausibility ceilings of the engine limits: vLLM's config takes any positive integer, but its model runner
#: allocates int32 buffers of these sizes, so a larger value was never served
_UPPER: dict[str, tuple[int, str]] = {
    "max_num_seqs": (INT32_MAX, _INT32_WHY),
    "max_num_batched_tokens": (INT32_MAX, _INT32_WHY),
    "max_model_len": (INT32_MAX, _INT32_WHY),
    "long_prefill_token_threshold": (INT32_MAX, _INT32_WHY),
    "num_gpu_blocks": (INT32_MAX, "the largest block id of vLLM's int32 block table (vllm/v1/worker/block_table.py)"),
    "block_size": (65536, "far above any KV block vLLM uses (attention kernels take 16 to 128 tokens; hybrid "
                          "Mamba models align attention blocks to a few thousand)"),
    "tensor_parallel_size": (65536, "more GPUs than any deployment has"),
}


_EXPECTED = {"pos_int": "an integer >= 1", "opt_pos_int": "an integer >= 1 or null",
             "opt_blocks": "an integer >= 2 or null", "threshold": "an integer >= 0 or null (0: off)",
             "bool": "true or false", "opt_bool": "true, false or null", "fraction": "a number in (0, 1]",
             "str": "a string"}


def _convert(kind: str, v: Any) -> tuple[bool, Any]:
    is_int = isinstance(v, int) and not isinstance(v, bool)
    if kind == "pos_int":
        return is_int and v >= 1, v
    if kind == "opt_pos_int":
        return v is None or (is_int and v >= 1), v
    if kind == "opt_blocks":
        return v is None or (is_int and v >= 2), v
    if kind == "threshold":  # vLLM writes 0 for "off"; "no limit" is None here
        return v is None or (is_int and v >= 0), (None if v in (None, 0) else v)
    if kind == "bool":
        return isinstance(v, bool), v
    if kind == "opt_bool":
        return v is None or isinstance(v, bool), v
    if kind == "fraction":
        return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1, v
    if isinstance(v, str) and v.startswith("torch."):
        v = v[len("torch."):]
    return isinstance(v, str), v


def _per_engine_blocks(meta: RunMeta, w: _Where) -> tuple[tuple[int, ...] | None, str | None]:
    """Per-engine ``num_gpu_blocks`` from ``kv_cache`` (a list, or an object keyed by engine index), if recorded."""
    kv = meta.kv_cache or {}
    for key in ("num_gpu_blocks", "num_gpu_blocks_per_engine"):
        v = kv.get(key)
        if isinstance(v, dict):
            if not v or not all(isinstance(k, str) and k.isdigit() for k in v):
                continue  # no engine label (a server without data parallelism): not per engine
            if sorted(int(k) for k in v) != list(range(len(v))):
                raise w.error(f"kv_cache.{key}", f"engine keys must be 0..{len(v) - 1}, got {sorted(v)}")
            v = [v[k] for k in sorted(v, key=int)]
        if isinstance(v, list):
            if not v or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 2 for b in v):
                raise w.error(f"kv_cache.{key}", f"per-engine capacities must be integers >= 2, got {v!r}")
            return tuple(v), f"kv_cache.{key} (per engine)"
    return None, None


def _with_data_parallel(values: dict, sources: dict, meta: RunMeta, w: _Where) -> None:
    """Fill the per-engine capacities and check them against ``data_parallel_size`` (inferring it if unrecorded)."""
    ek = meta.engine_kwargs.get("data_parallel_size")
    if (values["data_parallel_size"] == 1 and sources["data_parallel_size"].startswith("resolved")
            and isinstance(ek, int) and not isinstance(ek, bool) and ek > 1):
        # vLLM's run_engine_core resets a dense model's engine config to DP 1 (each rank is independent): a
        # config dumped from an engine says 1 where the server ran ek engines
        values["data_parallel_size"] = ek
        sources["data_parallel_size"] = "engine_kwargs.data_parallel_size (resolved_config says 1: an engine's own view)"
    per, src = _per_engine_blocks(meta, w)
    if per is None:
        return
    dp = values["data_parallel_size"]
    if len(per) != dp:
        if dp == 1 and "default" in sources["data_parallel_size"] and len(per) > 1:
            values["data_parallel_size"], sources["data_parallel_size"] = len(per), f"{src}: {len(per)} engines"
        else:
            raise w.error(src.split(" ")[0], f"has {len(per)} engines but data_parallel_size is {dp} "
                          f"({sources['data_parallel_size']}); record one capacity per engine")
    values["num_gpu_blocks_per_engine"] = per
    sources["num_gpu_blocks_per_engine"] = src
    if values["num_gpu_blocks"] is None:
        values["num_gpu_blocks"], sources["num_gpu_blocks"] = per[0], f"{src}: engine 0"


def engine_settings(meta: RunMeta, *, where: str = "meta.json", text: str | None = None) -> EngineSettings:
    """Resolve the engine settings of a run (see the module docstring for the precedence)."""
    w = _Where(where, text)
    rc = meta.resolved_config or {}
    values: dict[str, Any] = {"model": meta.engine_kwargs.get("model") or meta.model}
    sources: dict[str, str] = {"model": "meta.engine_kwargs.model" if meta.engine_kwargs.get("model") else "meta.model"}
    for name, (section, in_kv, in_kwargs, default, kind) in _SETTINGS.items():
        cands = []
        sec = rc.get(section) if section else None
        if isinstance(sec, dict) and name in sec:
            cands.append((f"resolved_config.{section}.{name}", sec[name]))
        if in_kv and meta.kv_cache is not None and name in meta.kv_cache and not (
                name == "num_gpu_blocks" and isinstance(meta.kv_cache[name], (list, dict))):  # per engine: below
            cands.append((f"kv_cache.{name}", meta.kv_cache[name]))
        if in_kwargs and name in meta.engine_kwargs:
            cands.append((f"engine_kwargs.{name}", meta.engine_kwargs[name]))
        # a null means "not recorded" (a collector cannot see every engine setting): use the next source,
        # then vLLM's default; only settings that may legitimately be None keep a null
        known = [c for c in cands if c[1] is not None]
        cands = known or (cands[-1:] if default is None and kind != "pos_int" else [])
        if cands:
            src, raw = cands[0]
        elif default is None and kind == "pos_int":
            raise w.error(f"engine_kwargs.{name}", "missing (the run's engine limits are required)")
        else:
            src = f"{DEFAULT_SOURCE} (docs/vllm.md#4-defaults); not recorded in {Path(where).name}"
            raw = default
        ok, val = _convert(kind, raw)
        fld = src.split(";")[0] if src.startswith(("resolved", "kv", "engine")) else name
        if not ok:
            raise w.error(fld, f"invalid value {raw!r} for {name}; expected {_EXPECTED[kind]}")
        if name in _UPPER and val is not None and val > _UPPER[name][0]:
            raise w.error(fld, f"{val} is more than {_UPPER[name][0]:,}, {_UPPER[name][1]}; expected the engine's "
                               "real setting")
        values[name], sources[name] = val, src
    if values["max_num_batched_tokens"] < values["max_num_seqs"]:
        raise w.error(sources["max_num_batched_tokens"].split(";")[0],
                      f"max_num_batched_tokens ({values['max_num_batched_tokens']}) must be at least max_num_seqs "
                      f"({values['max_num_seqs']}), as vLLM requires (SchedulerConfig.verify_max_model_len)")
    _with_data_parallel(values, sources, meta, w)
    if values["num_gpu_blocks"] is None:
        sources["num_gpu_blocks"] = "not recorded by the run (no kv_cache.num_gpu_blocks)"
    return EngineSettings(**values, sources=sources)
