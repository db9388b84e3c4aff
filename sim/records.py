"""Columnar stores of per-request records and sampled time series; DataFrames only at the edge."""

from __future__ import annotations

from array import array

from .request import Request, RequestRecord

__all__ = ["RecordStore", "TimeSeries"]

_FLOAT_COLS = ("arrival_s", "queued_s", "scheduled_s", "first_token_s", "last_token_s", "done_s")
_INT_COLS = ("replica", "prompt_tokens", "output_tokens", "num_preemptions", "num_cached_tokens", "seq_id")


class RecordStore:
    """One row per finished or rejected request (``RequestRecord`` fields), kept as typed arrays.

    Rows are buffered as tuples and moved into the arrays in batches, so adding one costs one append.
    """

    _BATCH = 4096

    def __init__(self) -> None:
        self._f = {c: array("d") for c in _FLOAT_COLS}
        self._i = {c: array("q") for c in _INT_COLS}
        self._rows: list[tuple] = []
        self.request_id: list[str] = []
        self.pool: list[str] = []
        self.status: list[str] = []
        self.reject_reason: list[str | None] = []

    def __len__(self) -> int:
        return len(self.request_id) + len(self._rows)

    def add(self, r: Request, pool: str, done_s: float) -> None:
        self._rows.append((r.arrival_time, r.queued_ts, r.scheduled_ts, r.first_token_ts, r.last_token_ts, done_s,
                           r.replica, r.num_prompt_tokens, r._out, r.num_preemptions, r.num_cached_tokens,
                           r.seq_id, r.request_id, pool, r.status.name, r.reject_reason))
        if len(self._rows) >= self._BATCH:
            self._flush()

    def _flush(self) -> None:
        rows = self._rows
        if not rows:
            return
        cols = list(zip(*rows, strict=True))
        for j, c in enumerate(_FLOAT_COLS):
            self._f[c].extend(cols[j])
        for j, c in enumerate(_INT_COLS):
            vals = cols[6 + j]
            self._i[c].extend(vals if c != "num_cached_tokens" else [max(v, 0) for v in vals])
        self.request_id.extend(cols[12])
        self.pool.extend(cols[13])
        self.status.extend(cols[14])
        self.reject_reason.extend(cols[15])
        self._rows = []

    def last(self) -> RequestRecord:
        """The most recently added record."""
        row = self._rows[-1] if self._rows else None
        if row is None:
            return self.record(len(self) - 1)
        return RequestRecord(row[12], row[6], row[13], row[14], row[15], row[7], row[8], row[0], row[1], row[2],
                             row[3], row[4], row[5], row[9], max(row[10], 0))

    def record(self, k: int) -> RequestRecord:
        self._flush()
        f, i = self._f, self._i
        return RequestRecord(
            self.request_id[k], i["replica"][k], self.pool[k], self.status[k], self.reject_reason[k],
            i["prompt_tokens"][k], i["output_tokens"][k], f["arrival_s"][k], f["queued_s"][k],
            f["scheduled_s"][k], f["first_token_s"][k], f["last_token_s"][k], f["done_s"][k],
            i["num_preemptions"][k], i["num_cached_tokens"][k])

    def __iter__(self):
        return (self.record(k) for k in range(len(self)))

    def to_dataframe(self):
        """All records with derived latencies (engine-side run-format definitions plus client-side)."""
        import numpy as np
        import pandas as pd

        self._flush()
        df = pd.DataFrame({"request_id": self.request_id, "pool": self.pool, "status": self.status,
                           "reject_reason": self.reject_reason})
        for c, a in self._i.items():
            df[c] = np.frombuffer(a, dtype=np.int64) if len(a) else np.zeros(0, np.int64)
        for c, a in self._f.items():
            df[c] = np.frombuffer(a, dtype=np.float64) if len(a) else np.zeros(0, np.float64)
        out = df["output_tokens"].to_numpy()
        df["ttft_s"] = df["first_token_s"] - df["queued_s"]
        df["tpot_s"] = np.where(out > 1, (df["last_token_s"] - df["first_token_s"]) / np.maximum(out - 1, 1), 0.0)
        df["e2e_s"] = df["last_token_s"] - df["queued_s"]
        df["queue_s"] = df["scheduled_s"] - df["queued_s"]
        df["client_ttft_s"] = df["first_token_s"] - df["arrival_s"]
        df["client_e2e_s"] = df["done_s"] - df["arrival_s"]
        return df

    def columns(self) -> dict:
        """Raw numpy views of the numeric columns (no copy)."""
        import numpy as np

        self._flush()
        out = {c: np.frombuffer(a, dtype=np.float64) for c, a in self._f.items() if len(a)}
        out.update({c: np.frombuffer(a, dtype=np.int64) for c, a in self._i.items() if len(a)})
        return out


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
