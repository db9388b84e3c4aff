"""maslat collect against the real stand-in server on loopback: run format, restarts, Ctrl-C, phase 2."""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from traces.phase2 import PHASE2_COLUMNS
from traces.runs import REQUEST_FIELDS, TIMESERIES_COLUMNS
from traces.scrape import parse_scrape

from .standin import ROOT, last_json_line, metric_sum, parse_metrics, serving, start_server


def _collect(*args, timeout=120, check=True):
    cmd = [sys.executable, "-m", "maslat", "collect", *args]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def _wait_for_requests(run: Path, n: int, proc, timeout: float = 60.0) -> None:
    """Wait until the collector has recorded ``n`` completed requests (start-up is slow on a busy machine)."""
    deadline = time.monotonic() + timeout
    path = run / "requests.jsonl"
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    raise AssertionError(f"the collector recorded fewer than {n} requests in {timeout} s")


def validate_run(run: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """The run format of docs/vllm.md#8-run-format, checked field by field (and by traces.runs if present)."""
    lines = (run / "requests.jsonl").read_text().splitlines()
    rows = [json.loads(ln) for ln in lines]
    for r in rows:
        assert list(r)[:len(REQUEST_FIELDS)] == list(REQUEST_FIELDS)
        assert r["request_id"].startswith("bench-") and r["scheduled_ts"] is None
        assert isinstance(r["input_toks"], int) and isinstance(r["output_toks"], int) and r["output_toks"] >= 1
        assert r["queued_ts"] <= r["first_token_ts"] <= r["last_token_ts"]
        assert r["arrival_time"] > 1e9, "epoch seconds"
        assert len(r["itls"]) == r["output_toks"] - 1
        assert math.isclose(sum(r["itls"]), r["last_token_ts"] - r["first_token_ts"], abs_tol=1e-6)
    ids = [int(r["request_id"].split("-")[1]) for r in rows]
    assert ids == sorted(ids), "arrival order"
    with (run / "timeseries.csv").open() as f:
        assert next(csv.reader(f)) == list(TIMESERIES_COLUMNS)
    ts = pd.read_csv(run / "timeseries.csv")
    assert ts["t"].tolist() == [float(k) for k in range(1, len(ts) + 1)]
    meta = json.loads((run / "meta.json").read_text())
    for key in ("schema_version", "model", "vllm_version", "engine_kwargs", "dataset_path", "dataset_hash",
                "num_requests", "started_at", "finished_at", "tick_seconds", "collector"):
        assert key in meta, key
    assert meta["num_requests"] == len(rows)
    try:
        from traces.runs import read_run  # issue 3's reader, when it is in the tree
    except ImportError:
        pass
    else:
        read_run(run)
    return pd.DataFrame(rows), ts, meta


def test_collect_writes_a_valid_run_with_exact_token_totals(tmp_path):
    out = tmp_path / "run"
    with serving("--time-scale", "0.5", "--json") as srv:
        p = _collect("--endpoint", srv.url + "/v1", "--rate", "8", "--num-requests", "30", "--workload",
                     "fixed:200,30", "--out", str(out), "--engine-kwarg", "max_num_seqs=1024", "--json")
        page = __import__("urllib.request").request.urlopen(srv.url + "/metrics").read().decode()
        metrics = parse_metrics(page)
    assert_filtered_parse_is_whole(page)
    summary = last_json_line(p.stdout)
    assert summary["ok"] == 30 and summary["failed"] == 0 and summary["time_scale"] == 0.5
    rq, ts, meta = validate_run(out)
    assert (rq.input_toks == 200).all() and (rq.output_toks == 30).all()
    assert ts.prompt_throughput.sum() == rq.input_toks.sum() == 6000, "every prompt token lands in one tick"
    assert ts.gen_throughput.sum() == rq.output_toks.sum() == 900
    assert ts.running.max() >= 1 and (ts.waiting == 0).all()
    assert meta["kv_cache"]["num_gpu_blocks"] == 27000 and meta["kv_cache"]["block_size"] == 16
    assert meta["engine_kwargs"]["max_model_len"] == 131072 and meta["engine_kwargs"]["max_num_seqs"] == 1024
    assert meta["engine_kwargs"]["data_parallel_size"] == 1
    assert meta["collector"]["timestamps"] == "client" and meta["collector"]["complete"] is True
    assert "0.19.0" in meta["vllm_version"]
    # the engine's latency sums cover every request (the collector waits for the server to count the last ones)
    lat = meta["collector"]["engine_latency"]
    assert set(lat) >= {"queue_s", "prefill_s", "decode_s"} and {v["count"] for v in lat.values()} == {30.0}, lat
    # times are converted to the server's simulated seconds: the client's per-request TPOT agrees with
    # the server's own vllm:request_time_per_output_token_seconds (which has no HTTP in it); a wrong
    # conversion would be off by 2x, CPU contention on a busy test machine by some tens of percent
    server_tpot = (metric_sum(metrics, "vllm:request_time_per_output_token_seconds_sum")
                   / metric_sum(metrics, "vllm:request_time_per_output_token_seconds_count"))
    client_tpot = ((rq.last_token_ts - rq.first_token_ts) / (rq.output_toks - 1)).mean()
    assert client_tpot == pytest.approx(server_tpot, rel=0.3)
    # client TTFT >= the server's (the client adds HTTP), and not absurdly more
    server_ttft = (metric_sum(metrics, "vllm:time_to_first_token_seconds_sum")
                   / metric_sum(metrics, "vllm:time_to_first_token_seconds_count"))
    client_ttft = (rq.first_token_ts - rq.queued_ts).mean()
    assert server_ttft * 0.9 < client_ttft < server_ttft + 0.25


def test_closed_loop_keeps_the_concurrency(tmp_path):
    out = tmp_path / "run"
    with serving("--time-scale", "0.5") as srv:
        _collect("--endpoint", srv.url, "--concurrency", "3", "--num-requests", "12", "--workload",
                 "fixed:100,40", "--out", str(out))
    rq, ts, meta = validate_run(out)
    assert len(rq) == 12 and meta["collector"]["load"] == {"mode": "concurrency", "concurrency": 3,
                                                           "workload": "fixed:100,40", "num_requests": 12,
                                                           "duration_s": None}
    # at most 3 requests are ever in flight
    events = sorted([(t, 1) for t in rq.queued_ts] + [(t, -1) for t in rq.last_token_ts])
    level = peak = 0
    for _, d in events:
        level += d
        peak = max(peak, level)
    assert peak <= 3 and ts.running.max() <= 3


def test_collector_survives_a_server_restart_and_records_failures(tmp_path):
    out = tmp_path / "run"
    srv = start_server("--time-scale", "0.5")
    port = srv.port
    col = subprocess.Popen([sys.executable, "-m", "maslat", "collect", "--endpoint", srv.url, "--rate", "6",
                            "--duration", "20", "--workload", "fixed:300,100", "--out", str(out), "--json"],
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_requests(out, 3, col)
        srv.proc.kill()  # the server dies mid-run, with streams open
        srv.proc.communicate(timeout=10)
        time.sleep(1.5)
        srv = start_server("--time-scale", "0.5", port=port)
        stdout, stderr = col.communicate(timeout=90)
    finally:
        srv.proc.kill()
        srv.proc.communicate(timeout=10)
        if col.poll() is None:
            col.kill()
    assert col.returncode == 0, stderr[-2000:]
    summary = last_json_line(stdout)
    rq, ts, meta = validate_run(out)
    fails = [json.loads(ln) for ln in (out / "failures.jsonl").read_text().splitlines()]
    c = meta["collector"]
    assert summary["failed"] == len(fails) == c["failed"] > 0
    assert c["sent"] == c["ok"] + c["failed"] == len(rq) + len(fails)
    assert c["counter_resets"] >= 1 and c["scrape_failures"] >= 1 and c["complete"] is True
    assert any("connect" in f["error"].lower() for f in fails), "requests sent while it was down are recorded"
    outage_start = min(f["queued_ts"] for f in fails)
    assert (rq.queued_ts < outage_start).any() and (rq.queued_ts > max(f["failed_ts"] for f in fails)).any(), \
        "requests succeed before and after the restart"
    assert ts[["running", "waiting"]].isna().any(axis=None), "ticks without a scrape are nan, not invented"


def test_ctrl_c_leaves_a_valid_partial_run(tmp_path):
    out = tmp_path / "run"
    with serving("--time-scale", "0.5") as srv:
        col = subprocess.Popen([sys.executable, "-m", "maslat", "collect", "--endpoint", srv.url, "--concurrency", "4",
                                "--duration", "600", "--workload", "fixed:100,400", "--out", str(out), "--json"],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _wait_for_requests(out, 2, col)
        col.send_signal(signal.SIGINT)
        stdout, stderr = col.communicate(timeout=30)
    assert col.returncode == 130, stderr[-2000:]
    summary = last_json_line(stdout)
    rq, ts, meta = validate_run(out)
    fails = [json.loads(ln) for ln in (out / "failures.jsonl").read_text().splitlines()]
    assert summary["interrupted"] is True and meta["collector"]["interrupted"] is True
    assert meta["collector"]["complete"] is False and meta["finished_at"] is not None
    assert len(rq) >= 1 and len(fails) == 4 and all(f["error"] == "cancelled" for f in fails)
    assert meta["collector"]["sent"] == len(rq) + len(fails)


def test_phase2_dataset_has_the_seed_columns(tmp_path):
    prompts = tmp_path / "intermediate_prompts.csv"
    with prompts.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt_text", "role_id"])
        w.writerow(["Write a Python function that returns the sum of a list.", "Coder"])
        w.writerow(["Review this code: def f(x): return x * 2", "Reviewer"])
    out = tmp_path / "p2"
    with serving("--time-scale", "0.5") as srv:
        p = _collect("--endpoint", srv.url, "--phase2", "--prompts", str(prompts), "--concurrency", "3",
                     "--max-tokens", "24", "--out", str(out), "--model-id", "llama-8b", "--json")
    df = pd.read_csv(out / "phase2.csv")
    assert tuple(df.columns) == PHASE2_COLUMNS
    assert len(df) == 2 * 3
    assert sorted(set(df.strategy_id)) == ["Concise", "DeepThink", "Flash"]
    assert set(df.role_id) == {"Coder", "Reviewer"} and set(df.model_id) == {"llama-8b"}
    assert (df.output_tokens == 24).all(), "the stand-in has no EOS"
    assert (df.queue_running >= 0).all() and df.kv_utilization.between(0, 1).all()
    assert (df.actual_ttft > 0).all() and (df.actual_tpot > 0).all()
    assert df.groupby("role_id").total_input_tokens.nunique().eq(3).all(), "strategy text changes the input"
    rq, _, meta = validate_run(out)
    assert set(rq.kind) == {"probe", "background"} and (rq.kind == "probe").sum() == 6
    assert meta["collector"]["phase2"]["counts"]["phase2_rows"] == 6
    assert last_json_line(p.stdout)["failed"] == 0
    aux = pd.read_csv(out / "phase2_aux.csv")       # row-aligned extras for the estimators
    assert len(aux) == len(df) and list(aux.prompt_row) == [0, 0, 0, 1, 1, 1] and set(aux.concurrency) == {3}
    assert (aux.ttft_ema_ms > 0).all() and (aux["query"] == -1).all()


@pytest.mark.parametrize("args, message", [
    (["--rate", "1", "--num-requests", "1", "--workload", "nonsense:1"], "unknown workload"),
    (["--rate", "1", "--concurrency", "2", "--num-requests", "1"], "exactly one of"),
    (["--rate", "1"], "--num-requests or --duration"),
    (["--phase2", "--concurrency", "1"], "--prompts"),
    (["--rate", "1", "--num-requests", "2", "--workload", "fixed:10,10"], "cannot list models"),
])
def test_bad_collect_arguments_fail_clearly(tmp_path, args, message):
    p = _collect("--endpoint", "http://127.0.0.1:9", "--out", str(tmp_path / "r"), *args, check=False)
    assert p.returncode == 2 and message in p.stderr


def test_an_existing_run_is_not_overwritten(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "meta.json").write_text("{}")
    with serving("--time-scale", "0.5") as srv:
        p = _collect("--endpoint", srv.url, "--rate", "5", "--num-requests", "2", "--workload", "fixed:10,5",
                     "--out", str(out), check=False)
    assert p.returncode == 2 and "already holds a run" in p.stderr


def assert_filtered_parse_is_whole(page: str) -> None:
    """``parse_scrape`` reads only ``relevant_lines`` of a page; the result is what the whole page parses to."""
    import traces.scrape as scrape

    filtered = scrape.parse_scrape(page)
    assert len(scrape.relevant_lines(page)) < len(page)
    orig = scrape.relevant_lines
    scrape.relevant_lines = lambda text: text
    try:
        assert filtered == scrape.parse_scrape(page)
    finally:
        scrape.relevant_lines = orig


def test_scrape_filter_keeps_what_the_parser_reads():
    """Buckets, HELP and TYPE lines, escaped label values and names that share a prefix with a wanted one are
    dropped or kept exactly as the parser would read them."""
    page = "\n".join([
        "# HELP vllm:num_requests_running Number of requests in model execution batches.",
        "# TYPE vllm:num_requests_running gauge",
        'vllm:num_requests_running{engine="0",model_name="m"} 3.0',
        'vllm:num_requests_running_extra{engine="0",model_name="m"} 99.0',
        "# TYPE vllm:prompt_tokens counter",
        'vllm:prompt_tokens_total{engine="0",model_name="m"} 100.0',
        'vllm:prompt_tokens_created{engine="0",model_name="m"} 1.7e9',
        *(f'vllm:time_to_first_token_seconds_bucket{{engine="0",le="{b}",model_name="m"}} {i}.0'
          for i, b in enumerate(("0.001", "0.5", "+Inf"))),
        'vllm:time_to_first_token_seconds_sum{engine="0",model_name="m"} 12.5',
        'vllm:time_to_first_token_seconds_count{engine="0",model_name="m"} 7.0',
        'vllm:cache_config_info{block_size="16",engine="0",note="a \\"b\\" {c} d",num_gpu_blocks="40"} 1.0',
        "process_start_time_seconds 1.7e9",
        "python_gc_objects_collected_total{generation=\"0\"} 5.0",
        ""])
    assert_filtered_parse_is_whole(page)
    s = __import__("traces.scrape").scrape.parse_scrape(page, "m")
    assert (s.running, s.prompt_tokens, s.ttft_sum_s, s.ttft_count) == (3.0, 100.0, 12.5, 7.0)
    assert s.cache_config["note"] == 'a "b" {c} d'


def test_quiet_gc_turns_automatic_collections_off_and_back():
    import gc

    from traces.loadgen import quiet_gc

    assert gc.isenabled()
    with quiet_gc():
        assert not gc.isenabled() and gc.get_freeze_count() > 0
    assert gc.isenabled() and gc.get_freeze_count() == 0
    with pytest.raises(RuntimeError), quiet_gc():
        raise RuntimeError
    assert gc.isenabled()


def test_scrape_reads_vllm_text_old_names_and_engines():
    text = """# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 4.0
vllm:num_requests_running{engine="0",model_name="other"} 50.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 1.0
vllm:num_requests_waiting{engine="1",model_name="m"} 2.0
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{engine="0",model_name="m"} 0.2
vllm:gpu_cache_usage_perc{engine="1",model_name="m"} 0.4
# TYPE vllm:prompt_tokens counter
vllm:prompt_tokens_total{engine="0",model_name="m"} 100.0
vllm:prompt_tokens_total{engine="1",model_name="m"} 50.0
# TYPE process_start_time_seconds gauge
process_start_time_seconds 1.7e9
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",cache_dtype="auto",enable_prefix_caching="True",engine="1",gpu_memory_utilization="0.9",num_gpu_blocks="2588"} 1.0
vllm:cache_config_info{block_size="16",cache_dtype="auto",enable_prefix_caching="True",engine="0",gpu_memory_utilization="0.9",num_gpu_blocks="2590"} 1.0
"""
    assert_filtered_parse_is_whole(text)
    s = parse_scrape(text, "m")
    assert (s.running, s.waiting) == (7.0, 3.0)
    assert s.kv_usage == pytest.approx(0.3) and s.prompt_tokens == 150.0 and s.generation_tokens is None
    assert s.engines == ("0", "1") and s.models == ("m",)
    assert s.cache_config["num_gpu_blocks"] == "2590" and s.num_gpu_blocks_per_engine == {"0": 2590, "1": 2588}
    assert parse_scrape(text).running == 57.0
    assert s.process_start_time_s == 1.7e9
    with pytest.raises(ValueError, match="does not look like a vLLM"):
        parse_scrape("# TYPE foo gauge\nfoo 1.0\n")


def test_trace_replay_with_the_chat_api(tmp_path):
    """--trace-arrivals replays an Azure-format trace in order (lengths and arrival gaps); --api chat."""
    trace = tmp_path / "trace.csv"
    rows = [("0.0000000", 300, 20), ("0.4000000", 120, 10), ("0.4500000", 0, 5), ("1.2000000", 500, 30),
            ("2.0000000", 64, 8)]
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\r\n"
                     + "".join(f"2023-11-16 18:15:4{int(float(t))}.{t.split('.')[1]},{p},{o}\r\n" for t, p, o in rows))
    out = tmp_path / "run"
    with serving("--time-scale", "0.5") as srv:
        _collect("--endpoint", srv.url, "--trace-arrivals", "--workload", str(trace), "--api", "chat",
                 "--out", str(out))
    rq, _, meta = validate_run(out)
    kept = [r for r in rows if r[1] > 0]
    assert meta["collector"]["trace_rows_dropped_zero_length"] == 1
    assert rq.output_toks.tolist() == [o for _, _, o in kept]
    assert rq.input_toks.tolist() == [p for _, p, _ in kept], "filler words are one token each on the stand-in"
    sent = (rq.queued_ts - rq.queued_ts.iloc[0]).to_numpy()
    want = [float(t) for t, _, _ in kept]
    assert sent == pytest.approx(want, abs=0.15)
