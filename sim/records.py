"""Columnar stores of per-request records and sampled time series; DataFrames only at the edge."""

from __future__ import annotations

import struct
from array import array

from .request import Request, RequestRecord, RequestStatus

__all__ = ["RecordStore", "TimeSeries"]

_FLOAT_COLS = ("arrival_s", "queued_s", "scheduled_s", "first_token_s", "last_token_s", "done_s")
_INT_COLS = ("replica", "prompt_tokens", "output_tokens", "num_preemptions", "num_cached_tokens", "seq_id")
_STATUS_NAME = {s: s.name for s in RequestStatus}  # Enum.name is a property: slow once per request
# a row's numbers packed as bytes: array.frombytes(pack(...)) is ~3x faster than array.extend(tuple)
_PACK_FLOATS = struct.Struct(f"{len(_FLOAT_COLS)}d").pack
_PACK_INTS = struct.Struct(f"{len(_INT_COLS)}q").pack


class RecordStore:
    """One row per finished or rejected request (``RequestRecord`` fields), kept in typed arrays.

    The numeric fields of a row go into two row-major arrays (six floats, six ints: ``_FLOAT_COLS``,
    ``_INT_COLS``), so adding a row costs two packed appends and four list appends; a column is a strided
    numpy view of its array.
    """

    def __init__(self) -> None:
        self._fv = array("d")  # row-major, len(_FLOAT_COLS) per row
        self._iv = array("q")  # row-major, len(_INT_COLS) per row
        self.request_id: list[str] = []
        self.pool: list[str] = []
        self.status: list[str] = []
        self.reject_reason: list[str | None] = []

    def __len__(self) -> int:
        return len(self.request_id)

    def add(self, r: Request, pool: str, done_s: float) -> None:
        self._fv.frombytes(_PACK_FLOATS(r.arrival_time, r.queued_ts, r.scheduled_ts, r.first_token_ts,
                                        r.last_token_ts, done_s))
        cached = r.num_cached_tokens  # -1 until scheduled: recorded as 0
        self._iv.frombytes(_PACK_INTS(r.replica, r.num_prompt_tokens, r._num_output_tokens, r.num_preemptions,
                                      cached if cached > 0 else 0, r.seq_id))
        self.request_id.append(r.request_id)
        self.pool.append(pool)
        self.status.append(_STATUS_NAME[r.status])
        self.reject_reason.append(r.reject_reason)

    def drop_first(self, n: int) -> None:
        """Forget the ``n`` oldest rows (a long-running server keeps aggregates, not one row per request)."""
        n = min(n, len(self))
        del self._fv[:len(_FLOAT_COLS) * n]
        del self._iv[:len(_INT_COLS) * n]
        for col in (self.request_id, self.pool, self.status, self.reject_reason):
            del col[:n]

    def last(self) -> RequestRecord:
        """The most recently added record."""
        return self.record(len(self) - 1)

    def record(self, k: int) -> RequestRecord:
        if k < 0:
            k += len(self)
        arrival, queued, scheduled, first, last, done = self._fv[6 * k:6 * k + 6]
        replica, prompt, output, preemptions, cached, _ = self._iv[6 * k:6 * k + 6]
        return RequestRecord(self.request_id[k], replica, self.pool[k], self.status[k], self.reject_reason[k],
                             prompt, output, arrival, queued, scheduled, first, last, done, preemptions, cached)

    def __iter__(self):
        return (self.record(k) for k in range(len(self)))

    def _column_views(self) -> tuple[dict, dict]:
        import numpy as np

        f = np.frombuffer(self._fv, dtype=np.float64).reshape(-1, len(_FLOAT_COLS)) if len(self) else None
        i = np.frombuffer(self._iv, dtype=np.int64).reshape(-1, len(_INT_COLS)) if len(self) else None
        empty_f, empty_i = np.zeros(0, np.float64), np.zeros(0, np.int64)
        return ({c: f[:, j] if f is not None else empty_f for j, c in enumerate(_FLOAT_COLS)},
                {c: i[:, j] if i is not None else empty_i for j, c in enumerate(_INT_COLS)})

    def to_dataframe(self):
        """All records with derived latencies (engine-side run-format definitions plus client-side)."""
        import numpy as np
        import pandas as pd

        floats, ints = self._column_views()
        df = pd.DataFrame({"request_id": self.request_id, "pool": self.pool, "status": self.status,
                           "reject_reason": self.reject_reason})
        for c, a in ints.items():
            df[c] = np.array(a)  # a contiguous copy: the store may keep growing
        for c, a in floats.items():
            df[c] = np.array(a)
        out = df["output_tokens"].to_numpy()
        df["ttft_s"] = df["first_token_s"] - df["queued_s"]
        df["tpot_s"] = np.where(out > 1, (df["last_token_s"] - df["first_token_s"]) / np.maximum(out - 1, 1), 0.0)
        df["e2e_s"] = df["last_token_s"] - df["queued_s"]
        df["queue_s"] = df["scheduled_s"] - df["queued_s"]
        df["client_ttft_s"] = df["first_token_s"] - df["arrival_s"]
        df["client_e2e_s"] = df["done_s"] - df["arrival_s"]
        return df

    def columns(self) -> dict:
        """Raw numpy views of the numeric columns (no copy; empty when there is no record)."""
        if not len(self):
            return {}
        floats, ints = self._column_views()
        return {**floats, **ints}


class TimeSeries:
    """Gauges sampled every ``interval_s`` per replica, plus cumulative token counters."""

    COLS = ("t_s", "replica", "running", "waiting", "kv_cache_usage_perc", "prompt_tokens_total",
            "generation_tokens_total", "num_preemptions_total")

    def __init__(self) -> None:
        self._cols = {c: array("d") for c in self.COLS}

    def add(self, t_s, replica, running, waiting, usage, prompt_total, gen_total, preempt_total) -> None:
        c = self._cols
        for name, v in zip(self.COLS, (t_s, replica, running, waiting, usage, prompt_total, gen_total,
                                       preempt_total), strict=True):
            c[name].append(v)

    def __len__(self) -> int:
        return len(self._cols["t_s"])

    def to_dataframe(self):
        """Long format; ``prompt_throughput``/``gen_throughput`` are tokens per tick, as in the run format."""
        import numpy as np
        import pandas as pd

        df = pd.DataFrame({c: np.frombuffer(a, dtype=np.float64) if len(a) else np.zeros(0)
                           for c, a in self._cols.items()})
        for c in ("replica", "running", "waiting", "prompt_tokens_total", "generation_tokens_total",
                  "num_preemptions_total"):
            df[c] = df[c].astype(np.int64)
        g = df.groupby("replica", sort=False)
        df["prompt_throughput"] = g["prompt_tokens_total"].diff().fillna(df["prompt_tokens_total"]).astype(np.int64)
        df["gen_throughput"] = g["generation_tokens_total"].diff().fillna(df["generation_tokens_total"]).astype(np.int64)
        return df
