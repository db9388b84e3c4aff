"""The measured run format: reading the shared runs, writing and re-reading, and malformed input."""

import json

import numpy as np
import pandas as pd
import pytest

from traces.errors import TraceFormatError
from traces.runs import REQUEST_FIELDS, TIMESERIES_COLUMNS, read_run, write_run

RUNS = ("rtx4090-llama-3.1-8b", "rtxpro6000-llama-3.1-8b")


@pytest.fixture(scope="module")
def runs(traces_dir):
    return {r: read_run(traces_dir / "vllm" / r) for r in RUNS}


def test_shared_runs_read_with_settings_and_conventions(runs):
    a, b = runs["rtx4090-llama-3.1-8b"], runs["rtxpro6000-llama-3.1-8b"]
    assert len(a) == len(b) == 300
    assert a.num_gpu_blocks == 2588 and b.num_gpu_blocks is None
    assert (a.engine.max_num_seqs, b.engine.max_num_seqs) == (256, 128)
    assert a.engine.max_num_batched_tokens == b.engine.max_num_batched_tokens == 2048
    assert a.engine.max_model_len == 32768 and b.engine.max_model_len is None
    assert a.engine.sources["num_gpu_blocks"].startswith("resolved_config")
    assert "not recorded" in b.engine.sources["num_gpu_blocks"]
    assert a.kv_cache_recorded and not b.kv_cache_recorded
    assert len(a.timeseries) == 184 and len(b.timeseries) == 67
    # the run-format metric conventions reproduce the reference values of docs/vllm.md#8-run-format
    r = a.requests
    assert r["ttft_s"].mean() == pytest.approx(65.46, abs=0.005)
    assert np.percentile(r["ttft_s"], 50) == pytest.approx(60.11, abs=0.005)
    assert np.percentile(r["tpot_s"], 50) * 1e3 == pytest.approx(30.8, abs=0.05)
    assert np.percentile(r["e2e_s"], 90) == pytest.approx(141.60, abs=0.005)
    assert b.requests["tpot_s"].mean() * 1e3 == pytest.approx(32.5, abs=0.05)
    assert a.offsets_s.min() == 0.0 and (np.diff(a.offsets_s) >= 0).all()
    # the shared files are the ones SOURCES.md lists
    assert a.file_sha256["requests.jsonl"].startswith("5a6f2a0b09d5eb84")
    assert b.file_sha256["timeseries.csv"].startswith("de884551204aeb9c")


def test_timeseries_throughput_sums_to_the_run_totals(runs):
    for run in runs.values():
        ts = run.timeseries
        assert ts["prompt_throughput"].sum() == run.prompt_tokens.sum()
        assert ts["gen_throughput"].sum() == run.output_tokens.sum()
        assert ts["kv_cache_usage_perc"].max() <= 1.0


def test_write_then_read_round_trips(runs, tmp_path):
    run = runs["rtx4090-llama-3.1-8b"]
    out = write_run(tmp_path / "copy", requests=run.requests, meta=run.meta, timeseries=run.timeseries)
    back = read_run(out)
    pd.testing.assert_frame_equal(back.requests[list(REQUEST_FIELDS)], run.requests[list(REQUEST_FIELDS)])
    pd.testing.assert_frame_equal(back.timeseries, run.timeseries)
    assert back.engine == run.engine and back.num_gpu_blocks == 2588
    raw = (out / "timeseries.csv").read_bytes()
    assert raw.count(b"\r\n") == len(run.timeseries) + 1  # CRLF, as the measured format
    assert json.loads((out / "meta.json").read_text())["kv_cache"]["num_gpu_blocks"] == 2588


def _small_run(tmp_path, requests=None, ts_lines=None, meta=None):
    reqs = requests or [
        {"request_id": f"r{i}", "input_toks": 100 + i, "output_toks": 10, "arrival_time": 1.7e9 + i,
         "queued_ts": 50.0 + i, "scheduled_ts": 50.1 + i, "first_token_ts": 50.3 + i, "last_token_ts": 51.0 + i}
        for i in range(3)]
    meta = meta or {"model": "meta-llama/Llama-3.1-8B",
                    "engine_kwargs": {"max_num_seqs": 8, "max_num_batched_tokens": 512, "max_model_len": 4096}}
    write_run(tmp_path, requests=reqs, meta=meta)
    if ts_lines is not None:
        (tmp_path / "timeseries.csv").write_bytes("\r\n".join(ts_lines).encode() + b"\r\n")
    return tmp_path


