"""Closed forms, queueing theory and conservation laws on the full SimPy world."""

import math

import numpy as np
import pytest

from sim import FixedLengths, PoissonArrivals, PoolSpec, TraceArrivals, Workload, make_world
from sim.world import World

from .helpers import constant_profile


def test_closed_form_deterministic_arrivals_constant_steps():
    # one request every second, 100-token prompts, 50 outputs, 10 ms steps, plenty of room: each request
    # is admitted at its arrival, its prompt fits one step, then 49 decode steps.
    prof = constant_profile(0.01)
    w = make_world(PoolSpec(name="p", profile=prof), seed=0, check_invariants=True)
    Workload(pool="p", arrivals=TraceArrivals(np.arange(20.0)), prompt_tokens=np.full(20, 100),
             output_tokens=np.full(20, 50)).start(w)
    w.run_until_idle()
    df = w.records.to_dataframe()
    assert len(df) == 20
    np.testing.assert_allclose(df["ttft_s"], 0.01, rtol=0, atol=1e-12)
    np.testing.assert_allclose(df["tpot_s"], 0.01, rtol=0, atol=1e-12)
    np.testing.assert_allclose(df["e2e_s"], 0.50, rtol=0, atol=1e-12)
    np.testing.assert_allclose(df["queue_s"], 0.0, atol=1e-12)


def test_frontend_and_streaming_overheads_shift_client_times_exactly():
    from sim import Overheads

    prof = constant_profile(0.01).replace(overheads=Overheads(frontend_s=0.015, post_decode_s=0.001,
                                                                per_output_token_s=0.0001))
    w = make_world(PoolSpec(name="p", profile=prof), seed=0)
    done = []

    def client(env):
        rec = yield w.submit("p", 100, 50, wait=True)
        done.append((env.now, rec))

    w.run(until=w.env.process(client(w.env)))
    now, rec = done[0]
    assert rec.queued_s == pytest.approx(0.015) and rec.ttft_s == pytest.approx(0.01)
    assert now == pytest.approx(0.015 + 0.5 + 0.001 + 50 * 0.0001) == pytest.approx(rec.done_s)


class _Geometric:
    """Output lengths ~ Geometric(p) (mean 1/p), 1-token prompts."""

    def __init__(self, p):
        self.p = p

    def draw(self, rng, n):
        return np.ones(n, np.int64), rng.geometric(self.p, n).astype(np.int64)


def test_single_slot_replica_is_an_m_g_1_queue():
    # max_num_seqs = 1: one request at a time; service = outputs x step time (the prefill step yields the
    # first token). Pollaczek-Khinchine: W = E[S] + lambda E[S^2] / (2 (1 - rho)).
    dt, p, lam = 0.01, 1 / 20, 3.0
    prof = constant_profile(dt, max_num_seqs=1)
    w = make_world(PoolSpec(name="p", profile=prof), seed=7, sample_interval_s=None)
    n = 20_000
    Workload(pool="p", arrivals=PoissonArrivals(lam), lengths=_Geometric(p), num_requests=n).start(w)
    w.run_until_idle()
    e2e = w.records.to_dataframe()["e2e_s"].to_numpy()
    es = dt / p
    es2 = dt**2 * (2 - p) / p**2
    rho = lam * es
    assert rho == pytest.approx(0.6)
    w_theory = es + lam * es2 / (2 * (1 - rho))
    assert e2e.mean() == pytest.approx(w_theory, rel=0.05)


def test_littles_law():
    prof = constant_profile(0.02)
    w = make_world(PoolSpec(name="p", profile=prof, replicas=2), seed=1, sample_interval_s=0.05)
    lam = 6.0
    Workload(pool="p", arrivals=PoissonArrivals(lam), lengths=FixedLengths(300, 120), until_s=600.0).start(w)
    w.run(until=600.0)
    ts = w.timeseries.to_dataframe()
    ts = ts[ts.t_s > 50]  # skip the warm-up
    in_system = ts.groupby("t_s")[["running", "waiting"]].sum().sum(axis=1).mean()
    df = w.records.to_dataframe()
    df = df[(df.queued_s > 50) & (df.last_token_s < 600)]
    assert in_system == pytest.approx(lam * df["e2e_s"].mean(), rel=0.05)


def test_same_seed_same_records_bit_for_bit_and_other_seed_differs():
    from sim import LognormalLengths, load_profile

    def world(seed):
        w = make_world(PoolSpec(name="p", profile=load_profile("h100-llama-3.1-8b"), replicas=2,
                                router="least_kv"), seed=seed)
        Workload(pool="p", arrivals=PoissonArrivals(25.0), lengths=LognormalLengths(800, 200), num_requests=400).start(w)
        w.run_until_idle()
        return w.records.to_dataframe()

    a, b, c = world(11), world(11), world(12)
    assert a.equals(b)
    assert not a["e2e_s"].equals(c["e2e_s"])


def test_requests_that_can_never_fit_are_rejected_with_a_reason_and_counted():
    prof = constant_profile(0.01, max_model_len=4096)
    w = make_world(PoolSpec(name="p", profile=prof), seed=0)
    events = [w.submit("p", 4000, 200, wait=True), w.submit("p", 100, 10, wait=True), w.submit("p", 0, 10, wait=True)]
    w.run_until_idle()
    recs = [e.value for e in events]
    assert [r.status for r in recs] == ["REJECTED", "FINISHED_LENGTH_CAPPED", "REJECTED"]
    assert recs[0].reject_reason == "prompt_plus_max_tokens_exceeds_max_model_len"
    assert w.rejected == {"prompt_plus_max_tokens_exceeds_max_model_len": 1, "empty_prompt": 1}
    assert len(w.records) == 3 and w.num_submitted == 3


def test_no_request_lost_at_any_sample():
    from sim import LognormalLengths, load_profile

    w = make_world(PoolSpec(name="p", profile=load_profile("h100-llama-3.1-8b")), seed=2, sample_interval_s=0.5)
    Workload(pool="p", arrivals=PoissonArrivals(30.0), lengths=LognormalLengths(1500, 300), until_s=30).start(w)
    seen = []
    for t in np.arange(1, 40, 1.0):
        w.run(until=float(t))
        rep = w.replicas[0]
        in_engine = len(rep.core.running) + len(rep.core.waiting) + len(rep._pending)
        seen.append(w.num_submitted == w.num_finished + w.num_rejected + in_engine)
    assert all(seen)
    w.run_until_idle()
    assert w.num_finished == w.num_submitted


def test_worlds_do_not_interfere():
    prof = constant_profile(0.01)
    a = make_world(PoolSpec(name="p", profile=prof), seed=0)
    b = make_world(PoolSpec(name="p", profile=prof), seed=0)
    a.submit("p", 10, 10)
    a.run_until_idle()
    assert b.num_submitted == 0 and len(b.records) == 0 and isinstance(a, World)
    assert math.isclose(a.now, 0.10)


def test_histogram_linear_observation_equals_one_by_one():
    from sim.histogram import ITL_BUCKETS_S, Histogram

    for first, step, n in ((0.004, 0.0003, 500), (0.011, 0.0, 7), (0.3, 0.05, 100), (0.0001, 1e-6, 3)):
        a, b = Histogram(ITL_BUCKETS_S), Histogram(ITL_BUCKETS_S)
        a.observe_linear(first, step, n, weight=3)
        for j in range(n):
            b.observe(first + step * j, 3)
        assert a.counts == b.counts and a.count == b.count and abs(a.sum - b.sum) < 1e-9 * max(1, b.sum)
