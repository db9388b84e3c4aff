"""A pool simulated replica by replica (``sim.shard``) records exactly what the whole world records: the
same bits in every record column, id, status, time-series sample, engine counter, histogram and summary,
in every engine mode."""

from dataclasses import replace

import numpy as np
import pytest

from sim import (
    EmpiricalLengths,
    GammaArrivals,
    LognormalLengths,
    PoissonArrivals,
    PoolSpec,
    Workload,
    load_profile,
    make_world,
)
from sim.routing import make_router, static_assignment
from sim.shard import draw_workload, merge_shards, shard_requests, simulate_shard
from sim.summary import COUNTERS, latency_summary

from .helpers import ENGINE_MODES as MODES


def _small_cache_profile():
    prof = load_profile("h100-llama-3.1-8b")
    return prof.replace(engine=replace(prof.engine, num_gpu_blocks=900, max_model_len=8192, max_num_seqs=64,
                                       max_num_batched_tokens=2048))


SCENARIOS = {
    # busy: queues, chunked prefills, truncated decode runs; one replica gets no request at all
    "busy": lambda: (PoolSpec(name="p", profile=load_profile("h100-llama-3.1-8b"), replicas=4), 11,
                     PoissonArrivals(70.0), LognormalLengths(1000, 250), 1202),
    # pressure: a small cache per replica under bursty arrivals (preemptions), a different capacity each
    "pressure": lambda: (PoolSpec(name="p", profile=_small_cache_profile(), replicas=3,
                                  num_gpu_blocks_per_replica=(900, 700, 1100)), 5,
                         GammaArrivals(25.0, cv=3.0), LognormalLengths(1200, 400, max_output=1500), 500),
}


def _whole(spec, seed, arrivals, lengths, n, mode):
    w = make_world(spec, seed=seed, **MODES[mode])
    Workload(pool="p", arrivals=arrivals, lengths=lengths, num_requests=n, name="bench").start(w)
    w.run_until_idle()
    return w


def _sharded(spec, seed, arrivals, lengths, n, mode, **kw):
    t, p, o = draw_workload(seed, "bench", arrivals, lengths, n)
    who = static_assignment(make_router(spec.router), n, spec.replicas)
    shards = []
    for i in range(spec.replicas):
        k = shard_requests(who, i)
        shards.append(simulate_shard(spec, i, t[k], p[k], o[k], k + 1, seed=seed, **MODES[mode], **kw))
    return merge_shards(shards[::-1])  # any order


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_sharded_run_equals_the_whole_world(scenario, mode):
    spec, seed, arrivals, lengths, n = SCENARIOS[scenario]()
    _check_equal(spec, seed, arrivals, lengths, n, mode)


def test_an_idle_replica_is_sampled_to_the_end():
    spec, seed, arrivals, lengths, _ = SCENARIOS["busy"]()
    _check_equal(spec, seed, arrivals, lengths, 3, "jump")  # 3 requests, 4 replicas: one shard is empty


def _check_equal(spec, seed, arrivals, lengths, n, mode):
    w = _whole(spec, seed, arrivals, lengths, n, mode)
    m = _sharded(spec, seed, arrivals, lengths, n, mode)
    order = np.argsort(w.records.columns()["seq_id"], kind="stable")
    for k, col in w.records.columns().items():
        assert m["columns"][k].tobytes() == np.ascontiguousarray(col[order]).tobytes(), k
    assert m["request_id"] == [w.records.request_id[i] for i in order]
    assert m["status"] == [w.records.status[i] for i in order]
    ts = w.timeseries.to_dataframe()
    for k, col in m["timeseries"].items():
        assert col.tobytes() == ts[k].to_numpy(np.float64).tobytes(), k
    for rep, c, h, st in zip(w.replicas, m["counters"], m["per_replica_histograms"], m["state"], strict=True):
        core = rep.core
        assert c == {k: getattr(core, k) for k in COUNTERS}
        assert h == {name: (list(getattr(core, name).counts), getattr(core, name).count, getattr(core, name).sum)
                     for name in ("itl", "ttft", "iteration_tokens")}
        same = (core.generation_tokens, core.prompt_tokens, core.num_finished, core.num_aborted, core.ttft_ema_s,
                core.kv.free, core.t)
        assert repr(st) == repr(same)  # repr: NaN == NaN
    assert repr(m["summary"]) == repr(latency_summary(w))


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_merged_histograms_and_summary(scenario):
    spec, seed, arrivals, lengths, n = SCENARIOS[scenario]()
    w = _whole(spec, seed, arrivals, lengths, n, "jump")
    m = _sharded(spec, seed, arrivals, lengths, n, "jump")
    s = latency_summary(w)
    assert s["finished"] > 0.9 * n and repr(m["summary"]) == repr(s)
    lean = _sharded(spec, seed, arrivals, lengths, n, "jump", strings=False)  # what the bench sends back
    assert "status" not in lean and repr(lean["summary"]) == repr(s) and (lean["ok"] == m["ok"]).all()
    if scenario == "pressure":
        assert s["preemptions"] > 0 and s["rejected"]  # the scenario does what it says
    else:
        assert m["counters"][0]["num_truncated_jumps"] > 0
    hist = {name: ([sum(c) for c in zip(*(list(getattr(r.core, name).counts) for r in w.replicas), strict=True)],
                   sum(getattr(r.core, name).count for r in w.replicas)) for name in ("itl", "ttft", "iteration_tokens")}
    assert m["histograms"] == hist


def test_draw_workload_matches_the_workload():
    lengths = EmpiricalLengths(np.arange(1, 500), np.arange(600, 101, -1))
    w = make_world(PoolSpec(name="p", profile=load_profile("h100-llama-3.1-8b")), seed=3, sample_interval_s=None)
    Workload(pool="p", arrivals=PoissonArrivals(5.0), lengths=lengths, num_requests=9000, name="x",
             start_s=2.5).start(w)
    w.run_until_idle()
    t, p, o = draw_workload(3, "x", PoissonArrivals(5.0), lengths, 9000, start_s=2.5)
    c = w.records.columns()
    order = np.argsort(c["seq_id"])
    assert t.tobytes() == c["arrival_s"][order].tobytes()
    assert (p == c["prompt_tokens"][order]).all() and len(p) == 9000


def test_state_dependent_routers_have_no_static_assignment():
    assert static_assignment(make_router("least_outstanding"), 10, 3) is None
    assert static_assignment(make_router("least_kv"), 10, 3) is None
    assert static_assignment(make_router("round_robin"), 5, 3).tolist() == [0, 1, 2, 0, 1]
