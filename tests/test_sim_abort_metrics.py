"""Aborts (a client going away) and the vLLM Prometheus metrics of simulated replicas."""

import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from sim import PoolSpec, RequestStatus, load_profile, make_world
from sim.metrics import MetricsBook

from .helpers import ENGINE_MODES as MODES


def _profile(**engine):
    p = load_profile("h100-llama-3.1-8b")
    return p.replace(engine=replace(p.engine, **engine)) if engine else p


def _world(profile, mode="fast", replicas=1, **kw):
    return make_world(PoolSpec(name="m", profile=profile, replicas=replicas), seed=0, check_invariants=True,
                      **MODES[mode], **kw)


def _abort_later(world, t, reqs, k):
    world.env.call_at(t, lambda _e: world.abort(reqs[k]))


def test_abort_waiting_request_leaves_queue_and_is_recorded():
    w = _world(_profile(max_num_seqs=1))
    a = w.open_request("m", 500, 200)
    b = w.open_request("m", 500, 200)
    w.run(until=0.5)
    assert a.status == RequestStatus.RUNNING and b.status == RequestStatus.WAITING
    assert w.abort(b)
    assert not w.abort(b), "a second abort of the same request is refused"
    w.run_until_idle()
    assert b.status == RequestStatus.FINISHED_ABORTED and a.status == RequestStatus.FINISHED_LENGTH_CAPPED
    df = w.records.to_dataframe().set_index("request_id")
    assert df.loc[b.request_id, "status"] == "FINISHED_ABORTED"
    assert df.loc[b.request_id, "output_tokens"] == 0 and math.isnan(df.loc[b.request_id, "first_token_s"])
    assert b.on_finish.triggered and b.on_finish.value.status == "FINISHED_ABORTED"
    assert w.num_aborted == 1 and w.replicas[0].outstanding == 0
    core = w.replicas[0].core
    assert core.kv.free == core.kv.num_usable, "every block is free again"


