"""`maslat calibrate` / `maslat replay` as a user runs them: real processes."""

import json
import os
import subprocess
import sys

import sim

EXPECTED_METRIC_KEYS = {"ttft_s", "tpot_s", "e2e_s"}


def _run(args, traces_dir, cwd=None):
    env = {**os.environ, "MASLAT_TRACES_DIR": str(traces_dir)}
    p = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def test_replay_json_last_line_and_plots(traces_dir, tmp_path):
    run = traces_dir / "vllm" / "rtxpro6000-llama-3.1-8b"
    out = _run(["-m", "maslat", "replay", str(run), "--profile", "rtxpro6000-llama-3.1-8b", "--json", "--check",
                "--plots", str(tmp_path / "plots")], traces_dir)
    lines = out.strip().splitlines()
    assert len(lines) > 5  # a human-readable table first
    obj = json.loads(lines[-1])
    assert obj["run"] == "rtxpro6000-llama-3.1-8b" and obj["profile"] == "rtxpro6000-llama-3.1-8b"
    assert obj["fit_fraction"] is None
    assert set(obj["metrics"]) == EXPECTED_METRIC_KEYS
    for m in EXPECTED_METRIC_KEYS:
        for s in ("mean", "p50", "p90", "p99"):
            assert set(obj["metrics"][m][s]) == {"measured", "simulated", "error_pct"}
    mae = obj["timeseries_mae"]
    assert mae["running"] >= 0 and mae["waiting"] >= 0 and mae["kv_cache_usage_perc"] is None
    assert obj["bar"]["passed"]
    for p in obj["plots"].values():
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_calibrate_writes_a_loadable_profile(traces_dir, tmp_path):
    run = traces_dir / "vllm" / "rtxpro6000-llama-3.1-8b"
    prof_path = tmp_path / "p.json"
    out = _run(["-m", "maslat", "calibrate", str(run), "--out", str(prof_path), "--max-evals", "6", "--json"],
               traces_dir)
    obj = json.loads(out.strip().splitlines()[-1])
    assert obj["profile_path"] == str(prof_path) and obj["kv_capacity"]["measured"] is False
    assert "coefficients:" in out and "residuals" in out
    prof = sim.load_profile(prof_path)
    assert prof.derived_from["command"].startswith("maslat calibrate $MASLAT_TRACES_DIR/vllm/rtxpro6000")
    assert prof.engine.max_num_seqs == 128


def test_bad_run_directory_is_a_clear_error(traces_dir, tmp_path):
    env = {**os.environ, "MASLAT_TRACES_DIR": str(traces_dir)}
    p = subprocess.run([sys.executable, "-m", "maslat", "calibrate", str(tmp_path), "--out", str(tmp_path / "x.json")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2 and "requests.jsonl: missing" in p.stderr