def test_small_run_written_in_tmp_reads(tmp_path):
    d = _small_run(tmp_path, ts_lines=[",".join(TIMESERIES_COLUMNS), "1.0,300.0,20.0,2,1,12.5"])
    run = read_run(d)
    assert list(run.requests["ttft_s"].round(6)) == [0.3, 0.3, 0.3]
    assert run.requests["tpot_s"].iloc[0] == pytest.approx(0.7 / 9)
    assert run.kv_cache_recorded and run.num_gpu_blocks is None
    assert run.engine.sources["block_size"].startswith("vLLM 0.19.0 default")


@pytest.mark.parametrize("line, field", [
    ('{"request_id": "x", "input_toks": 5}', "output_toks"),
    ('{"request_id": "x", "input_toks": 0, "output_toks": 3, "arrival_time": 1, "queued_ts": 1, "scheduled_ts": 1,'
     ' "first_token_ts": 1, "last_token_ts": 1}', "input_toks"),
    ('{"request_id": "x", "input_toks": 5, "output_toks": 3, "arrival_time": 1, "queued_ts": 2, "scheduled_ts": 1,'
     ' "first_token_ts": 3, "last_token_ts": 4}', "scheduled_ts"),
    ('{"request_id": "x", "input_toks": 5, "output_toks": 3, "arrival_time": 1, "queued_ts": 1,'
     ' "scheduled_ts": 1, "first_token_ts": 3, "last_token_ts": "late"}', "last_token_ts"),
    ('{"request_id": "r0", "input_toks": 5, "output_toks": 3, "arrival_time": 1, "queued_ts": 1,'
     ' "scheduled_ts": 1, "first_token_ts": 3, "last_token_ts": 4}', "request_id"),  # duplicate
])
def test_bad_request_line_names_file_line_field(tmp_path, line, field):
    d = _small_run(tmp_path)
    with open(d / "requests.jsonl", "a") as f:
        f.write(line + "\n")
    with pytest.raises(TraceFormatError) as e:
        read_run(d)
    assert f"requests.jsonl:4: field {field}" in str(e.value)
    run = read_run(d, skip_bad=True)
    assert len(run) == 3 and run.skipped["requests.jsonl"] == 1


