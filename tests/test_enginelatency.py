"""The engine's latency sums (``traces.enginelatency``) and the client-side constant measured with them.

The real-engine tests (``tests/test_real_vllm.py``) check the whole path against vLLM's own ``/metrics``: the
collector records the sums, ``maslat calibrate`` reports the constant as measured."""

from __future__ import annotations

import numpy as np
import pytest

from traces.enginelatency import client_offset, engine_ttft, histogram_sums, latency_deltas

#: what a vLLM v1 server (two engines, one model) prints for the series read here, plus some that are not read
PAGE = """# HELP vllm:request_queue_time_seconds Histogram of time spent in WAITING phase for request.
# TYPE vllm:request_queue_time_seconds histogram
vllm:request_queue_time_seconds_bucket{engine="0",le="0.3",model_name="tiny"} 3.0
vllm:request_queue_time_seconds_sum{engine="0",model_name="tiny"} 1.5
vllm:request_queue_time_seconds_count{engine="0",model_name="tiny"} 4.0
vllm:request_queue_time_seconds_sum{engine="1",model_name="tiny"} 0.5
vllm:request_queue_time_seconds_count{engine="1",model_name="tiny"} 2.0
vllm:request_prefill_time_seconds_sum{engine="0",model_name="tiny"} 0.75
vllm:request_prefill_time_seconds_count{engine="0",model_name="tiny"} 4.0
vllm:request_prefill_time_seconds_sum{engine="1",model_name="tiny"} 0.45
vllm:request_prefill_time_seconds_count{engine="1",model_name="tiny"} 2.0
vllm:request_decode_time_seconds_sum{engine="0",model_name="tiny"} 9.0
vllm:request_decode_time_seconds_count{engine="0",model_name="tiny"} 4.0
vllm:request_queue_time_seconds_created{engine="0",model_name="tiny"} 1.7e9
vllm:num_requests_running{engine="0",model_name="tiny"} 0.0
"""


def test_histogram_sums_add_the_engines_and_skip_other_series():
    h = histogram_sums(PAGE)
    assert h["queue_s"] == (2.0, 6.0)
    assert h["prefill_s"] == pytest.approx((1.2, 6.0))
    assert h["decode_s"] == (9.0, 4.0)
    assert "e2e_s" not in h and "ttft_s" not in h  # not on the page: left out, not zero
    assert histogram_sums("vllm:num_requests_running 1.0\n") == {}


def test_deltas_and_the_engine_ttft():
    first = {"queue_s": (1.0, 10.0), "prefill_s": (2.0, 10.0)}
    last = {"queue_s": (4.0, 16.0), "prefill_s": (2.6, 16.0), "decode_s": (1.0, 1.0)}
    d = latency_deltas(first, last)
    assert d == {"queue_s": {"sum_s": 3.0, "count": 6.0}, "prefill_s": {"sum_s": pytest.approx(0.6), "count": 6.0}}
    mean, how = engine_ttft({"engine_latency": d}, num_requests=6)
    assert mean == pytest.approx(0.6) and "/ 6" in how


@pytest.mark.parametrize(("collector", "n", "why"), [
    ({}, 6, "records no engine latency sums"),
    ({"engine_latency": {"queue_s": {"sum_s": 1.0, "count": 6}}}, 6, "lacks queue_s or prefill_s"),
    ({"engine_latency": {"queue_s": {"sum_s": 1.0, "count": 7}, "prefill_s": {"sum_s": 1.0, "count": 7}}}, 6,
     "counted 7 / 7 requests"),
    ({"counter_resets": 1, "engine_latency": {"queue_s": {"sum_s": 1.0, "count": 6},
                                              "prefill_s": {"sum_s": 1.0, "count": 6}}}, 6, "restarted"),
])
def test_engine_ttft_says_why_it_cannot_measure(collector, n, why):
    mean, how = engine_ttft(collector, num_requests=n)
    assert mean is None and why in how


def test_the_constant_is_the_client_ttft_less_the_engine_ttft_and_the_wait_for_the_step_in_flight():
    client = np.array([0.30, 0.50, 0.40])
    # the engine saw 0.25 s of it on average; the requests waited 0.05 s on average for the step in flight
    assert client_offset(client, 0.25, np.array([0.0, 0.1, 0.05])) == pytest.approx(0.10)
    assert client_offset(client, 0.45, np.zeros(3)) == 0.0  # never negative


def test_measured_constants_that_disagree_are_distrusted():
    from traces.enginelatency import offsets_disagree

    assert offsets_disagree({"light": 0.028, "heavy": 0.033}) is None          # the real CPU engine's two loads
    assert offsets_disagree({"light": 0.028, "heavy": 0.0}) is None            # a clamped heavy run: within 100 ms
    assert offsets_disagree({"light": 0.028, "heavy": None}) is None           # one value: nothing to compare
    assert "clamped" in offsets_disagree({"light": 0.0, "heavy": 0.0})         # sums longer than the client's wait
    why = offsets_disagree({"light": 0.164, "heavy": 0.696})                   # a stand-in lagging the wall clock
    assert why is not None and "light 164.0 ms" in why and "heavy 696.0 ms" in why