def test_abort_running_request_frees_its_blocks_at_the_next_step():
    w = _world(_profile())
    reqs = [w.open_request("m", 2000, 2000) for _ in range(4)]
    w.run(until=1.0)
    core = w.replicas[0].core
    used_before = core.kv.num_usable - core.kv.free
    victim = reqs[1]
    assert victim.status == RequestStatus.RUNNING and victim.num_output_tokens > 0
    held = -(-(victim.num_prompt_tokens + victim.num_output_tokens) // 16)
    w.abort(victim)
    w.run(until=w.now + 0.2)  # a few step boundaries
    used_after = core.kv.num_usable - core.kv.free
    assert victim.status == RequestStatus.FINISHED_ABORTED
    assert used_after < used_before - held + 3 * 4, "the aborted request's blocks went back to the pool"
    assert len(core.running) == 3
    rec = victim.on_finish.value
    assert rec.output_tokens == victim.num_output_tokens > 0 and rec.last_token_s <= w.now
    w.run_until_idle()
    assert all(r.status == RequestStatus.FINISHED_LENGTH_CAPPED for r in reqs if r is not victim)


def test_abort_in_the_frontend_is_immediate():
    w = _world(_profile())
    assert w.replicas[0].overheads.frontend_s > 0
    r = w.open_request("m", 100, 10)
    assert w.abort(r)
    w.run_until_idle()
    assert r.status == RequestStatus.FINISHED_ABORTED and w.replicas[0].core.num_steps == 0


@pytest.mark.parametrize("caching", [True, False])
def test_aborts_give_identical_results_in_every_engine_mode(caching):
    """Aborts land on step boundaries: a decode run in flight is cut at the step in progress, so the
    jump, fast and reference engines agree to the bit."""
    prof = _profile(num_gpu_blocks=1200, max_model_len=8192, enable_prefix_caching=caching)
    frames = []
    for mode in MODES:
        w = _world(prof, mode, replicas=2)
        rng = np.random.default_rng(1)
        reqs = []
        for j, k in enumerate(range(0, 60, 7)):  # scheduled up front: call_at never goes back in time
            _abort_later(w, 0.05 * k + 0.3 + 0.05 * j, reqs, k)
        for i in range(60):
            t = float(i) * 0.05
            if t > 0:
                w.run(until=t + 1e-9)
            reqs.append(w.open_request("m", int(rng.integers(100, 1500)), int(rng.integers(5, 300))))
        w.run_until_idle()
        df = w.records.to_dataframe().sort_values("request_id").reset_index(drop=True)
        assert (df["status"] == "FINISHED_ABORTED").sum() >= 3
        frames.append(df)
    for df in frames[1:]:
        pd.testing.assert_frame_equal(frames[0], df)


def test_metrics_book_matches_records():
    w = _world(_profile(), replicas=2)
    reqs = [w.open_request("m", 300 + 50 * i, 20 + i) for i in range(20)]
    w.run(until=0.3)
    w.abort(reqs[-1])
    w.run_until_idle()
    book = MetricsBook(w, "m", "llama")
    fams = {m.name: m for m in book.collect()}
    df = w.records.to_dataframe()
    ok = df[df.status == "FINISHED_LENGTH_CAPPED"]
    success = {(s[0][1], s[0][2]): s[1] for s in fams["vllm:request_success"].samples}
    for eng in ("0", "1"):
        mine = ok[ok.replica == int(eng)]
        assert success[(eng, "length")] == len(mine)
        _, buckets, total = next(s for s in fams["vllm:e2e_request_latency_seconds"].samples if s[0][1] == eng)
        assert buckets[-1][1] == len(mine)
        assert total == pytest.approx((mine.last_token_s - mine.arrival_s).sum(), rel=1e-12)
        _, buckets, total = next(s for s in fams["vllm:request_prompt_tokens"].samples if s[0][1] == eng)
        assert total == mine.prompt_tokens.sum()
    assert sum(v for (e, r), v in success.items() if r == "abort") == 1
    gen = sum(v for _, v in fams["vllm:generation_tokens"].samples)
    assert gen == df.output_tokens.sum()
    ttft_count = sum(s[1][-1][1] for s in fams["vllm:time_to_first_token_seconds"].samples)
    assert ttft_count == (df.output_tokens > 0).sum()
    # a second collection observes nothing twice
    again = {m.name: m for m in book.collect()}
    assert again["vllm:e2e_request_latency_seconds"].samples == fams["vllm:e2e_request_latency_seconds"].samples
    info = fams["vllm:cache_config_info"]
    assert {dict(zip(info.labelnames, s[0], strict=True))["num_gpu_blocks"] for s in info.samples} == {"27000"}


def test_prometheus_text_parses_back_with_vllm_names_and_types():
    from prometheus_client.parser import text_string_to_metric_families

    from maslat.server.prometheus import MetricsExporter

    w = _world(_profile(), replicas=2)
    for i in range(10):
        w.open_request("m", 400, 30 + i)
    w.run(until=0.2)
    text = MetricsExporter(MetricsBook(w, "m", "meta-llama/Llama-3.1-8B"), lambda: w.now, time_scale=1.0).render()
    fams = {f.name: f for f in text_string_to_metric_families(text.decode())}
    expect = {
        "vllm:num_requests_running": "gauge", "vllm:num_requests_waiting": "gauge",
        "vllm:kv_cache_usage_perc": "gauge", "vllm:num_preemptions": "counter", "vllm:prompt_tokens": "counter",
        "vllm:generation_tokens": "counter", "vllm:request_success": "counter",
        "vllm:prefix_cache_queries": "counter", "vllm:prefix_cache_hits": "counter",
        "vllm:time_to_first_token_seconds": "histogram", "vllm:inter_token_latency_seconds": "histogram",
        "vllm:e2e_request_latency_seconds": "histogram", "vllm:request_queue_time_seconds": "histogram",
        "vllm:request_prefill_time_seconds": "histogram", "vllm:request_decode_time_seconds": "histogram",
        "vllm:request_inference_time_seconds": "histogram",
        "vllm:request_time_per_output_token_seconds": "histogram", "vllm:iteration_tokens_total": "histogram",
        "vllm:request_prompt_tokens": "histogram", "vllm:request_generation_tokens": "histogram",
        "vllm:cache_config_info": "gauge",
    }
    for name, kind in expect.items():
        assert fams[name].type == kind, name
    running = {s.labels["engine"]: s.value for s in fams["vllm:num_requests_running"].samples}
    assert running == {"0": 5.0, "1": 5.0}
    for s in fams["vllm:num_requests_running"].samples:
        assert s.labels["model_name"] == "meta-llama/Llama-3.1-8B"
    assert {s.name for s in fams["vllm:prompt_tokens"].samples} == {"vllm:prompt_tokens_total"}
    reasons = {s.labels["finished_reason"] for s in fams["vllm:request_success"].samples}
    assert reasons == {"stop", "length", "abort"}
    info = fams["vllm:cache_config_info"].samples[0].labels
    assert {"block_size", "num_gpu_blocks", "gpu_memory_utilization", "enable_prefix_caching", "cache_dtype",
            "engine"} <= set(info)
    les = [s.labels["le"] for s in fams["vllm:time_to_first_token_seconds"].samples if s.name.endswith("_bucket")]
    assert les[0] == "0.001" and les[-1] == "+Inf"
