"""The command line: --help explains, --json prints one object as the last line."""

import json
import subprocess
import sys

import pytest


def maslat(*args, timeout=300):
    out = subprocess.run([sys.executable, "-m", "maslat", *args], capture_output=True, text=True, timeout=timeout)
    return out


def last_json(out):
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_help_lists_commands():
    out = maslat("--help")
    assert out.returncode == 0 and "simulate" in out.stdout and "bench" in out.stdout


def test_simulate_json_and_files(tmp_path):
    out = maslat("simulate", "--replicas", "2", "--rate", "10", "--duration", "20", "--seed", "3",
                 "--records", str(tmp_path / "r.csv"), "--timeseries", str(tmp_path / "t.parquet"),
                 "--plots", str(tmp_path / "plots"), "--json")
    d = last_json(out)
    assert d["finished"] > 100 and set(d["ttft_s"]) == {"mean", "p50", "p90", "p99"}
    assert (tmp_path / "r.csv").stat().st_size > 0 and (tmp_path / "t.parquet").stat().st_size > 0
    assert (tmp_path / "plots" / "latency_cdf.png").stat().st_size > 10_000
    assert "TTFT" in out.stdout or "ttft_s" in out.stdout


def test_simulate_replays_a_trace(traces_dir):
    trace = traces_dir / "azure2023" / "AzureLLMInferenceTrace_code.csv"
    d = last_json(maslat("simulate", "--trace", str(trace), "--duration", "30", "--replicas", "2", "--json"))
    assert d["finished"] > 10 and d["rejected"] == {}


def test_simulate_bad_input_is_a_clear_error():
    out = maslat("simulate", "--profile", "no-such-profile")
    assert out.returncode == 2 and "unknown profile 'no-such-profile'" in out.stderr


@pytest.mark.slow
def test_bench_sim_small_json():
    d = last_json(maslat("bench", "sim", "--requests", "3000", "--replicas", "2", "--long-requests", "100",
                         "--stepwise-requests", "1200", "--reference-requests", "300", "--json"))
    for k in ("scenario", "requests", "wall_s", "requests_per_s", "sim_s_per_wall_s", "peak_rss_mb", "stepwise"):
        assert k in d
    assert d["stepwise"]["identical_results"] is True and d["finished"] == 3000
    assert d["stepwise"]["requests"] == 1200 and d["jump_speedup"] > 0   # both engines on the same prefix
    ph = d["phases_s"]  # round robin: the replicas run apart, the comparisons in the same worker processes
    sh = d["sharded"]
    assert d["comparisons_beside_main"] is True and sh["replicas"] == 2 and len(sh["replica_cpu_s"]) == 2
    side = ph["stepwise_s"] + ph["reference_s"] + ph["long_outputs_s"]
    assert ph["whole_command_s"] >= ph["saturation_s"] + ph["main_s"] and side <= sh["workers"] * ph["main_s"]
    assert d["whole_command_cpu_s"] > 0
    rf = d["reference"]  # the literal vLLM algorithm on a shorter prefix: same results, slower
    assert rf["identical_results"] is True and rf["requests"] == 300 and rf["fast_speedup_cpu"] > 1
    j = d["jumps"]  # the counters that explain the gain: one boundary per single step or jumped run
    assert j["engine_steps"] == d["engine_steps"] and j["step_boundaries"] == j["engine_steps"] - j["jumped_steps"] + j["jumps"]
    lo = d["long_outputs"]
    assert lo["identical_results"] is True and lo["jumps"]["mean_steps_per_jump"] > 10


@pytest.mark.slow
def test_bench_sim_sharded_equals_single_world_json():
    d = last_json(maslat("bench", "sim", "--requests", "4000", "--replicas", "3", "--long-requests", "0",
                         "--skip-stepwise", "--single-world", "--json"))
    assert d["sharded"]["replicas"] == 3 and d["single_world"]["identical_results"] is True
    assert d["single_world"]["speedup"] > 0 and d["finished"] == 4000
    d = last_json(maslat("bench", "sim", "--requests", "2000", "--replicas", "2", "--long-requests", "0",
                         "--skip-stepwise", "--router", "least_outstanding", "--json"))
    assert d["sharded"] is None and d["finished"] == 2000  # a router that looks at the replicas: one world
