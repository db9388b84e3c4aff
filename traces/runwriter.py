"""Write a run directory in the measured run format (``vllm.md`` section 8), incrementally.

Every line is flushed as soon as it is known, and ``meta.json`` is replaced atomically, so a collection
that is interrupted (Ctrl-C, a crash) still leaves a readable run: complete JSON lines, complete CSV rows
and a ``meta.json`` saying how far it got. Files::

    requests.jsonl   one object per completed request: REQUEST_FIELDS first, then extras
    timeseries.csv   t,prompt_throughput,gen_throughput,running,waiting,kv_cache_pct  (t = 1, 2, ...)
    meta.json        schema_version, model, vllm_version, engine_kwargs, ..., kv_cache, collector
    failures.jsonl   one object per request that failed (not part of the measured format; counted in meta)

Missing measurements are JSON ``null`` in ``requests.jsonl`` and ``nan`` in ``timeseries.csv`` (a tick
whose scrape failed); nothing is invented.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

__all__ = ["REQUEST_FIELDS", "TIMESERIES_COLUMNS", "RunWriter"]

REQUEST_FIELDS = ("request_id", "input_toks", "output_toks", "arrival_time", "queued_ts", "scheduled_ts",
                  "first_token_ts", "last_token_ts")
TIMESERIES_COLUMNS = ("t", "prompt_throughput", "gen_throughput", "running", "waiting", "kv_cache_pct")


def _num(x, integral: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "nan"
    if integral and float(x).is_integer():
        return str(int(x))  # queue lengths are counts, written as in the measured runs
    return repr(float(x))


class RunWriter:
    """Incremental writer of one run directory.

    Args:
        out_dir: the run directory (created).
        overwrite: replace the run files if the directory already holds a run.
    """

    def __init__(self, out_dir: str | Path, *, overwrite: bool = False):
        self.dir = Path(out_dir)
        existing = [n for n in ("requests.jsonl", "timeseries.csv", "meta.json") if (self.dir / n).exists()]
        if existing and not overwrite:
            raise ValueError(f"{self.dir} already holds a run ({', '.join(existing)}); choose another --out "
                             f"or pass --overwrite")
        self.dir.mkdir(parents=True, exist_ok=True)
        self._req = open(self.dir / "requests.jsonl", "w")  # noqa: SIM115 - kept open for the run
        self._fail = open(self.dir / "failures.jsonl", "w")  # noqa: SIM115
        self._ts = open(self.dir / "timeseries.csv", "w")  # noqa: SIM115
        self._ts.write(",".join(TIMESERIES_COLUMNS) + "\n")
        self._ts.flush()
        self.num_requests = self.num_failures = self.num_ticks = 0

    def add_request(self, row: dict) -> None:
        """One completed request; ``row`` must hold every field of ``REQUEST_FIELDS``."""
        missing = [f for f in REQUEST_FIELDS if f not in row]
        if missing:
            raise ValueError(f"request row lacks {missing}")
        ordered = {f: row[f] for f in REQUEST_FIELDS}
        ordered.update({k: v for k, v in row.items() if k not in ordered})
        self._req.write(json.dumps(ordered) + "\n")
        self._req.flush()
        self.num_requests += 1

    def add_failure(self, row: dict) -> None:
        self._fail.write(json.dumps(row) + "\n")
        self._fail.flush()
        self.num_failures += 1

    def add_tick(self, t: int, prompt_throughput, gen_throughput, running, waiting, kv_cache_pct) -> None:
        """One row of ``timeseries.csv`` (``None``/NaN written as ``nan``)."""
        vals = (_num(prompt_throughput), _num(gen_throughput), _num(running, True), _num(waiting, True),
                _num(kv_cache_pct))
        self._ts.write(f"{float(t)!r}," + ",".join(vals) + "\n")
        self._ts.flush()
        self.num_ticks += 1

    def write_meta(self, meta: dict) -> None:
        """Replace ``meta.json`` atomically."""
        tmp = self.dir / "meta.json.tmp"
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp, self.dir / "meta.json")

    def close(self, *, sort_requests: bool = True) -> None:
        """Close the files; put ``requests.jsonl`` in arrival order (``bench-<i>``), as the format has it."""
        for f in (self._req, self._fail, self._ts):
            f.close()
        if sort_requests:
            path = self.dir / "requests.jsonl"
            lines = path.read_text().splitlines()
            lines.sort(key=lambda ln: int(json.loads(ln)["request_id"].rsplit("-", 1)[1]))
            tmp = self.dir / "requests.jsonl.tmp"
            tmp.write_text("".join(ln + "\n" for ln in lines))
            os.replace(tmp, path)
