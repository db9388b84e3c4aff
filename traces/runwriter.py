"""Write a run directory in the measured run format (``docs/vllm.md#8-run-format``), incrementally.

The format itself (fields, columns, file names, validation) is defined once, in ``traces.runs``; this writer
streams it: every line is validated by the reader's rules and flushed as soon as it is known, and
``meta.json`` is validated and replaced atomically, so a collection that is interrupted (Ctrl-C, a crash)
still leaves a run that ``traces.runs.read_run`` reads: complete JSON lines, complete CSV rows and a
``meta.json`` saying how far it got. Files (``traces.runs.FILES``)::

    requests.jsonl   one object per completed request: REQUEST_FIELDS first, then extras
    timeseries.csv   t,prompt_throughput,gen_throughput,running,waiting,kv_cache_pct  (t = 1, 2, ...; CRLF)
                     [,running_engine0,waiting_engine0,kv_cache_pct_engine0,...]  (``engine_gauges=N``)
    meta.json        schema_version, model, vllm_version, engine_kwargs, ..., kv_cache, collector
    failures.jsonl   one object per request that failed (not part of the measured format; counted in meta)

Missing measurements are JSON ``null`` in ``requests.jsonl`` (only where the format allows it) and ``nan`` in
``timeseries.csv`` (a tick whose scrape failed); nothing is invented.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from .atomic import write_text
from .runs import FILES, TIMESERIES_COLUMNS, check_meta, engine_columns, request_record, tick_line

__all__ = ["RunWriter"]


class RunWriter:
    """Incremental writer of one run directory.

    Args:
        out_dir: the run directory (created).
        meta: the first ``meta.json`` (validated before anything is created, so a run that the reader would
            refuse, e.g. without the engine limits, fails here and not after the collection).
        overwrite: replace the run files if the directory already holds a run.
        engine_gauges: also write the gauges of each of this many engines (a data-parallel server's
            ``engine="<i>"`` series; ``add_tick(..., engines=...)``); 0: the summed columns only.
    """

    def __init__(self, out_dir: str | Path, *, meta: dict, overwrite: bool = False, engine_gauges: int = 0):
        self.dir = Path(out_dir)
        meta_text = check_meta(meta)
        existing = [FILES[k] for k in ("requests", "timeseries", "meta") if (self.dir / FILES[k]).exists()]
        if existing and not overwrite:
            raise ValueError(f"{self.dir} already holds a run ({', '.join(existing)}); choose another --out "
                             f"or pass --overwrite")
        self._created_dir = not self.dir.exists()
        self.dir.mkdir(parents=True, exist_ok=True)
        self._req = open(self.dir / FILES["requests"], "w", encoding="utf-8", newline="\n")  # noqa: SIM115
        self._fail = open(self.dir / FILES["failures"], "w", encoding="utf-8", newline="\n")  # noqa: SIM115
        self._ts = open(self.dir / FILES["timeseries"], "w", encoding="utf-8", newline="")  # noqa: SIM115
        self._columns = TIMESERIES_COLUMNS + engine_columns(engine_gauges)
        self._ts.write(",".join(self._columns) + "\r\n")
        self._ts.flush()
        self._write_meta_text(meta_text)
        self._seen: set[str] = set()
        self._last_t = -math.inf
        self.num_requests = self.num_failures = self.num_ticks = 0

    def add_request(self, row: dict) -> None:
        """One completed request: the ``REQUEST_FIELDS`` (validated; ``ValueError`` names a bad field), extras
        after them."""
        self._req.write(json.dumps(request_record(row, self._seen, extras=True)) + "\n")
        self._req.flush()
        self.num_requests += 1

    def add_failure(self, row: dict) -> None:
        self._fail.write(json.dumps(row) + "\n")
        self._fail.flush()
        self.num_failures += 1

    def add_tick(self, t: int, prompt_throughput, gen_throughput, running, waiting, kv_cache_pct,
                 engines: Sequence[tuple] | None = None) -> None:
        """One row of ``timeseries.csv`` (``None``/NaN written as ``nan``); ``engines``: per engine
        ``(running, waiting, kv_cache_pct)`` when the writer has ``engine_gauges`` (missing ones: ``nan``)."""
        n = (len(self._columns) - len(TIMESERIES_COLUMNS)) // 3
        per = list(engines or [])[:n]
        per += [(None, None, None)] * (n - len(per))
        values = (t, prompt_throughput, gen_throughput, running, waiting, kv_cache_pct, *(v for e in per for v in e))
        line = tick_line(values, self._last_t, self._columns)
        self._ts.write(line + "\r\n")
        self._ts.flush()
        self._last_t = float(t)
        self.num_ticks += 1

    def write_meta(self, meta: dict) -> None:
        """Validate and replace ``meta.json`` atomically."""
        self._write_meta_text(check_meta(meta))

    def _write_meta_text(self, text: str) -> None:
        write_text(self.dir / FILES["meta"], text)

    def discard(self) -> None:
        """Close the files and remove the run files (a run without a request is no run); ``failures.jsonl`` stays
        when it holds failures, and the directory goes when this writer left it empty."""
        for f in (self._req, self._fail, self._ts):
            f.close()
        for key in ("requests", "timeseries", "meta") + (() if self.num_failures else ("failures",)):
            (self.dir / FILES[key]).unlink(missing_ok=True)
        if self._created_dir and not any(self.dir.iterdir()):
            self.dir.rmdir()

    def close(self, *, sort_requests: bool = True) -> None:
        """Close the files; put ``requests.jsonl`` in arrival order (``bench-<i>``), as the format has it."""
        for f in (self._req, self._fail, self._ts):
            f.close()
        if sort_requests:
            path = self.dir / FILES["requests"]
            lines = path.read_text(encoding="utf-8").splitlines()
            lines.sort(key=lambda ln: int(json.loads(ln)["request_id"].rsplit("-", 1)[1]))
            write_text(path, "".join(ln + "\n" for ln in lines), newline="\n")
