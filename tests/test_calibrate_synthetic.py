"""The method is general: a run of another model, GPU and TP degree, with known coefficients, calibrates back.

The "measured" run is produced by the simulator (Llama-3.1-70B, TP 4, H100, KV-bound with preemptions),
written with ``write_run`` in the measured format, and calibrated like any vLLM run.
"""

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

import sim
from traces.calibrate import calibrate_run, calibrate_runs
from traces.replay import replay_run
from traces.runs import read_run, write_run

TRUTH = {"weight": 1.15, "dc_kv": 2.6, "pf_compute": 1.7, "req_s": 25e-6}
START_EPOCH_S = 1767225600.0  # 2026-01-01T00:00:00Z


def _synthetic_run(path):
    base = sim.load_profile("h100-llama-3.1-70b-tp4")
    prof = base.replace(engine=replace(base.engine, max_num_seqs=128, max_num_batched_tokens=4096,
                                       num_gpu_blocks=6000, max_model_len=16384),
                        overheads=sim.Overheads(), latency_coefficients={**base.latency_coefficients, **TRUTH})
    w = sim.make_world(sim.PoolSpec(name="p", profile=prof), seed=7, sample_interval_s=1.0)
    sim.Workload(pool="p", arrivals=sim.PoissonArrivals(12.0),
                 lengths=sim.LognormalLengths(900, 400, max_output=1500), num_requests=300).start(w)
    w.run_until_idle()
    w.run(until=w.now + 2)
    df = w.records.to_dataframe().sort_values("queued_s")
    mono = 5000.0  # the engine clock has another origin than the wall clock
    req = pd.DataFrame({"request_id": [f"r{i}" for i in range(len(df))], "input_toks": df.prompt_tokens.values,
                        "output_toks": df.output_tokens.values, "arrival_time": START_EPOCH_S + df.arrival_s.values,
                        **{f"{k}_ts": mono + df[f"{k}_s"].values for k in ("queued", "scheduled", "first_token",
                                                                            "last_token")}})
    ts = w.timeseries.to_dataframe()
    tsr = pd.DataFrame({"t": ts.t_s.values, "prompt_throughput": ts.prompt_throughput.values.astype(float),
                        "gen_throughput": ts.gen_throughput.values.astype(float), "running": ts.running.values,
                        "waiting": ts.waiting.values, "kv_cache_pct": np.round(100 * ts.kv_cache_usage_perc.values, 2)})
    meta = {"model": "meta-llama/Llama-3.1-70B", "vllm_version": "0.19.0",
            "engine_kwargs": {"model": "meta-llama/Llama-3.1-70B", "tensor_parallel_size": 4, "max_num_seqs": 128,
                              "max_num_batched_tokens": 4096, "max_model_len": 16384,
                              "async_scheduling": False},  # the simulator schedules synchronously
            "kv_cache": {"num_gpu_blocks": 6000, "block_size": 16, "enable_prefix_caching": True},
            "hardware": {"device_name": "NVIDIA H100 80GB HBM3", "device_count": 4},
            "started_at": "2026-01-01T00:00:00Z", "tick_seconds": 1.0}
    write_run(path, requests=req, meta=meta, timeseries=tsr)
    return w.replicas[0].core.num_preemptions


def test_known_coefficients_are_recovered(tmp_path):
    preemptions = _synthetic_run(tmp_path / "run")
    assert preemptions > 0
    run = read_run(tmp_path / "run")
    res = calibrate_run(run, max_evals=20)
    assert res.report["hardware"]["table_entry"] == "h100-sxm" and res.profile.parallel.tensor_parallel_size == 4
    assert res.report["kv_capacity"]["measured"]
    assert res.profile.latency_coefficients["pf_compute"] == pytest.approx(TRUTH["pf_compute"], rel=0.10)
    # weight and dc_kv are nearly collinear in a KV-bound run (stepfit docstring): compare step times, which are
    # identified, at compositions the run went through
    fitted = sim.PhysicsStepModel.from_profile(res.profile)
    true = sim.PhysicsStepModel.from_profile(res.profile.replace(
        latency_coefficients={**res.profile.latency_coefficients, **TRUTH, "tp": 0.75}))
    for n_dec, ctx, chunks in ((32, 32 * 1200, ()), (90, 90 * 1000, ()), (40, 40 * 1100, ((2048, 0),)),
                               (0, 0, ((4096, 0),))):
        assert fitted.step_seconds(n_dec, ctx, chunks) == pytest.approx(true.step_seconds(n_dec, ctx, chunks),
                                                                         rel=0.05)
    out = replay_run(run, res.profile)
    worst = max(abs(out["metrics"][m][s]["error_pct"]) for m in out["metrics"] for s in ("mean", "p50", "p90"))
    assert worst < 2.0
    assert out["timeseries_mae"]["kv_cache_usage_perc"] < 0.03 and out["timeseries_mae"]["running"] < 2.0


