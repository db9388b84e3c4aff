"""Reader of ``vllm bench serve --save-result [--save-detailed]`` result JSON (``vllm/benchmarks/serve.py``).

The file holds run metadata (``date``, ``backend``, ``model_id``, ``num_prompts``, ``request_rate`` — the string
``"inf"`` allowed —, ``burstiness``, ``max_concurrency``, any ``--metadata`` pairs), aggregates (``duration``,
``completed``, ``failed``, ``*_throughput``, ``{mean,median,std,p<P>}_{ttft,tpot,itl,e2el}_ms``) and, with
``--save-detailed``, one entry per request in parallel arrays: ``input_lens``, ``output_lens``, ``ttfts`` (s),
``itls`` (list of gaps, s), ``start_times``, ``generated_texts``, ``errors``, and in recent versions ``latencies``
(s) and ``queue_times``. Without ``--save-detailed`` the per-request arrays are absent and ``requests`` is
``None``. All times are client-side, from the HTTP send (``docs/vllm.md#7-bench-serve-json``).

Per request, TPOT = (latency - ttft)/(output_len - 1) when ``latencies`` exist, else the mean of ``itls``;
E2E = latency, else ttft + sum(itls). A failed request (non-empty error) keeps its row with ``success`` False.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .errors import TraceFormatError, line_of_key

__all__ = ["BenchResult", "PER_REQUEST_ARRAYS", "read_bench_result"]

PER_REQUEST_ARRAYS = ("input_lens", "output_lens", "ttfts", "itls", "start_times", "generated_texts", "errors",
                      "latencies", "queue_times")
_METADATA = ("date", "backend", "label", "model_id", "tokenizer_id", "num_prompts", "request_rate", "burstiness",
             "max_concurrency", "ramp_up_strategy", "ramp_up_start_rps", "ramp_up_end_rps")


@dataclass(frozen=True, eq=False, kw_only=True)
class BenchResult:
    """A parsed result file.

    Attributes:
        path: the file.
        metadata: run metadata (``request_rate`` as a float, ``inf`` for ``"inf"``) and ``--metadata`` pairs.
        aggregates: every numeric top-level figure (durations in s, latencies in ms as vLLM writes them).
        requests: one row per request (``input_len``, ``output_len``, ``ttft_s``, ``tpot_s``, ``e2e_s``,
            ``start_time_s``, ``num_itls``, ``error``, ``success``), or ``None`` without ``--save-detailed``.
        itls: per request, the inter-token gaps in seconds (``None`` without ``--save-detailed``).
        skipped: requests dropped as malformed with ``skip_bad=True``.
    """

    path: Path
    metadata: dict[str, Any]
    aggregates: dict[str, float]
    requests: pd.DataFrame | None
    itls: list[list[float]] | None
    skipped: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def detailed(self) -> bool:
        return self.requests is not None


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_entry(name: str, v: Any) -> str | None:
    """Problem with one element of a per-request array, or ``None``."""
    if name in ("input_lens", "output_lens"):
        return None if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else f"must be an integer >= 0, got {v!r}"
    if name in ("ttfts", "latencies", "queue_times", "start_times"):
        return None if v is None or (_is_num(v) and (name == "start_times" or v >= 0)) else \
            f"must be a number of seconds >= 0 (or null), got {v!r}"
    if name == "itls":
        if not isinstance(v, list):
            return f"must be a list of gaps in seconds, got {type(v).__name__}"
        bad = next((x for x in v if not (_is_num(x) and x >= 0)), None)
        return None if bad is None else f"holds {bad!r}; every gap must be a number of seconds >= 0"
    if name in ("errors", "generated_texts"):
        return None if v is None or isinstance(v, str) else f"must be a string, got {type(v).__name__}"
    return None


def _arrays(data: dict, path: Path, text: str, skip_bad: bool) -> tuple[dict[str, list], int]:
    present = [a for a in PER_REQUEST_ARRAYS if a in data]
    for a in present:
        if not isinstance(data[a], list):
            raise TraceFormatError(f"{path}:{line_of_key(text, a)}: field {a}: must be a list, one entry per request")
    n = len(data[present[0]])
    for a in present:
        if len(data[a]) != n:
            raise TraceFormatError(f"{path}:{line_of_key(text, a)}: field {a}: has {len(data[a])} entries but "
                                   f"{present[0]} has {n}; per-request arrays must have equal lengths")
    keep = np.ones(n, bool)
    for a in present:
        for i, v in enumerate(data[a]):
            problem = _check_entry(a, v)
            if problem is not None:
                if not skip_bad:
                    raise TraceFormatError(f"{path}:{line_of_key(text, a)}: field {a}[{i}]: {problem}")
                keep[i] = False
    return {a: [v for v, k in zip(data[a], keep, strict=True) if k] for a in present}, int((~keep).sum())


def _frame(arr: dict[str, list]) -> tuple[pd.DataFrame, list[list[float]]]:
    n = len(next(iter(arr.values())))
    col = lambda name, default: arr.get(name, [default] * n)  # noqa: E731
    inp = np.array(col("input_lens", 0), np.int64)
    out = np.array(col("output_lens", 0), np.int64)
    ttft = np.array([np.nan if v is None else v for v in col("ttfts", None)], np.float64)
    itls = [list(map(float, x)) for x in col("itls", [])]
    err = ["" if e is None else e for e in col("errors", "")]
    if "latencies" in arr:
        e2e = np.array([np.nan if v is None else v for v in arr["latencies"]], np.float64)
    else:
        e2e = ttft + np.array([sum(x) for x in itls])
    tpot = np.where(out > 1, (e2e - ttft) / np.maximum(out - 1, 1), 0.0)
    df = pd.DataFrame({"input_len": inp, "output_len": out, "ttft_s": ttft, "tpot_s": tpot, "e2e_s": e2e,
                       "start_time_s": np.array([np.nan if v is None else v for v in col("start_times", None)],
                                                np.float64),
                       "num_itls": np.array([len(x) for x in itls], np.int64), "error": err})
    df["success"] = (df["error"] == "") & np.isfinite(ttft)
    return df, itls


def read_bench_result(path: str | Path, *, skip_bad: bool = False) -> BenchResult:
    """Read and validate one result file; errors name the file, the line of the field and the field[index]."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise TraceFormatError(f"{path}:{e.lineno}: invalid JSON at column {e.colno}: {e.msg}") from None
    if not isinstance(data, dict):
        raise TraceFormatError(f"{path}: a bench result must be a JSON object")
    meta = {k: data[k] for k in _METADATA if k in data}
    rate = meta.get("request_rate")
    if isinstance(rate, str):
        if rate.strip().lower() != "inf":
            raise TraceFormatError(f"{path}:{line_of_key(text, 'request_rate')}: field request_rate: must be a "
                                   f"number or \"inf\", got {rate!r}")
        meta["request_rate"] = math.inf
    aggregates = {k: float(v) for k, v in data.items()
                  if k not in PER_REQUEST_ARRAYS and k not in _METADATA and _is_num(v)}
    extra = {k: v for k, v in data.items() if k not in PER_REQUEST_ARRAYS and k not in _METADATA
             and k not in aggregates}
    if not any(a in data for a in PER_REQUEST_ARRAYS if a != "errors"):
        return BenchResult(path=path, metadata={**meta, **_user_metadata(extra)}, aggregates=aggregates,
                           requests=None, itls=None, extra=extra)
    arr, skipped = _arrays(data, path, text, skip_bad)
    df, itls = _frame(arr)
    return BenchResult(path=path, metadata={**meta, **_user_metadata(extra)}, aggregates=aggregates, requests=df,
                       itls=itls, skipped=skipped, extra=extra)


def _user_metadata(extra: dict) -> dict:
    """``--metadata KEY=VALUE`` pairs land as top-level strings; keep them with the metadata."""
    return {k: v for k, v in extra.items() if isinstance(v, str)}
