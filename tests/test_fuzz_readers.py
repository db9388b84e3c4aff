"""Property-based fuzzing of the run reader (issue 19): whatever the bytes, ``read_run`` returns a valid run or
raises ``TraceFormatError`` (file, line, field), nothing else, with and without ``skip_bad``.

Inputs: random bytes in place of each file, random JSON values as request lines and as ``meta.json``, and
mutations (a field replaced by a hostile value, bytes flipped / inserted / cut) of a real measured run (the first
40 requests of ``rtx4090-llama-3.1-8b``) and of two small runs written here (engine-side and client-side). ``derandomize`` keeps CI repeatable.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests import hostile
from traces.errors import INT32_MAX, TraceFormatError
from traces.runs import REQUEST_FIELDS, read_run

FILES = ("requests.jsonl", "meta.json", "timeseries.csv")
EXAMPLES = {"bytes": 150, "json": 150, "mutation": 350}
BASES = ["real", "small", "client"]
FUZZ = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

HOSTILE_NUMBERS = st.sampled_from([0, -1, 1, 2**31, 2**63, 10**30, 10**4000, -5.0, 1e308, -1e308, 0.5, 1e-300,
                                   float("nan"), float("inf"), float("-inf"), True, False])
HOSTILE_STRINGS = st.sampled_from(["", "\ud800", "x\udfff", "\x00", "2026-01-01T00:00:00", "2026-01-01T00:00:00Z",
                                   "1e9", "NaN", "bench-0", "a" * 10_000])
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | HOSTILE_NUMBERS \
    | HOSTILE_STRINGS
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8) | st.sampled_from(REQUEST_FIELDS), inner, max_size=6),
                    max_leaves=20)


@pytest.fixture(scope="module")
def bases(traces_dir, tmp_path_factory):
    """Two valid runs to mutate: part of a real measured run, and a small one written here."""
    root = tmp_path_factory.mktemp("fuzz-bases")
    real = root / "real"
    real.mkdir()
    src = traces_dir / "vllm" / "rtx4090-llama-3.1-8b"
    lines = (src / "requests.jsonl").read_bytes().splitlines(keepends=True)[:40]
    (real / "requests.jsonl").write_bytes(b"".join(lines))
    shutil.copy(src / "meta.json", real / "meta.json")
    shutil.copy(src / "timeseries.csv", real / "timeseries.csv")
    small = hostile.write(root / "small")
    client_meta = {**hostile.meta(), "collector": {"timestamps": "client"}}
    client = hostile.write(root / "client", [{**r, "scheduled_ts": None} for r in hostile.requests()], client_meta)
    out = {}
    for d in (real, small, client):
        read_run(d)  # both are valid to start with
        out[d.name] = {f: (d / f).read_bytes() for f in FILES}
    return out


def _check(files: dict[str, bytes]) -> None:
    """Write the files, read them both ways; any exception but TraceFormatError fails the test."""
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        for name, data in files.items():
            (d / name).write_bytes(data)
        for skip in (False, True):
            try:
                run = read_run(d, skip_bad=skip)
            except TraceFormatError as e:
                assert str(d) in str(e), f"the message names no file: {e}"
                event(f"skip_bad={skip}: refused")
                continue
            _assert_valid(run)
            event(f"skip_bad={skip}: valid run" + (" (lines skipped)" if sum(run.skipped.values()) else ""))


def _assert_valid(run) -> None:
    r = run.requests
    assert len(r) >= 1
    for f in ("input_toks", "output_toks"):
        assert (r[f] >= 1).all() and (r[f] <= INT32_MAX).all()
    for f in REQUEST_FIELDS[3:]:
        v = r[f].to_numpy(np.float64)
        assert np.isfinite(v[~np.isnan(v)]).all() if f == "scheduled_ts" else np.isfinite(v).all()
    assert (r["first_token_ts"] >= r["queued_ts"]).all() and (r["last_token_ts"] >= r["first_token_ts"]).all()
    assert (r["offset_s"] >= 0).all() and np.isfinite(r["tpot_s"]).all()
    for s in (r["request_id"].tolist(), [run.meta.model]):
        for x in s:
            x.encode("utf-8")  # no lone surrogate survives
    e = run.engine
    assert 1 <= e.max_num_seqs <= e.max_num_batched_tokens <= INT32_MAX
    assert 1 <= e.block_size <= 65536 and (e.num_gpu_blocks is None or 2 <= e.num_gpu_blocks <= INT32_MAX)
    if run.timeseries is not None:
        ts = run.timeseries
        assert ts["t"].is_monotonic_increasing and np.isfinite(ts["t"]).all()
        running = ts["running"].astype("float64").to_numpy()
        assert (running[~np.isnan(running)] <= e.max_num_seqs * 65536).all()
    assert math.isfinite(run.tick_origin_s)


@settings(FUZZ, max_examples=EXAMPLES["bytes"])
@given(which=st.sampled_from(FILES), data=st.binary(max_size=2000), base=st.sampled_from(BASES))
def test_random_bytes(bases, which, data, base):
    _check({**bases[base], which: data})


@settings(FUZZ, max_examples=EXAMPLES["json"])
@given(lines=st.lists(JSON, min_size=1, max_size=5), meta=JSON, as_meta=st.booleans())
def test_random_json(bases, lines, meta, as_meta):
    files = dict(bases["small"])
    text = "".join(json.dumps(x) + "\n" for x in lines).encode("utf-8", "surrogatepass")
    if as_meta:
        files["meta.json"] = json.dumps(meta).encode("utf-8", "surrogatepass")
    else:
        files["requests.jsonl"] = files["requests.jsonl"] + text
    _check(files)


def _set_path(obj, path: list, value):
    for k in path[:-1]:
        obj = obj[k]
    obj[path[-1]] = value


def _meta_paths(meta: dict) -> list[list[str]]:
    out = []
    for k, v in meta.items():
        if k == "resolved_config":
            out += [[k, sec, f] for sec in ("cache_config", "scheduler_config", "model_config")
                    for f in (v.get(sec) or {})][:60]
        elif isinstance(v, dict):
            out += [[k, f] for f in v]
        else:
            out.append([k])
    return out


@settings(FUZZ, max_examples=EXAMPLES["mutation"])
@given(base=st.sampled_from(BASES), kind=st.sampled_from(["request", "meta", "tick", "bytes"]),
       value=SCALARS, pick=st.integers(0, 10**6), blob=st.binary(min_size=1, max_size=8),
       op=st.sampled_from(["flip", "insert", "cut"]))
def test_mutations_of_valid_runs(bases, base, kind, value, pick, blob, op):
    files = dict(bases[base])
    if kind == "request":
        lines = files["requests.jsonl"].splitlines()
        i = pick % len(lines)
        obj = json.loads(lines[i])
        obj[REQUEST_FIELDS[pick % len(REQUEST_FIELDS)]] = value
        lines[i] = json.dumps(obj).encode("utf-8", "surrogatepass")
        files["requests.jsonl"] = b"\n".join(lines) + b"\n"
    elif kind == "meta":
        meta = json.loads(files["meta.json"])
        paths = _meta_paths(meta)
        _set_path(meta, paths[pick % len(paths)], value)
        files["meta.json"] = json.dumps(meta).encode("utf-8", "surrogatepass")
    elif kind == "tick":
        lines = files["timeseries.csv"].split(b"\r\n")
        i = 1 + pick % (len(lines) - 2)
        cells = lines[i].split(b",")
        cells[pick % len(cells)] = repr(value).encode("utf-8", "surrogatepass")
        lines[i] = b",".join(cells)
        files["timeseries.csv"] = b"\r\n".join(lines)
    else:
        name = FILES[pick % 3]
        data = bytearray(files[name])
        at = pick % len(data)
        if op == "flip":
            data[at:at + len(blob)] = blob
        elif op == "insert":
            data[at:at] = blob
        else:
            del data[at:at + 1 + pick % 64]
        files[name] = bytes(data)
    _check(files)
