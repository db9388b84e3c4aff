"""MASLatency-v0 on live servers: the LiveBackend behind the env's seam, and `maslat validate-policy`, against the
real stand-in server on loopback (real HTTP, real Prometheus text)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from agents.policies import StaticPolicy
from envs import ClusterConfig, MASLatencyEnv
from maslat.livebackend import Endpoint, LiveBackend, parse_endpoints

from .standin import ROOT, serving, small_profile


def maslat(*args, timeout=600, check=True):
    p = subprocess.run([sys.executable, "-m", "maslat", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


@pytest.fixture(scope="module")
def server():
    with serving("--profile", "h100-llama-3.1-8b", "--time-scale", "1") as srv:
        yield srv


def _sim_env(task="humaneval"):
    return MASLatencyEnv(task, "test", cluster=ClusterConfig(replicas=1, background_rate_per_s=0.0))


def test_gym_api_runs_unchanged_on_live_servers(server):
    """reset/step over HTTP: the same episode as in the simulator (tokens identical by construction, seconds
    within a few %), load observed from /metrics."""
    acts = [np.array([1, 2, 7, 7, 7, 7, 7]), np.array([5, 6, 7, 7, 7, 7, 7])]
    backend = LiveBackend({"llm": Endpoint(url=server.url + "/v1")})
    live = MASLatencyEnv("humaneval", "test", backend=backend)
    try:
        obs, _ = live.reset(seed=3, options={"query": 4})
        assert live.observation_space.contains(obs) and live.world is None
        for a in acts:
            obs, r, term, _, info = live.step(a)
            assert live.observation_space.contains(obs)
            if term:
                break
        assert backend.stats()["llm"]["calls"] == info["llm_calls"] and backend.stats()["llm"]["failed"] == 0
    finally:
        live.close()
    sim = _sim_env()
    sim.reset(seed=3, options={"query": 4})
    for a in acts:
        _, r_sim, term_sim, _, ref = sim.step(a)
        if term_sim:
            break
    for k in ("score", "cp_tokens", "llm_calls", "prompt_tokens", "completion_tokens", "cost_usd", "num_layers"):
        assert info[k] == ref[k], k
    assert r == r_sim and info["rejected_calls"] == 0
    assert info["cp_seconds"] == pytest.approx(ref["cp_seconds"], rel=0.05)


def test_rollout_load_and_concurrency_on_live_servers(server):
    backend = LiveBackend({"llm": server.url})
    env = MASLatencyEnv("gsm8k", "test", backend=backend)
    try:
        env.reset(seed=0)
        seen = []
        two_layers = StaticPolicy("math", [["GenerateCoT"], ["SelfRefine"]])

        class Watch:
            def act(self, obs, episode=0):
                seen.append(obs["load"].copy())
                return two_layers.act(obs)

        infos = env.rollout(Watch(), list(range(6)), concurrency=6)
    finally:
        env.close()
    assert [i["query"] for i in infos] == list(range(6)) and all(i["rejected_calls"] == 0 for i in infos)
    assert len(seen) == 12 and max(s[0] for s in seen) > 0, "running requests on /metrics while queries run"


def test_failed_calls_are_counted_never_hidden(tmp_path):
    """A server whose context is too short answers 400: the calls count as rejected, the bar fails."""
    prof = small_profile(tmp_path, "short", max_model_len=600)
    with serving("--profile", str(prof), "--time-scale", "0.25") as srv:
        out = maslat("validate-policy", "all_parallel", "--task", "humaneval", "--endpoints", srv.url,
                     "--num-queries", "1", "--concurrency", "1", "--profile", str(prof), "--json", check=False)
    assert out.returncode == 1, out.stderr[-3000:]  # a failed live call fails the command (issue 19)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["failed_live_calls"] > 0 and res["live"]["endpoints"]["llm"]["failed"] == res["failed_live_calls"]
    assert not res["bar"]["passed"] and "HTTP 400" in res["live"]["endpoints"]["llm"]["errors"]


def test_bad_endpoints_are_clear_errors(server):
    with pytest.raises(ValueError, match="one URL per model pool"):
        parse_endpoints(["llm=http://a", "http://b"], "llm")
    with pytest.raises(ValueError, match="http"):
        Endpoint(url="localhost:8000")
    b = LiveBackend({"llm": Endpoint(url=server.url, model="no-such-model")})
    with pytest.raises(ValueError, match="not served"):
        b.reset(0)
    b.close()
    p = maslat("validate-policy", "single_cot", "--endpoints", "http://127.0.0.1:9", "--num-queries", "1", check=False)
    assert p.returncode == 2 and "cannot list models" in p.stderr


@pytest.mark.slow
def test_trained_policy_live_table_agrees_with_the_simulated_one(server, tmp_path):
    """Train a small LAMaS controller in simulation, run it against the stand-in, compare the two tables."""
    out = maslat("train", "lamas", "--task", "humaneval", "--epochs", "1", "--background", "none", "--out",
                 str(tmp_path / "ck"), "--json")
    ck = json.loads(out.stdout.strip().splitlines()[-1])["checkpoint"]
    out = maslat("validate-policy", ck, "--endpoints", server.url, "--num-queries", "8", "--concurrency", "4",
                 "--json")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert "predicted" in out.stdout and res["method"] == "lamas" and res["queries"] == 8
    assert res["failed_live_calls"] == 0 and not any(res["mismatched_queries"].values())
    t = res["table"]
    for k in ("score_pct", "cp_tokens_mean", "calls_per_query", "completion_tokens_per_query", "cost_usd_per_query"):
        assert t[k]["live"] == t[k]["simulated"], k
    for k in ("cp_seconds_mean", "cp_seconds_p90"):
        assert abs(t[k]["error_pct"]) <= 5.0, (k, t[k])
    assert res["bar"]["passed"] and res["simulated"]["replicas"] == 1  # the stand-in's engines, from /metrics
