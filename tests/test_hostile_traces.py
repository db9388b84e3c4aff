"""Hostile input to the run readers, `maslat replay` and `maslat calibrate` (issue 19, part 1).

Every case of the adversarial pass, reproduced: each ends either in a valid replay or in exit 2 with
``file:line: field F: what is wrong, what was expected`` on stderr, never in a traceback or in garbage figures.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from maslat.cli import main
from tests import hostile
from traces.errors import TraceFormatError
from traces.runs import read_run


def _cli(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def _replay(capsys, d, *extra):
    return _cli(capsys, "replay", str(d), "--profile", "h100-llama-3.1-8b", "--json", *extra)


def _set(reqs, i, **kw):
    reqs[i] = {**reqs[i], **kw}
    return reqs


def test_valid_small_run_replays(tmp_path, capsys):
    rc, out, err = _replay(capsys, hostile.write(tmp_path / "ok"))
    assert rc == 0, err
    obj = json.loads(out.strip().splitlines()[-1])
    assert obj["evaluated_requests"] == 30 and obj["skipped_lines"] == {}


def test_every_output_of_one_token_replays_with_tpot_undefined(tmp_path, capsys):
    reqs = hostile.requests(output=1)
    rc, out, err = _replay(capsys, hostile.write(tmp_path / "r", reqs))
    assert rc == 0, err
    obj = json.loads(out.strip().splitlines()[-1])
    assert all(v["measured"] is None and v["error_pct"] is None for v in obj["metrics"]["tpot_s"].values())
    assert obj["metrics"]["ttft_s"]["mean"]["measured"] == pytest.approx(0.05)
    assert {k.split(".")[0] for k in obj["bar"]["undefined"]} == {"tpot_s"}
    assert "n/a" in out  # the table says so


# ------------------------------------------------------------------------------------------- refused, exit 2
def _refused(capsys, d, needle, *, cmd="replay", tmp_path=None):
    if cmd == "replay":
        rc, out, err = _replay(capsys, d)
    else:
        rc, out, err = _cli(capsys, "calibrate", str(d), "--out", str(tmp_path / "p.json"), "--max-evals", "5")
    assert rc == 2, (out, err)
    assert "Traceback" not in err and needle in err, err
    return err


def _req_case(name):
    reqs = hostile.requests()
    if name == "all_equal":
        return [{**r, **dict.fromkeys(("queued_ts", "scheduled_ts", "first_token_ts", "last_token_ts"), MONO)}
                for r in reqs], "requests.jsonl: field last_token_ts: every request has the same timestamps"
    if name == "huge_output":
        return _set(reqs, 4, output_toks=10**30), "requests.jsonl:5: field output_toks"
    if name == "digits":
        return reqs, "requests.jsonl:3: invalid JSON: integer of 5001 digits"
    if name == "surrogate":
        return _set(reqs, 2, request_id="bench-\ud800"), "requests.jsonl:3: field request_id: not valid Unicode"
    if name == "last_1e308":
        return _set(reqs, 6, last_token_ts=1e308), "requests.jsonl:7: field last_token_ts"
    if name == "queued_minus5":
        return _set(reqs, 9, queued_ts=-5.0), "requests.jsonl:10: field queued_ts"
    if name == "over_max_model_len":
        return _set(reqs, 1, input_toks=4000, output_toks=200), "requests.jsonl:2: field output_toks"
    if name == "late_arrival":
        return _set(reqs, 3, arrival_time=hostile.START_EPOCH_S + 86400), "requests.jsonl:4: field arrival_time"
    raise KeyError(name)


MONO = hostile.MONO0_S + 1.0
REQ_CASES = ("all_equal", "huge_output", "digits", "surrogate", "last_1e308", "queued_minus5", "over_max_model_len",
             "late_arrival")


@pytest.mark.parametrize("case", REQ_CASES)
def test_bad_requests_are_refused_with_file_line_field(tmp_path, capsys, case):
    reqs, needle = _req_case(case)
    d = hostile.write(tmp_path / case, reqs)
    if case == "digits":
        lines = (d / "requests.jsonl").read_text().splitlines()
        lines[2] = lines[2].replace('"input_toks": 102', '"input_toks": ' + "9" * 5001)
        (d / "requests.jsonl").write_text("\n".join(lines) + "\n")
    if case == "surrogate":  # json.dumps escapes it as \ud800, which json.loads turns back into a lone surrogate
        assert "\\ud800" in (d / "requests.jsonl").read_text()
    _refused(capsys, d, needle)


def test_deeply_nested_json_is_refused(tmp_path, capsys):
    d = hostile.write(tmp_path / "nest")
    with open(d / "requests.jsonl", "a") as f:
        f.write("[" * 100_000 + "\n")
    _refused(capsys, d, "requests.jsonl:31: invalid JSON: nested deeper than")
    (d / "meta.json").write_text('{"model": ' + "[" * 100_000)
    _refused(capsys, d, "meta.json:1: invalid JSON: nested deeper than")


@pytest.mark.parametrize("name", ["requests.jsonl", "meta.json", "timeseries.csv"])
def test_binary_files_are_refused_with_a_line(tmp_path, capsys, name):
    d = hostile.write(tmp_path / "bin")
    (d / name).write_bytes(bytes(range(255, -1, -1)) * 8)  # 0xff first: not UTF-8 from the first byte
    _refused(capsys, d, f"{name}:1: not UTF-8 text")


@pytest.mark.parametrize("where, value, needle", [
    ("engine_kwargs", {"max_num_seqs": 10**18}, "field engine_kwargs.max_num_seqs: 1000000000000000000 is "),
    ("kv_cache", {"block_size": 10**9}, "field kv_cache.block_size: 1000000000 is "),
    ("kv_cache", {"block_size": 1e9}, "field kv_cache.block_size"),
    ("kv_cache", {"num_gpu_blocks": 10**12}, "field kv_cache.num_gpu_blocks: 1000000000000 is "),
    ("engine_kwargs", {"max_num_seqs": 1024, "max_num_batched_tokens": 512}, "max_num_batched_tokens (512) must be"),
    ("model", "m\ud800", "field model: not valid Unicode"),
])
def test_implausible_engine_limits_are_refused(tmp_path, capsys, where, value, needle):
    m = hostile.meta()
    m[where] = {**m[where], **value} if isinstance(value, dict) else value
    _refused(capsys, hostile.write(tmp_path / "m", meta_obj=m), needle)


def test_started_at_without_time_zone_is_refused(tmp_path, capsys):
    m = hostile.meta(started_at="2026-01-01T00:00:00")
    _refused(capsys, hostile.write(tmp_path / "tz", meta_obj=m), "field started_at: '2026-01-01T00:00:00' has no time zone")


def test_implausible_gauges_are_refused(tmp_path, capsys):
    ts = hostile.ticks()
    ts[5] = "5.0,200.0,40.0,1e300,0,1.5"
    _refused(capsys, hostile.write(tmp_path / "g", ts=ts), "timeseries.csv:6: field running")
    ts[5] = "5.0,200.0,40.0,500,0,1.5"  # a whole number, but more than max_num_seqs (8) ever runs
    err = _refused(capsys, hostile.write(tmp_path / "g2", ts=ts), "timeseries.csv:6: field running")
    assert "max_num_seqs" in err
    ts = hostile.ticks()
    ts[3] = "3.0,1e300,40.0,2,0,1.5"
    _refused(capsys, hostile.write(tmp_path / "p", ts=ts), "timeseries.csv:4: field prompt_throughput")
    ts = hostile.ticks() + ["5000.0,1.0,1.0,1,0,1.0"]
    _refused(capsys, hostile.write(tmp_path / "t", ts=ts), "timeseries.csv:18: field t")


def test_skip_bad_lines_skips_and_counts(tmp_path, capsys):
    reqs = _set(hostile.requests(), 9, queued_ts=-5.0)
    reqs = _set(reqs, 6, last_token_ts=1e308)
    ts = hostile.ticks()
    ts[5] = "5.0,200.0,40.0,1e300,0,1.5"
    d = hostile.write(tmp_path / "s", reqs, ts=ts)
    with open(d / "requests.jsonl", "a", encoding="utf-8") as f:
        f.write("[" * 100_000 + "\n\x00\x01 not json\n")
    rc, out, err = _replay(capsys, d, "--skip-bad-lines")
    assert rc == 0, err
    obj = json.loads(out.strip().splitlines()[-1])
    assert obj["skipped_lines"] == {"requests.jsonl": 4, "timeseries.csv": 1}
    ex = obj["skipped_examples"]["requests.jsonl"]
    assert len(ex) == 4 and any(":10: field queued_ts: -5.0 is" in m for m in ex)  # the outlier is reported
    assert any(":31: invalid JSON: nested deeper" in m for m in ex)
    assert obj["evaluated_requests"] == 28
    assert "skipped 4 bad line(s) of requests.jsonl" in err
    run = read_run(d, skip_bad=True)
    assert len(run) == 28 and run.requests["offset_s"].max() < 20  # the -5 outlier did not move the origin


def test_reader_raises_only_trace_format_error(tmp_path):
    d = hostile.write(tmp_path / "x", _set(hostile.requests(), 0, output_toks=10**30))
    with pytest.raises(TraceFormatError):
        read_run(d)


# ------------------------------------------------------------------------------------------- calibrate
def test_calibrate_refuses_requests_that_can_never_be_served(tmp_path, capsys):
    """max_model_len 100, 2 KV blocks of 10**6 tokens, outputs of 10**9 tokens: refused in a second, with a reason
    (before, the reconstruction loop ran forever and its memory grew)."""
    m = hostile.meta()
    m["engine_kwargs"]["max_model_len"] = 100
    m["kv_cache"] = {"num_gpu_blocks": 2, "block_size": 16}
    reqs = [{**r, "input_toks": 60, "output_toks": 60} for r in hostile.requests()]
    d = hostile.write(tmp_path / "never", reqs, m)
    err = _refused(capsys, d, "requests.jsonl:1: field output_toks", cmd="calibrate", tmp_path=tmp_path)
    assert "max_model_len 100" in err
    m = hostile.meta()
    m["kv_cache"] = {"num_gpu_blocks": 2, "block_size": 16}  # 16 tokens of KV cache: no request fits
    err = _refused(capsys, hostile.write(tmp_path / "kv", meta_obj=m), "can never be served", cmd="calibrate",
                   tmp_path=tmp_path)
    assert "KV capacity 16 tokens" in err


def test_calibrate_guard_of_the_engine_itself(tmp_path):
    """Past the reader (a MeasuredRun built in memory), calibration still says which request cannot be served."""
    from dataclasses import replace

    from traces.calibrate import calibrate_run

    run = read_run(hostile.write(tmp_path / "ok"))
    req = run.requests.copy()
    req.loc[3, "output_toks"] = 5000
    bad = replace(run, requests=req)
    with pytest.raises(ValueError, match="request bench-3 .* can never be served"):
        calibrate_run(bad, max_evals=5)


def test_reconstruction_is_bounded(tmp_path):
    from sim import EngineConfig
    from tests.helpers import constant_model
    from traces.reconstruct import reconstruct_engine

    eng = EngineConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=2048, block_size=16,
                       num_gpu_blocks=200)
    with pytest.raises(ValueError, match="more than 50 engine steps"):
        reconstruct_engine(np.array([10]), np.array([1000]), np.array([0.0]), eng, constant_model(), max_steps=50)
