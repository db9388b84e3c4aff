"""Calibration: capacity estimate, reconstruction, determinism, the accuracy bar, the committed profiles."""

import json

import numpy as np
import pytest

import sim
from traces.calibrate import calibrate_run
from traces.hardware import lookup_gpu, lookup_model
from traces.kvcapacity import kv_capacity, memory_estimate_blocks
from traces.reconstruct import observed_events
from traces.replay import replay_run
from traces.runs import read_run, sha256_file

RUNS = ("rtx4090-llama-3.1-8b", "rtxpro6000-llama-3.1-8b")


@pytest.fixture(scope="module")
def runs(traces_dir):
    return {r: read_run(traces_dir / "vllm" / r) for r in RUNS}


def test_memory_rule_reproduces_the_measured_block_count(runs):
    """The one run that records its capacity (2,588 blocks) checks the estimate used when a run does not."""
    run = runs["rtx4090-llama-3.1-8b"]
    blocks, detail = memory_estimate_blocks(
        total_memory_bytes=run.meta.hardware["device_total_memory_bytes"], gpu_memory_utilization=0.9,
        model=lookup_model(run.meta.model), tensor_parallel_size=1, max_num_batched_tokens=2048, block_size=16)
    assert abs(blocks - 2588) <= 2
    naive = int((0.9 * run.meta.hardware["device_total_memory_bytes"] - detail["weight_bytes"]) // 2**21)
    assert naive > 1.2 * 2588  # the "0.9 x memory - weights" rule docs/vllm.md#3-kv-cache warns about


def test_missing_capacity_is_estimated_and_labelled(runs):
    run = runs["rtxpro6000-llama-3.1-8b"]
    cap = kv_capacity(run, lookup_gpu("rtxpro6000"), lookup_model(run.meta.model))
    assert not cap.measured and cap.method == "memory_profile" and cap.source.startswith("ESTIMATED")
    assert 30000 < cap.num_gpu_blocks < 40000
    measured = kv_capacity(runs["rtx4090-llama-3.1-8b"], lookup_gpu("rtx4090"), lookup_model(run.meta.model))
    assert measured.measured and measured.num_gpu_blocks == 2588


def test_observed_step_boundaries(runs):
    """Requests served in one step share its timestamp: 300 first tokens in 181 batches
    (docs/vllm.md#5-timestamps)."""
    ev = observed_events(runs["rtx4090-llama-3.1-8b"].requests)
    firsts = {t for t, m in zip(ev.times_s, ev.members, strict=True) if any(not last for _, last in m)}
    assert len(firsts) == 181 and ev.num_batched > 0
    assert sum(len(m) for m in ev.members) == 600


@pytest.fixture(scope="module")
def pro_calibration(runs):
    return calibrate_run(runs["rtxpro6000-llama-3.1-8b"])


def test_calibration_is_deterministic(runs, pro_calibration):
    again = calibrate_run(runs["rtxpro6000-llama-3.1-8b"])
    assert again.profile.to_json() == pro_calibration.profile.to_json()
    a = {k: v for k, v in pro_calibration.report.items() if k != "wall_s"}
    b = {k: v for k, v in again.report.items() if k != "wall_s"}
    assert json.dumps(a, default=str) == json.dumps(b, default=str)


def test_calibrated_profile_loads_and_says_where_numbers_come_from(pro_calibration, tmp_path):
    prof = pro_calibration.profile
    p = tmp_path / "p.json"
    p.write_text(prof.to_json())
    back = sim.load_profile(p)
    assert back.latency_coefficients == prof.latency_coefficients
    assert back.engine.num_gpu_blocks == prof.engine.num_gpu_blocks and prof.engine.max_num_seqs == 128
    assert prof.sources["engine.num_gpu_blocks"].startswith("ESTIMATED")
    for n in sim.latency.BASIS_NAMES:
        assert f"latency.coefficients.{n}" in prof.sources
    assert prof.derived_from["run"] == "rtxpro6000-llama-3.1-8b"
    rep = pro_calibration.report
    assert rep["kv_capacity"]["method"] == "memory_profile"
    assert rep["nnls"]["residuals"]["decode_spans"]["median_abs_rel_pct"] < 3.0


@pytest.mark.parametrize("name", RUNS)
def test_committed_profiles_meet_the_bar_and_name_their_source(runs, traces_dir, name):
    prof = sim.load_profile(name)
    d = prof.derived_from
    assert d["run"] == name
    for f, h in d["files"].items():
        assert sha256_file(traces_dir / "vllm" / name / f) == h["sha256"], f"{f} changed since calibration"
    out = replay_run(runs[name], prof)
    assert out["bar"]["passed"], out["bar"]
    for m in ("ttft_s", "tpot_s", "e2e_s"):
        for s in ("mean", "p50", "p90"):
            assert abs(out["metrics"][m][s]["error_pct"]) <= 5.0
    if name.startswith("rtxpro6000"):
        assert out["timeseries_mae"]["kv_cache_usage_perc"] is None  # kv_cache_pct not recorded there
    else:
        assert out["timeseries_mae"]["kv_cache_usage_perc"] < 0.05


@pytest.mark.slow
@pytest.mark.parametrize("name", RUNS)
def test_accuracy_bar_from_scratch(runs, name):
    """Calibrated on the run: <= 5 % on mean/p50/p90; calibrated on the first half: <= 10 % on the second."""
    run = runs[name]
    full = replay_run(run, calibrate_run(run).profile)
    assert full["bar"]["passed"] and full["bar"]["threshold_pct"] == 5.0, full["bar"]
    held = replay_run(run, sim.load_profile(name), fit_fraction=0.5)
    assert held["bar"]["passed"] and held["bar"]["threshold_pct"] == 10.0, held["bar"]
    assert held["evaluated_requests"] == int((run.offsets_s > 0.5 * run.offsets_s.max()).sum())
    assert held["calibration"]["fit_requests"] + held["evaluated_requests"] == len(run)
    assert np.isfinite(held["timeseries_mae"]["running"])


def test_replay_uses_the_runs_engine_settings(runs):
    """Another profile supplies hardware and latency; the engine limits and measured capacity are the run's."""
    out = replay_run(runs["rtx4090-llama-3.1-8b"], "h100-llama-3.1-8b")
    assert out["engine"] == {"max_num_seqs": 256, "max_num_batched_tokens": 2048, "max_model_len": 32768,
                             "block_size": 16, "num_gpu_blocks": 2588}
    assert out["engine_overridden_by_run"]["num_gpu_blocks"] == {"profile": 27000, "run": 2588}
    assert out["simulated"]["preemptions"] > 0  # KV-bound with the measured capacity
    pro = replay_run(runs["rtxpro6000-llama-3.1-8b"], "h100-llama-3.1-8b")
    assert pro["engine"]["num_gpu_blocks"] == 27000  # not measured by the run: the profile's stays
    assert pro["engine"]["max_num_seqs"] == 128
    # an H100 is much faster than these GPUs: the replay says so, the bar fails
    assert not out["bar"]["passed"] and out["metrics"]["tpot_s"]["p50"]["error_pct"] < -20
