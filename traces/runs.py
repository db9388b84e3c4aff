"""The measured vLLM run format (``shared/traces/vllm/<run>/``): a typed reader and a writer.

A run directory holds three files (``docs/vllm.md#8-run-format``)::

    requests.jsonl   one JSON object per request, arrival order; LF line ends
                     request_id, input_toks, output_toks,
                     arrival_time                                  epoch seconds, wall clock, API frontend
                     queued_ts, scheduled_ts, first_token_ts, last_token_ts
                                                                   monotonic seconds, engine-core clock
    timeseries.csv   t,prompt_throughput,gen_throughput,running,waiting,kv_cache_pct; CRLF line ends;
                     one row per tick; kv_cache_pct in percent (0-100); a data-parallel server's gauges
                     summed over engines (KV usage averaged), optionally followed by per-engine columns
                     running_engine<i>,waiting_engine<i>,kv_cache_pct_engine<i> (i = vLLM's engine label)
    meta.json        engine_kwargs, optional kv_cache / hardware / resolved_config, ...

**Two clocks.** ``arrival_time`` and the ``*_ts`` fields come from different clocks; every interval is computed
on the monotonic fields only (TTFT = first - queued, TPOT = (last - first)/(n_out - 1), E2E = last - queued,
queue = scheduled - queued). ``offset_s = queued_ts - min(queued_ts)`` is where a replay injects a request.

**Engine-side or client-side.** A run recorded by vLLM itself has engine-core timestamps. A run collected over
HTTP (``traces.collect``, ``meta.collector.timestamps = "client"``) has the client's send and output-chunk times
instead: ``scheduled_ts`` is null and TTFT/E2E include HTTP and the API server's frontend (``MeasuredRun.timestamps``).

This module (with ``traces.linecheck``, the line rules, and ``traces.plausibility``, the whole-run rules) is
the one definition of the format: ``read_run`` validates everything (a bad line raises
``TraceFormatError`` naming the file, the line and the field, unless ``skip_bad=True``, in which case bad lines
are counted in ``MeasuredRun.skipped``); ``write_run`` writes a whole run and ``traces.runwriter`` streams one,
both through ``request_record`` / ``tick_line`` / ``check_meta``, so neither writes what the reader rejects.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import TraceFormatError, decode_utf8, where
from .linecheck import (
    ENGINE_GAUGES,
    ORDERED_TIME_FIELDS,
    REQUEST_FIELDS,
    TIME_FIELDS,
    TIMESERIES_COLUMNS,
    check_tick,
    check_tick_header,
    engine_columns,
    gauge_base,
    request_lines,
)
from .meta import EngineSettings, RunMeta, engine_settings, parse_meta
from .plausibility import RunBounds, request_problems, run_bounds, tick_problem
from .runs_write import FILES, check_meta, request_record, tick_line, write_run  # noqa: F401

__all__ = [
    "ENGINE_GAUGES",
    "EngineSettings",
    "FILES",
    "MeasuredRun",
    "REQUEST_FIELDS",
    "RunMeta",
    "TIMESERIES_COLUMNS",
    "check_meta",
    "engine_columns",
    "read_run",
    "read_requests",
    "read_timeseries",
    "request_record",
    "sha256_file",
    "tick_line",
    "write_run",
]

_RUN_FILES = ("requests", "timeseries", "meta")
#: skipped lines whose message ``MeasuredRun.skipped_detail`` keeps, per file
SKIPPED_DETAIL = 20


@dataclass(frozen=True, eq=False, kw_only=True)
class MeasuredRun:
    """One measured run, validated.

    Attributes:
        path: the run directory.
        name: the directory name (e.g. ``rtx4090-llama-3.1-8b``).
        requests: one row per request in file order: the ``REQUEST_FIELDS`` plus ``offset_s`` (injection time
            of a replay), ``ttft_s``, ``tpot_s``, ``e2e_s`` and ``queue_s`` (run-format definitions).
        timeseries: the ticks (``TIMESERIES_COLUMNS`` plus ``kv_cache_usage_perc`` in 0-1), or ``None`` when
            the run has no ``timeseries.csv``.
        meta: the parsed ``meta.json``.
        engine: the engine settings the run was served with, each with its source.
        file_sha256: SHA-256 of every file read, by file name.
        skipped: bad lines skipped per file (only with ``skip_bad=True``).
        skipped_detail: per file, the messages (``file:line: field F: ...``) of the first skipped lines.
    """

    path: Path
    name: str
    requests: pd.DataFrame
    timeseries: pd.DataFrame | None
    meta: RunMeta
    engine: EngineSettings
    file_sha256: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_detail: dict[str, list[str]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def timestamps(self) -> str:
        """``"engine"`` (vLLM's engine-core clock) or ``"client"`` (collected over HTTP; ``meta.collector``)."""
        return self.meta.timestamps

    @property
    def client_side(self) -> bool:
        return self.meta.timestamps == "client"

    @property
    def num_gpu_blocks(self) -> int | None:
        """The measured KV capacity (``kv_cache.num_gpu_blocks``), or ``None`` when the run lacks it."""
        return self.engine.num_gpu_blocks

    @property
    def kv_cache_recorded(self) -> bool:
        """Whether ``kv_cache_pct`` holds a measurement (a column of zeros means it was not recorded)."""
        ts = self.timeseries
        return ts is not None and len(ts) > 0 and bool((ts["kv_cache_pct"] > 0).any())

    @property
    def prompt_tokens(self) -> np.ndarray:
        return self.requests["input_toks"].to_numpy(np.int64)

    @property
    def output_tokens(self) -> np.ndarray:
        return self.requests["output_toks"].to_numpy(np.int64)

    @property
    def offsets_s(self) -> np.ndarray:
        """Engine-side injection times of a replay: ``queued_ts - min(queued_ts)``."""
        return self.requests["offset_s"].to_numpy(np.float64)

    @property
    def tick_origin_s(self) -> float:
        """Replay time of timeseries tick ``t = 0``: the run's start relative to its first arrival.

        Ticks count from ``meta.started_at`` (wall clock); the first arrival is at ``min(arrival_time)`` on the
        same clock, so tick ``t`` is replay time ``t + tick_origin_s``. Zero when ``started_at`` is absent.
        """
        start = self.meta.started_at_epoch_s
        if start is None:
            return 0.0
        return float(start - self.requests["arrival_time"].min())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- requests

def read_requests(path: str | Path, *, skip_bad: bool = False,
                  max_model_len: int | None = None) -> tuple[pd.DataFrame, int]:
    """Read ``requests.jsonl``; return the validated rows and the number of bad lines skipped.

    Each line is checked on its own (``read_run`` also checks the requests against each other and the run's
    window: ``traces.plausibility``).
    """
    path = Path(path)
    rows, _, bad = request_lines(path, skip_bad, max_model_len)
    if not rows:
        raise TraceFormatError(f"{path}: no requests" + (f" ({len(bad)} bad lines skipped)" if bad else ""))
    return _requests_frame(rows), len(bad)


def _requests_frame(rows: list[dict]) -> pd.DataFrame:
    extra = [k for k in rows[0] if k not in REQUEST_FIELDS]
    df = pd.DataFrame({f: [r[f] for r in rows] for f in REQUEST_FIELDS})
    for k in extra:  # unknown fields are kept, never dropped
        df[k] = [r.get(k) for r in rows]
    df["input_toks"] = df["input_toks"].astype(np.int64)
    df["output_toks"] = df["output_toks"].astype(np.int64)
    for f in TIME_FIELDS:
        df[f] = df[f].astype(np.float64)
    q, s, ft, lt = (df[f].to_numpy() for f in ORDERED_TIME_FIELDS)
    n = df["output_toks"].to_numpy()
    df["offset_s"] = q - q.min()
    df["ttft_s"] = ft - q
    df["tpot_s"] = np.where(n > 1, (lt - ft) / np.maximum(n - 1, 1), 0.0)
    df["e2e_s"] = lt - q
    df["queue_s"] = s - q
    return df


# ---------------------------------------------------------------------------------------------- timeseries
def read_timeseries(path: str | Path, *, skip_bad: bool = False,
                    bounds: RunBounds | None = None) -> tuple[pd.DataFrame, int]:
    """Read ``timeseries.csv`` (CRLF or LF); return the validated ticks and the number of bad lines skipped.

    ``bounds`` (from the run's ``meta.json``, ``traces.plausibility``) also refuses gauges beyond the engine's limits
    and ticks outside the run's window.
    """
    df, bad = _read_ticks(Path(path), skip_bad, bounds)
    return df, len(bad)


def _read_ticks(path: Path, skip_bad: bool, bounds: RunBounds | None) -> tuple[pd.DataFrame, list[str]]:
    """The ticks and the messages of the bad lines skipped."""
    lines = decode_utf8(path.read_bytes(), path).splitlines()
    header = tuple(h.strip() for h in lines[0].split(",")) if lines else ()
    problem = check_tick_header(header) if header else "empty file"
    if problem is not None:
        raise TraceFormatError(f"{where(path, 1)}: {problem}, got {lines[0][:200] if lines else '<empty file>'!r}")
    data, skipped, prev_t = [], [], -math.inf
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fld, problem, vals = check_tick(line.split(","), prev_t, header)
        if problem is None and bounds is not None:
            fld, problem = tick_problem(vals, bounds)
        if problem is not None:
            msg = f"{where(path, lineno, fld)}: {problem}"
            if not skip_bad:
                raise TraceFormatError(msg)
            skipped.append(msg)
            continue
        prev_t = vals[0]
        data.append(vals)
    df = pd.DataFrame(np.array(data, dtype=np.float64).reshape(-1, len(header)), columns=list(header))
    for c in header:  # counts; nullable where a scrape failed (nan = not measured)
        if gauge_base(c) in ("running", "waiting"):
            df[c] = df[c].astype(np.int64) if df[c].notna().all() else df[c].astype("Int64")
    df["kv_cache_usage_perc"] = df["kv_cache_pct"] / 100.0
    for c in header[len(TIMESERIES_COLUMNS):]:
        if c.startswith("kv_cache_pct_engine"):
            df["kv_cache_usage_perc_engine" + c[len("kv_cache_pct_engine"):]] = df[c] / 100.0
    return df, skipped


# ---------------------------------------------------------------------------------------------- run
def read_run(run_dir: str | Path, *, skip_bad: bool = False) -> MeasuredRun:
    """Read and validate one run directory (``requests.jsonl``, ``meta.json``, optional ``timeseries.csv``).

    Every line is checked on its own, then against the run (``traces.plausibility``: the clocks agree, times lie
    inside the run's window, gauges within the engine's limits).

    Args:
        run_dir: the directory.
        skip_bad: skip bad request and tick lines instead of raising, and count them in ``skipped``
            (``maslat replay|calibrate --skip-bad-lines``). A bad ``meta.json`` is always refused.

    Raises:
        FileNotFoundError: the directory or a required file is missing.
        TraceFormatError: malformed or implausible content (file, line and field in the message).
    """
    d = Path(run_dir)
    expected = ", ".join(FILES[k] for k in _RUN_FILES)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: not a run directory (expected {expected})")
    for key in ("requests", "meta"):
        if not (d / FILES[key]).is_file():
            raise FileNotFoundError(f"{d / FILES[key]}: missing; a run directory holds {expected}")
    meta = parse_meta(d / FILES["meta"])
    engine = engine_settings(meta, where=str(d / FILES["meta"]))
    bounds = run_bounds(meta, engine)
    requests, bad_req = _read_checked_requests(d / FILES["requests"], skip_bad, engine.max_model_len, bounds)
    ts_path = d / FILES["timeseries"]
    timeseries, bad_ts = _read_ticks(ts_path, skip_bad, bounds) if ts_path.is_file() else (None, [])
    shas = {p.name: sha256_file(p) for p in (d / FILES[k] for k in _RUN_FILES) if p.is_file()}
    bad = {FILES["requests"]: bad_req, FILES["timeseries"]: bad_ts}
    return MeasuredRun(path=d, name=d.resolve().name, requests=requests, timeseries=timeseries, meta=meta,
                       engine=engine, file_sha256=shas,
                       skipped={k: len(v) for k, v in bad.items()} if skip_bad else {},
                       skipped_detail={k: v[:SKIPPED_DETAIL] for k, v in bad.items() if v})


def _read_checked_requests(path: Path, skip_bad: bool, max_model_len: int | None,
                           bounds: RunBounds) -> tuple[pd.DataFrame, list[str]]:
    rows, linenos, skipped = request_lines(path, skip_bad, max_model_len)
    whole, found = request_problems(rows, bounds)
    if whole is not None:
        raise TraceFormatError(f"{where(path, None, 'last_token_ts')}: {whole}")
    if found and not skip_bad:
        i, fld, problem = found[0]
        more = f" ({len(found) - 1} more implausible line(s); --skip-bad-lines skips them)" if len(found) > 1 else ""
        raise TraceFormatError(f"{where(path, linenos[i], fld)}: {problem}{more}")
    drop = {i for i, _, _ in found}
    rows = [r for i, r in enumerate(rows) if i not in drop]
    skipped = skipped + [f"{where(path, linenos[i], fld)}: {problem}" for i, fld, problem in found]
    if not rows:
        raise TraceFormatError(f"{path}: no requests" + (f" ({len(skipped)} bad lines skipped)" if skipped else ""))
    return _requests_frame(rows), skipped