CLIENT_OFFSET_S = 0.025  # the "API server + HTTP" constant the client-side runs below carry


def _client_side_run(path, rate_per_s, seed):
    """A run as `maslat collect` writes it, produced by the simulator: client send / first / last chunk times."""
    base = sim.load_profile("h100-llama-3.1-8b")
    prof = base.replace(engine=replace(base.engine, max_num_seqs=16),
                        overheads=sim.Overheads(frontend_s=CLIENT_OFFSET_S, post_decode_s=0.001))
    w = sim.make_world(sim.PoolSpec(name="p", profile=prof), seed=seed, sample_interval_s=1.0)
    sim.Workload(pool="p", arrivals=sim.PoissonArrivals(rate_per_s),
                 lengths=sim.LognormalLengths(1000, 100, max_output=600), num_requests=120).start(w)
    w.run_until_idle()
    df = w.records.to_dataframe().sort_values("arrival_s")
    mono = 700.0
    req = pd.DataFrame({"request_id": [f"bench-{i}" for i in range(len(df))], "input_toks": df.prompt_tokens.values,
                        "output_toks": df.output_tokens.values, "arrival_time": START_EPOCH_S + df.arrival_s.values,
                        "queued_ts": mono + df.arrival_s.values, "scheduled_ts": None,
                        "first_token_ts": mono + df.first_token_s.values, "last_token_ts": mono + df.last_token_s.values})
    meta = {"model": "meta-llama/Llama-3.1-8B", "vllm_version": "0.19.0",
            "engine_kwargs": {"max_num_seqs": 16, "max_num_batched_tokens": 8192, "async_scheduling": False},
            "kv_cache": {"num_gpu_blocks": prof.engine.num_gpu_blocks, "block_size": 16},
            "started_at": "2026-01-01T00:00:00Z", "collector": {"timestamps": "client"}}
    write_run(path, requests=req.to_dict("records"), meta=meta)
    return prof


def test_client_side_runs_calibrate_back_with_their_offset(tmp_path):
    """Two client-side load levels (light: the offset and prefill cost; heavy: queueing) recover the served
    profile: the client-side constant within 1 ms, the identified coefficients, replays within 1 %."""
    truth = _client_side_run(tmp_path / "light", 3.0, seed=1)
    _client_side_run(tmp_path / "heavy", 30.0, seed=2)
    runs = [read_run(tmp_path / n) for n in ("light", "heavy")]
    assert all(r.client_side and r.timestamps == "client" for r in runs)
    res = calibrate_runs(runs, gpu="h100-sxm")
    assert res.fit.offset_s == pytest.approx(CLIENT_OFFSET_S, abs=1e-3)
    assert res.profile.overheads.frontend_s == pytest.approx(CLIENT_OFFSET_S, abs=1e-3)
    assert res.report["overheads"]["frontend_fitted"] and [p["timestamps"] for p in res.report["runs"]] == ["client"] * 2
    for k in ("weight", "pf_compute"):
        assert res.profile.latency_coefficients[k] == pytest.approx(truth.latency_coefficients[k], rel=0.03)
    for run in runs:
        out = replay_run(run, res.profile)
        worst = max(abs(out["metrics"][m][s]["error_pct"]) for m in out["metrics"] for s in ("mean", "p50", "p90"))
        assert worst < 1.0, (run.name, out["bar"])
    # the replay compares like with like: without the client-side constant, the light run's TTFT is far off
    bare = replay_run(runs[0], res.profile.replace(overheads=sim.Overheads()))
    assert bare["metrics"]["ttft_s"]["mean"]["error_pct"] < -20


def test_engine_side_run_without_scheduled_ts_is_refused(tmp_path):
    _client_side_run(tmp_path / "run", 3.0, seed=1)
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    del meta["collector"]
    (tmp_path / "run" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="without scheduled_ts"):
        calibrate_run(tmp_path / "run")