def test_invalid_json_line(tmp_path):
    d = _small_run(tmp_path)
    lines = (d / "requests.jsonl").read_text().splitlines()
    lines[1] = lines[1][:-3]
    (d / "requests.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(TraceFormatError, match=r"requests.jsonl:2: invalid JSON"):
        read_run(d)
    assert read_run(d, skip_bad=True).skipped == {"requests.jsonl": 1, "timeseries.csv": 0}


@pytest.mark.parametrize("row, field", [
    ("2.0,1.0,1.0,two,0,0.0", "running"),
    ("1.0,1.0,1.0,2,0,0.0", "t"),            # tick does not increase
    ("2.0,1.0,1.0,2,0,140.0", "kv_cache_pct"),
    ("2.0,1.0,-1.0,2,0,0.0", "gen_throughput"),
    ("2.0,1.0,1.0,2.5,0,0.0", "running"),
])
def test_bad_tick_names_file_line_field(tmp_path, row, field):
    header = ",".join(TIMESERIES_COLUMNS)
    d = _small_run(tmp_path, ts_lines=[header, "1.0,300.0,20.0,2,1,12.5", row])
    with pytest.raises(TraceFormatError) as e:
        read_run(d)
    assert f"timeseries.csv:3: field {field}" in str(e.value)
    assert read_run(d, skip_bad=True).skipped["timeseries.csv"] == 1


def test_bad_header_and_missing_files(tmp_path):
    d = _small_run(tmp_path, ts_lines=["t,running", "1.0,2"])
    with pytest.raises(TraceFormatError, match="timeseries.csv:1: header must be"):
        read_run(d)
    (d / "meta.json").unlink()
    with pytest.raises(FileNotFoundError, match="meta.json: missing"):
        read_run(d)


@pytest.mark.parametrize("meta, needle", [
    ({"model": "m", "engine_kwargs": {"max_num_batched_tokens": 512}}, "field engine_kwargs.max_num_seqs: missing"),
    ({"model": "m", "engine_kwargs": {"max_num_seqs": -1, "max_num_batched_tokens": 512}},
     "field engine_kwargs.max_num_seqs: invalid value -1"),
    ({"model": "m", "engine_kwargs": {"max_num_seqs": 4, "max_num_batched_tokens": 512},
      "kv_cache": {"num_gpu_blocks": "many"}}, "field kv_cache.num_gpu_blocks"),
    ({"model": "m", "engine_kwargs": {"max_num_seqs": 4, "max_num_batched_tokens": 512}, "started_at": "yesterday"},
     "field started_at"),
    ({"model": "m", "engine_kwargs": {"max_num_seqs": 4, "max_num_batched_tokens": 512},
      "collector": {"timestamps": "server"}}, "field collector.timestamps"),
])
def test_bad_meta_names_field_and_line(tmp_path, meta, needle):
    d = _small_run(tmp_path)
    (d / "meta.json").write_text(json.dumps(meta, indent=2))
    with pytest.raises(TraceFormatError) as e:
        read_run(d)
    msg = str(e.value)
    assert needle in msg and "meta.json:" in msg
    line = int(msg.split("meta.json:")[1].split(":")[0])
    keys = needle.split("field ")[1].split(":")[0].split(".")
    assert any(f'"{k}"' in (d / "meta.json").read_text().splitlines()[line - 1] for k in keys)


def test_writer_refuses_bad_input_and_writes_nothing(tmp_path):
    bad = [{"request_id": "a", "input_toks": 3, "output_toks": 2, "arrival_time": 0.0, "queued_ts": 2.0,
            "scheduled_ts": 1.0, "first_token_ts": 3.0, "last_token_ts": 4.0}]
    with pytest.raises(ValueError, match="request 0: field scheduled_ts"):
        write_run(tmp_path / "x", requests=bad, meta={"model": "m", "engine_kwargs": {"max_num_seqs": 1,
                                                                                        "max_num_batched_tokens": 8}})
    assert not (tmp_path / "x").exists()


def test_streaming_writer_uses_the_readers_rules(tmp_path):
    """traces.runwriter (the collector's writer) and write_run share one definition of the format."""
    from traces.runwriter import RunWriter

    meta = {"model": "m", "engine_kwargs": {"max_num_seqs": 4, "max_num_batched_tokens": 64},
            "collector": {"timestamps": "client"}}
    with pytest.raises(ValueError, match="max_num_seqs"):  # unreadable meta: refused before anything is created
        RunWriter(tmp_path / "no", meta={"model": "m", "engine_kwargs": {}})
    assert not (tmp_path / "no").exists()
    w = RunWriter(tmp_path / "run", meta=meta)
    row = {"request_id": "bench-1", "input_toks": np.int64(5), "output_toks": 3, "arrival_time": 1.7e9,
           "queued_ts": 10, "scheduled_ts": None, "first_token_ts": 10.5, "last_token_ts": 11.0, "itls": [0.25, 0.25]}
    w.add_request({**row, "request_id": "bench-0", "queued_ts": 9.0})
    w.add_request(row)
    for bad, field in (({**row, "request_id": "bench-0"}, "request_id"), ({**row, "output_toks": 0}, "output_toks"),
                       ({**row, "input_toks": None}, "input_toks"), ({**row, "first_token_ts": 9.5}, "first_token_ts")):
        with pytest.raises(ValueError, match=f"field {field}"):
            w.add_request({**bad, "request_id": bad["request_id"] if field == "request_id" else "bench-9"})
    w.add_tick(1, 100.0, 3.0, 2.0, 0, 12.5)
    w.add_tick(2, None, float("nan"), None, None, None)  # a failed scrape: not measured
    with pytest.raises(ValueError, match="field t"):
        w.add_tick(2, 0, 0, 0, 0, 0)
    w.write_meta({**meta, "num_requests": 2})
    w.close()
    raw = (tmp_path / "run" / "timeseries.csv").read_bytes()
    assert raw.count(b"\r\n") == 3 and b"2,0,12.5" in raw
    run = read_run(tmp_path / "run")
    assert run.client_side and run.requests["request_id"].tolist() == ["bench-0", "bench-1"]
    assert run.requests["scheduled_ts"].isna().all() and run.requests["itls"].iloc[1] == [0.25, 0.25]
    assert run.timeseries["running"].isna().tolist() == [False, True]
