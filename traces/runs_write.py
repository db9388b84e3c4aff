"""Writing a run directory in the measured format: the run's file names and validated writers.

Split out of ``traces.runs`` (which reads runs) to keep each file small. This module holds ``FILES`` (the run's
file names, docs/vllm.md#8-run-format), ``request_record`` and ``tick_line`` (one line of ``requests.jsonl`` or
``timeseries.csv``, checked as the reader will check it), ``check_meta`` (``meta.json``'s text, validated) and
``write_run`` (a whole run, validated before anything is written). ``traces.runs`` re-exports every name, and
``traces.runwriter`` streams a collection through the same line writers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .atomic import atomic_open, write_text
from .linecheck import (
    REQUEST_FIELDS,
    TIMESERIES_COLUMNS,
    check_request,
    check_tick,
    check_tick_header,
    gauge_base,
)
from .meta import RunMeta, engine_settings

__all__ = ["FILES", "check_meta", "request_record", "tick_line", "write_run"]

#: the run's files; ``failures`` (requests that failed, written by the collector) is not part of
#: docs/vllm.md#8-run-format
FILES = {"requests": "requests.jsonl", "timeseries": "timeseries.csv", "meta": "meta.json",
         "failures": "failures.jsonl"}


def _json_number(v: Any, integral: bool) -> Any:
    """numpy and float numbers as the JSON numbers the reader expects (``None`` stays ``None``)."""
    if v is None or isinstance(v, bool) or v is pd.NA:
        return None if v is pd.NA else v
    if isinstance(v, (float, np.floating)) and math.isnan(v):
        return None
    if integral:
        return int(v) if isinstance(v, (int, np.integer, float, np.floating)) and float(v).is_integer() else v
    return float(v) if isinstance(v, (int, float, np.integer, np.floating)) else v


def request_record(row: Mapping[str, Any], seen: set[str] | None = None, *, extras: bool = False) -> dict:
    """One request as a line of ``requests.jsonl``: the ``REQUEST_FIELDS`` in order (numbers normalised), then,
    with ``extras``, the row's other keys (the collector's ``itls``...). ``seen`` collects the ids written so far.

    Raises:
        ValueError: a field the reader would reject (the message names it).
    """
    missing = [f for f in REQUEST_FIELDS if f not in row]
    if missing:
        raise ValueError(f"request lacks field(s) {missing}")
    out = {f: _json_number(row[f], f in ("input_toks", "output_toks")) if f != "request_id" else row[f]
           for f in REQUEST_FIELDS}
    fld, problem = check_request(out, seen if seen is not None else set())
    if problem is not None:
        raise ValueError(f"field {fld}: {problem} (request_id {row.get('request_id')!r})")
    if seen is not None:
        seen.add(out["request_id"])
    if extras:
        out.update({k: v for k, v in row.items() if k not in out})
    return out


def tick_line(values: Iterable[Any], prev_t: float = -math.inf,
              columns: tuple[str, ...] = TIMESERIES_COLUMNS) -> str:
    """One row of ``timeseries.csv`` (``columns`` order: ``TIMESERIES_COLUMNS``, then any ``engine_columns``;
    ``None``/NaN = not measured, written ``nan``).

    Raises:
        ValueError: a value the reader would reject, or ``t`` not after ``prev_t``.
    """
    problem = check_tick_header(tuple(columns))
    if problem is not None:
        raise ValueError(f"timeseries columns: {problem}")
    parts = []
    for name, v in zip(columns, values, strict=True):
        if v is None or v is pd.NA or (isinstance(v, (float, np.floating)) and math.isnan(v)):
            parts.append("nan")
        elif gauge_base(name) in ("running", "waiting") and float(v).is_integer():
            parts.append(str(int(v)))  # queue lengths are counts, written as in the measured runs
        else:
            parts.append(repr(float(v)))
    fld, problem, _ = check_tick(parts, prev_t, tuple(columns))
    if problem is not None:
        raise ValueError(f"timeseries tick {parts[0]}: field {fld}: {problem}")
    return ",".join(parts)


def check_meta(meta: RunMeta | Mapping[str, Any]) -> str:
    """``meta.json``'s text, validated as ``read_run`` will validate it (model, engine limits, times).

    Raises:
        ValueError: what is missing or malformed (``TraceFormatError`` is a ``ValueError``).
    """
    meta_dict = meta.to_dict() if isinstance(meta, RunMeta) else dict(meta)
    text = json.dumps(meta_dict, indent=2)
    parsed = RunMeta.from_dict(json.loads(text), where="meta.json", text=text)
    engine_settings(parsed, where="meta.json", text=text)
    return text + "\n"


def write_run(run_dir: str | Path, *, requests: pd.DataFrame | Iterable[Mapping[str, Any]],
              meta: RunMeta | Mapping[str, Any], timeseries: pd.DataFrame | None = None) -> Path:
    """Write a run directory in the measured format (the files ``read_run`` reads).

    Args:
        run_dir: the directory (created if needed; existing run files are overwritten).
        requests: one record per request with the ``REQUEST_FIELDS`` (a DataFrame or mappings), arrival order.
        meta: a ``RunMeta`` or the ``meta.json`` object (needs ``model`` and ``engine_kwargs``).
        timeseries: ticks with the ``TIMESERIES_COLUMNS`` (``kv_cache_pct`` in percent), and any per-engine
            columns (``engine_columns``), or ``None``.

    Returns:
        The directory. Everything is validated first; on a ``ValueError`` nothing has been written.
    """
    d = Path(run_dir)
    if isinstance(requests, pd.DataFrame):
        missing = [f for f in REQUEST_FIELDS if f not in requests.columns]
        if missing:
            raise ValueError(f"write_run: requests lack column(s) {missing}")
        requests = requests[list(REQUEST_FIELDS)].to_dict("records")
    seen: set[str] = set()
    rows = []
    for i, r in enumerate(requests):
        try:
            rows.append(request_record(r, seen))
        except ValueError as e:
            raise ValueError(f"write_run: request {i}: {e}") from None
    try:
        meta_text = check_meta(meta)
    except ValueError as e:
        raise ValueError(f"write_run: {e}") from None
    ts_lines = None if timeseries is None else _timeseries_lines(timeseries)
    with atomic_open(d / FILES["requests"], "w", newline="\n") as f:  # each file whole or not at all
        for r in rows:
            f.write(json.dumps(r) + "\n")
    write_text(d / FILES["meta"], meta_text)
    if ts_lines is not None:
        write_text(d / FILES["timeseries"], "\r\n".join(ts_lines) + "\r\n", newline="")
    return d


def _timeseries_lines(ts: pd.DataFrame) -> list[str]:
    missing = [c for c in TIMESERIES_COLUMNS if c not in ts.columns]
    if missing:
        raise ValueError(f"write_run: timeseries lacks column(s) {missing}")
    cols = TIMESERIES_COLUMNS + tuple(c for c in ts.columns if gauge_base(str(c)) != str(c))
    lines = [",".join(cols)]
    prev = -math.inf
    for i, row in enumerate(ts[list(cols)].itertuples(index=False)):
        try:
            lines.append(tick_line(row, prev, cols))
        except ValueError as e:
            raise ValueError(f"write_run: timeseries row {i}: {e}") from None
        prev = float(row[0])
    return lines
