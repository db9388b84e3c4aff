"""Line-by-line validation of the measured run format (``traces.runs`` reads, ``traces.runwriter`` writes).

One definition of a valid ``requests.jsonl`` object and ``timeseries.csv`` row, shared by the reader and the
writers, so neither writes what the reader refuses. A bad line becomes ``(field, problem)``; the reader turns it
into ``file:line: field F: problem`` (``traces.errors.TraceFormatError``). Checks against the whole run (clocks,
window, engine limits of gauges) are in ``traces.plausibility``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from .errors import INT32_MAX, TraceFormatError, decode_utf8, loads, unicode_problem, where

__all__ = ["ENGINE_GAUGES", "MAX_ABS_TIME_S", "REQUEST_FIELDS", "TIMESERIES_COLUMNS", "check_request",
           "check_tick", "check_tick_header", "engine_columns", "gauge_base", "request_lines"]

REQUEST_FIELDS = ("request_id", "input_toks", "output_toks", "arrival_time", "queued_ts", "scheduled_ts",
                  "first_token_ts", "last_token_ts")
TIME_FIELDS = REQUEST_FIELDS[3:]
# engine-clock fields must not go backwards in this order
ORDERED_TIME_FIELDS = ("queued_ts", "scheduled_ts", "first_token_ts", "last_token_ts")
# a collector talking HTTP cannot see the engine's first SCHEDULED event: null there means "not observed"
OPTIONAL_TIME_FIELDS = ("scheduled_ts",)
TIMESERIES_COLUMNS = ("t", "prompt_throughput", "gen_throughput", "running", "waiting", "kv_cache_pct")
#: optional per-engine gauge columns after ``TIMESERIES_COLUMNS`` (a data-parallel server; ``engine_columns``)
ENGINE_GAUGES = ("running", "waiting", "kv_cache_pct")
_ENGINE_COLUMN = re.compile(r"^(running|waiting|kv_cache_pct)_engine(\d+)$")
#: a timestamp beyond this many seconds (3,000 years) is no clock reading
MAX_ABS_TIME_S = 1e11


def check_request(obj: Any, seen: set[str], max_model_len: int | None = None) -> tuple[str | None, str | None]:
    """``(field, problem)`` of the first bad field of one request object, or ``(None, None)``.

    ``max_model_len`` (the run's, when recorded): vLLM refuses a request whose prompt and output do not fit it
    (``vllm/entrypoints/openai/serving_engine.py``), so a measured request never exceeds it.
    """
    if not isinstance(obj, dict):
        return None, f"expected a JSON object, got {type(obj).__name__}"
    for f in REQUEST_FIELDS:
        if f not in obj:
            return f, "missing"
    rid = obj["request_id"]
    if not isinstance(rid, str) or not rid:
        return "request_id", f"must be a non-empty string, got {rid!r}"
    bad = unicode_problem(obj)
    if bad is not None:
        return bad
    if rid in seen:
        return "request_id", f"duplicate request_id {rid!r}"
    for f in ("input_toks", "output_toks"):
        v = obj[f]
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            return f, f"must be an integer >= 1, got {v!r}"
        if v > INT32_MAX:
            return f, f"{v} tokens is more than vLLM can serve (at most {INT32_MAX:,}, int32 token counts)"
    if max_model_len is not None and obj["input_toks"] + obj["output_toks"] > max_model_len:
        return "output_toks", (f"input_toks {obj['input_toks']} + output_toks {obj['output_toks']} exceed the run's "
                               f"max_model_len {max_model_len}; vLLM refuses such a request, so it was not measured")
    for f in TIME_FIELDS:
        v = obj[f]
        if v is None and f in OPTIONAL_TIME_FIELDS:
            continue
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            return f, f"must be a finite number of seconds, got {v!r}"
        if abs(v) > MAX_ABS_TIME_S:
            return f, f"{v!r} s is no clock reading (expected seconds within +-{MAX_ABS_TIME_S:.0e})"
    present = [f for f in ORDERED_TIME_FIELDS if obj[f] is not None]
    for a, b in zip(present, present[1:], strict=False):
        if obj[b] < obj[a]:
            return b, f"{obj[b]!r} is before {a} {obj[a]!r} (engine timestamps must not go backwards)"
    return None, None


def request_lines(path: Path, skip_bad: bool,
                   max_model_len: int | None) -> tuple[list[dict], list[int], list[str]]:
    """The valid request objects of ``requests.jsonl``, their line numbers, and the messages of the bad lines
    skipped (``skip_bad``; without it the first bad line raises ``TraceFormatError``)."""
    rows: list[dict] = []
    linenos: list[int] = []
    seen: set[str] = set()
    skipped: list[str] = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = decode_utf8(raw, path, lineno)
                if not line.strip():
                    continue
                obj, problem, _ = loads(line)
                if problem is not None:
                    raise TraceFormatError(f"{where(path, lineno)}: {problem}")
                fld, problem = check_request(obj, seen, max_model_len)
                if problem is not None:
                    raise TraceFormatError(f"{where(path, lineno, fld)}: {problem}")
            except TraceFormatError as e:
                if not skip_bad:
                    raise
                skipped.append(str(e))
                continue
            seen.add(obj["request_id"])
            rows.append(obj)
            linenos.append(lineno)
    return rows, linenos, skipped


def engine_columns(num_engines: int) -> tuple[str, ...]:
    """The per-engine gauge columns of ``timeseries.csv`` for engines ``0..num_engines-1``."""
    return tuple(f"{k}_engine{i}" for i in range(num_engines) for k in ENGINE_GAUGES)


def check_tick_header(header: tuple[str, ...]) -> str | None:
    """What is wrong with a ``timeseries.csv`` header, or ``None``."""
    if header[:len(TIMESERIES_COLUMNS)] != TIMESERIES_COLUMNS:
        return (f"header must be {','.join(TIMESERIES_COLUMNS)} (then optionally per-engine columns "
                f"{'/'.join(ENGINE_GAUGES)}_engine<i>)")
    extra = header[len(TIMESERIES_COLUMNS):]
    bad = [c for c in extra if not _ENGINE_COLUMN.match(c)]
    if bad or len(set(extra)) != len(extra):
        return (f"after {','.join(TIMESERIES_COLUMNS)} only per-engine columns {'/'.join(ENGINE_GAUGES)}_engine<i> "
                f"may follow, each once; got {(bad or sorted(extra))[:10]}")
    return None


def gauge_base(column: str) -> str:
    """``running_engine1`` -> ``running``; other names unchanged."""
    m = _ENGINE_COLUMN.match(column)
    return m.group(1) if m else column


def check_tick(parts: list[str], prev_t: float,
               columns: tuple[str, ...] = TIMESERIES_COLUMNS) -> tuple[str | None, str | None, list[float]]:
    if len(parts) != len(columns):
        return None, f"expected {len(columns)} comma-separated fields, got {len(parts)}", []
    vals = []
    for name, text in zip(columns, parts, strict=True):
        try:
            v = float(text)
        except ValueError:
            return name, f"not a number: {text.strip()[:50]!r}", []
        if math.isnan(v) and name != "t":  # a tick whose scrape failed: not measured, never invented
            vals.append(v)
            continue
        if not math.isfinite(v) or v < 0:
            return name, f"must be a finite number >= 0 (or nan: not measured), got {text.strip()[:50]!r}", []
        vals.append(v)
    if vals[0] <= prev_t:
        return "t", f"ticks must increase ({vals[0]!r} after {prev_t!r})", []
    for i, name in enumerate(columns):
        base = gauge_base(name)
        if base in ("running", "waiting") and not math.isnan(vals[i]) and (
                vals[i] > INT32_MAX or vals[i] != int(vals[i])):
            return name, (f"must be a whole number of requests (at most {INT32_MAX:,}), got "
                          f"{parts[i].strip()[:50]!r}"), []
        if base == "kv_cache_pct" and vals[i] > 100:
            return name, f"is a percentage (0-100), got {parts[i].strip()[:50]!r}", []
    return None, None, vals
