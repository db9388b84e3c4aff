"""maslat collect on hostile networks (issue 19, part 2): every request failing, stream lines over 512 KiB,
SIGTERM, Ctrl-C before the first completion, an absurd time scale. Real processes, real loopback servers: the
stand-in (``maslat serve``) and a tiny misbehaving aiohttp server (``tests.fakevllm``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from traces.runs import read_run

from .fakevllm import FakeServer
from .standin import ROOT, last_json_line, serving

LIMITS = ("--engine-kwarg", "max_num_seqs=8", "--engine-kwarg", "max_num_batched_tokens=512")


def _cmd(url, out, *extra):
    return [sys.executable, "-m", "maslat", "collect", "--endpoint", url, "--out", str(out), "--json", *LIMITS,
            *extra]


def _run(url, out, *extra, timeout=120):
    return subprocess.run(_cmd(url, out, *extra), cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_every_request_failing_exits_non_zero_and_writes_no_run(tmp_path):
    out = tmp_path / "run"
    with FakeServer("http500") as srv:
        p = _run(srv.url, out, "--concurrency", "2", "--num-requests", "6", "--workload", "fixed:20,4")
    assert p.returncode == 1, p.stderr[-2000:]
    assert "no request completed (6 failed, first: HTTP 500: boom)" in p.stderr and "Traceback" not in p.stderr
    assert not (out / "requests.jsonl").exists() and not (out / "meta.json").exists()
    fails = [json.loads(ln) for ln in (out / "failures.jsonl").read_text().splitlines()]
    assert len(fails) == 6 and all(f["error"] == "HTTP 500: boom" for f in fails)
    s = last_json_line(p.stdout)
    assert s["ok"] == 0 and s["failed"] == 6 and s["run_written"] is False


def test_stream_lines_over_512_kib_are_failures_with_their_error(tmp_path):
    """Before: LineTooLong escaped, failures had error null, every client task died and the run ended after 4 of
    20 requests with complete: true."""
    out = tmp_path / "run"
    with FakeServer("long_line") as srv:
        p = _run(srv.url, out, "--concurrency", "4", "--num-requests", "20", "--workload", "fixed:20,5")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "Task exception was never retrieved" not in p.stderr and "Traceback" not in p.stderr
    fails = [json.loads(ln) for ln in (out / "failures.jsonl").read_text().splitlines()]
    run = read_run(out)
    assert len(run) + len(fails) == 20 and len(fails) == 6  # requests 3, 6, ..., 18
    assert all(f["error"].startswith("LineTooLong") for f in fails)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["collector"]["complete"] is True and meta["collector"]["sent"] == 20


def _wait_for_lines(path, n, proc, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    raise AssertionError(f"fewer than {n} lines in {path} after {timeout} s")


def test_sigterm_is_handled_like_ctrl_c(tmp_path):
    out = tmp_path / "run"
    with serving("--time-scale", "0.5") as srv:
        col = subprocess.Popen(_cmd(srv.url, out, "--concurrency", "4", "--duration", "600", "--workload",
                                    "fixed:100,400"), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
        _wait_for_lines(out / "requests.jsonl", 2, col)
        col.send_signal(signal.SIGTERM)
        stdout, stderr = col.communicate(timeout=30)
    assert col.returncode == 143, stderr[-2000:]
    run = read_run(out)  # the final meta.json, requests sorted
    meta = json.loads((out / "meta.json").read_text())
    c = meta["collector"]
    assert meta["finished_at"] is not None and c["interrupted"] is True and c["interrupted_by"] == "SIGTERM"
    assert c["complete"] is False and meta["num_requests"] == len(run)
    ids = [int(r.split("-")[1]) for r in run.requests["request_id"]]
    assert ids == sorted(ids)
    fails = [json.loads(ln) for ln in (out / "failures.jsonl").read_text().splitlines()]
    assert len(fails) == 4 and all(f["error"] == "cancelled" for f in fails)  # the in-flight ones
    assert c["sent"] == len(run) + len(fails) and last_json_line(stdout)["signal"] == "SIGTERM"


def test_ctrl_c_before_the_first_completion_leaves_no_run(tmp_path):
    out = tmp_path / "run"
    with FakeServer("hang") as srv:
        col = subprocess.Popen(_cmd(srv.url, out, "--concurrency", "3", "--num-requests", "9", "--workload",
                                    "fixed:20,4"), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
        deadline = time.monotonic() + 60
        while srv.count < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        col.send_signal(signal.SIGINT)
        stdout, stderr = col.communicate(timeout=30)
    assert col.returncode == 130, stderr[-2000:]
    assert "no request completed (3 failed, first: cancelled; interrupted)" in stderr
    assert not (out / "requests.jsonl").exists() and not (out / "meta.json").exists()
    assert len((out / "failures.jsonl").read_text().splitlines()) == 3


def test_an_absurd_time_scale_is_a_clear_error(tmp_path):
    with FakeServer("ok", time_scale=1e-300) as srv:
        p = _run(srv.url, tmp_path / "run", "--rate", "5", "--num-requests", "3", "--workload", "fixed:20,4")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "time scale 1e-300 (maslat:time_scale" in p.stderr and "outside 0.0001..10000" in p.stderr
    assert not (tmp_path / "run").exists()


def test_validate_policy_scores_failed_live_calls_as_failures(tmp_path):
    """Before: every call answered HTTP 500, live score 100 %, exit 0. Now the failed calls fail their queries
    in the table, the exit status is 1, and --out holds the result."""
    res_path = tmp_path / "res.json"
    with FakeServer("http500") as srv:
        p = subprocess.run([sys.executable, "-m", "maslat", "validate-policy", "single_cot", "--task", "humaneval",
                            "--endpoints", srv.url, "--num-queries", "2", "--concurrency", "2",
                            "--request-timeout", "5", "--out", str(res_path), "--json"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stderr[-2000:]
    res = last_json_line(p.stdout)
    assert res["failed_live_calls"] >= 2 and res["queries_with_failed_calls"] == 2
    assert res["table"]["score_pct"]["live"] == 0.0 and not res["bar"]["passed"]
    assert "live call(s) failed" in p.stderr and "Traceback" not in p.stderr
    assert json.loads(res_path.read_text())["failed_live_calls"] == res["failed_live_calls"]


def test_validate_policy_request_timeout_fails_calls_that_never_answer(tmp_path):
    with FakeServer("hang") as srv:
        t0 = time.monotonic()
        p = subprocess.run([sys.executable, "-m", "maslat", "validate-policy", "single_cot", "--task", "humaneval",
                            "--endpoints", srv.url, "--num-queries", "1", "--concurrency", "1",
                            "--request-timeout", "2", "--json"], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
        wall = time.monotonic() - t0
    assert p.returncode == 1, p.stderr[-2000:]
    res = last_json_line(p.stdout)
    assert res["failed_live_calls"] >= 1 and "no answer within 2.0 s" in json.dumps(res["live"]["endpoints"])
    assert wall < 120  # not 600 s per call


def test_validate_policy_saves_partial_results_when_interrupted(tmp_path):
    res_path = tmp_path / "partial.json"
    with FakeServer("ok", token_gap_s=0.01) as srv:
        p = subprocess.Popen([sys.executable, "-m", "maslat", "validate-policy", "single_cot", "--task", "humaneval",
                              "--endpoints", srv.url, "--num-queries", "40", "--concurrency", "1", "--out",
                              str(res_path)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while srv.count < 4 and time.monotonic() < deadline:
            assert p.poll() is None, p.communicate()[1][-2000:]
            time.sleep(0.05)
        p.send_signal(signal.SIGINT)
        _, stderr = p.communicate(timeout=60)
    assert p.returncode == 130, stderr[-2000:]
    saved = json.loads(res_path.read_text())
    assert saved["partial"] is True and saved["error"].startswith("KeyboardInterrupt")
    assert 1 <= len(saved["live_queries"]) < 40 and "finished live queries saved to" in stderr
