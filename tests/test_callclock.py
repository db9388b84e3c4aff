"""``maslat.callclock``: a validation's call seconds split into the engine core's phases and the serving path around
them, simulated (exact, from the simulator's requests) and live (the stand-in server's own latency histograms over
real HTTP), and the cases where the live engine sums cannot be had."""

import numpy as np
import pytest

from envs import ClusterConfig, MASLatencyEnv
from maslat.callclock import PHASES, CallTally, TalliedSimBackend, call_clock, scrape_sums

from .standin import serving


@pytest.mark.parametrize("profile", ["h100-llama-3.1-8b", "rtx4090-llama-3.1-8b"])
def test_simulated_tally_is_the_engine_phases_plus_the_profiles_overheads(profile):
    """Per served call the client's seconds are the frontend delay, the three engine phases and the post-decode
    terms: the tally's serving path is exactly the profile's overheads, whatever the load."""
    import sim

    cluster = ClusterConfig(profile=profile, replicas=1, background_rate_per_s=0.0)
    be = TalliedSimBackend(cluster)
    env = MASLatencyEnv("humaneval", "test", backend=be)
    env.reset(seed=3)
    rng = np.random.default_rng(3)
    k = len(env.operator_names)

    class Random:
        def act(self, obs, episode=0):
            return rng.integers(0, k + 1, k)

    infos = env.rollout(Random(), list(range(6)), concurrency=3)
    ov = sim.load_profile(profile).overheads
    calls, out_tokens = sum(i["llm_calls"] for i in infos), sum(i["completion_tokens"] for i in infos)
    assert be.tally.calls == calls > 0
    serving = be.tally.client_s - sum(be.tally.phases.values())
    want = calls * (ov.frontend_s + ov.post_decode_s) + ov.per_output_token_s * out_tokens
    assert serving == pytest.approx(want, rel=1e-6, abs=1e-6)
    assert all(be.tally.phases[p] >= 0 for p in PHASES) and be.tally.phases["decode_s"] > 0


def _tally(calls: int, client_s: float, phases: dict | None = None) -> CallTally:
    t = CallTally()
    for _ in range(calls):
        t.add(client_s / calls, {k: v / calls for k, v in (phases or {}).items()})
    return t


def test_call_clock_errors_and_the_cases_without_engine_sums():
    before = {"queue_s": (1.0, 10), "prefill_s": (2.0, 10), "decode_s": (30.0, 10), "e2e_s": (34.0, 10)}
    after = {"queue_s": (2.0, 14), "prefill_s": (4.0, 14), "decode_s": (70.0, 14), "e2e_s": (80.0, 14)}
    live = _tally(4, 46.0)
    simulated = _tally(4, 44.0, {"queue_s": 0.5, "prefill_s": 2.2, "decode_s": 36.0})
    c = call_clock(live, before, after, simulated)
    assert c["engine"] == "measured"
    assert c["live"]["decode_s"] == pytest.approx(40.0) and c["live"]["server_e2e_s"] == pytest.approx(46.0)
    assert c["error_pct"]["decode_s"] == pytest.approx(-10.0) and c["error_pct"]["prefill_s"] == pytest.approx(10.0)
    assert c["error_pct"]["client_s"] == pytest.approx(100 * (44 - 46) / 46)
    assert c["live"]["serving_s_per_call"] == pytest.approx((46 - 43) / 4)
    assert c["simulated"]["serving_s_per_call"] == pytest.approx((44 - 38.7) / 4)
    # other traffic on the server during the run: its histograms count more requests than the run's calls
    c = call_clock(_tally(3, 46.0), before, after, simulated)
    assert "other traffic" in c["engine"] and "decode_s" not in c["error_pct"]
    assert "could not be read" in call_clock(live, None, after, simulated)["engine"]
    assert "no prefill_s, decode_s" in call_clock(live, {"queue_s": (0, 0)}, {"queue_s": (1, 4)}, simulated)["engine"]
    assert scrape_sums("http://127.0.0.1:9/metrics", timeout_s=2) is None


def test_live_validation_reports_the_engine_phases_of_the_stand_in():
    """``validate_policy`` against the stand-in server (the simulator behind real HTTP, its own /metrics): the live
    engine sums are measured, count exactly the run's calls, and agree with the simulated ones."""
    from maslat.commands._mas import load_checkpoint
    from maslat.validation import validate_policy

    with serving("--profile", "h100-llama-3.1-8b", "--time-scale", "1") as srv:
        args, ctrl = load_checkpoint("single_cot", task="humaneval", seed=0, concurrency=3, cluster=ClusterConfig())
        out = validate_policy(args, ctrl, {"llm": srv.url}, num_queries=6, concurrency=3)
    c = out["call_clock"]
    assert c["engine"] == "measured", c
    assert c["live"]["calls"] == c["simulated"]["calls"] > 0
    # the dominant phase and the client's seconds to a few %; the short queue and prefill phases (a few % of the
    # calls' seconds, moved by when exactly the HTTP requests arrived) to 2 % of the calls' seconds
    assert abs(c["error_pct"]["decode_s"]) < 5.0 and abs(c["error_pct"]["client_s"]) < 5.0, c
    for k in ("queue_s", "prefill_s"):
        assert abs(c["simulated"][k] - c["live"][k]) < 0.02 * c["live"]["client_s"], (k, c)
    # the stand-in's serving path is the profile's frontend delay (plus HTTP on loopback), as simulated
    assert abs(c["live"]["serving_s_per_call"] - c["simulated"]["serving_s_per_call"]) < 0.05, c
