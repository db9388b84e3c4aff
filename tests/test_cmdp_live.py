"""MASLatency-CMDP-v0 on live servers: two stand-in servers on loopback (the small and the large model's
profiles, real HTTP and Prometheus text) behind the LiveBackend, and `maslat validate-policy` for CMDP policies."""

import json

import numpy as np
import pytest

from agents.cmdp_policies import make_baseline
from envs.cmdp import MASLatencyCMDPEnv
from envs.loads import LoadRegime
from maslat.livebackend import LiveBackend

from .standin import serving
from .test_live_backend import maslat

QUIET = LoadRegime(name="none", phases=((0.0, 0.0),))


@pytest.fixture(scope="module")
def servers():
    with (serving("--profile", "h100-llama-3.1-8b", "--time-scale", "0.5") as small,
          serving("--profile", "h100-llama-3.1-70b-tp4", "--time-scale", "0.5") as large):
        yield {"llama-3.1-8b": small.url, "llama-3.1-70b": large.url}


def _env(**kw):
    return MASLatencyCMDPEnv("mbpp", "test", estimator="none", warmup_s=0.0, load=QUIET, slo_factor=1.5, **kw)


def _episode(env, query, actions):
    obs, _ = env.reset(seed=2, options={"query": query})
    seen = [obs]
    for i in range(100):
        obs, r, term, _, info = env.step(actions[i % len(actions)])
        seen.append(obs)
        if term:
            return seen, r, info
    raise AssertionError("no end")


def test_gym_api_runs_unchanged_on_two_live_pools(servers):
    """reset/step over HTTP with a small and a large model pool: the same calls, tokens, quality and $ as in the
    simulator, latency within a few %, system observations from both pools' /metrics."""
    acts = [np.array([1, 2]), np.array([0, 0]), np.array([0, 1])]
    backend = LiveBackend(servers)
    live = _env(backend=backend)
    try:
        seen, r, info = _episode(live, 3, acts)
        assert live.world is None and all(live.observation_space.contains(o) for o in seen)
        stats = backend.stats()
        assert {p: s["failed"] for p, s in stats.items()} == {"llama-3.1-8b": 0, "llama-3.1-70b": 0}
        assert sum(s["calls"] for s in stats.values()) == info["num_calls"]
        assert all(s["calls"] > 0 for s in stats.values())              # both pools were used
        assert any(o["system"][3] > 0 for o in seen[1:])                 # the client's TTFT EMA
    finally:
        live.close()
    _, r_sim, ref = _episode(_env(models=None), 3, acts)
    for k in ("quality", "num_calls", "cost_usd", "topology", "rejected_calls"):
        assert info[k] == ref[k], k
    assert r == r_sim
    assert [c["model"] for c in info["calls"]] == [c["model"] for c in ref["calls"]]
    assert info["latency_s"] == pytest.approx(ref["latency_s"], rel=0.08)


def test_validate_policy_cmdp_baseline_passes_the_bar(servers):
    out = maslat("validate-policy", "always_large_deepthink", "--task", "mbpp", "--endpoints",
                 *(f"{k}={v}" for k, v in servers.items()), "--num-queries", "6", "--concurrency", "3", "--json")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert "MASLatency-CMDP-v0" in out.stdout and "predicted" in out.stdout
    assert res["env"] == "MASLatency-CMDP-v0" and res["queries"] == 6 and res["failed_live_calls"] == 0
    assert not any(res["mismatched_queries"].values())
    t = res["table"]
    for k in ("quality_pct", "calls_per_query", "prompt_tokens_per_query", "output_tokens_per_query",
              "cost_usd_per_query"):
        assert t[k]["live"] == t[k]["simulated"] and not t[k]["predicted"], k
    for k in ("latency_mean_s", "latency_p90_s"):
        assert abs(t[k]["error_pct"]) <= 5.0, (k, t[k])
    assert res["bar"]["passed"] and res["simulated"]["replicas"] == {"llama-3.1-8b": 1, "llama-3.1-70b": 1}


def test_a_second_validation_on_the_same_servers_starts_cold():
    """The simulated replay starts with an empty prefix cache; before each live run drew a fresh prompt salt, a
    second validation on the same servers found its prompts cached by the first and ran ~12 % faster than
    predicted at concurrency 10 (greedy_fastest, all calls on the small model). Servers in real time: this
    policy's calls are short, and a compressed clock would magnify the client's own per-call overhead."""
    with (serving("--profile", "h100-llama-3.1-8b") as small,
          serving("--profile", "h100-llama-3.1-70b-tp4") as large):
        servers = {"llama-3.1-8b": small.url, "llama-3.1-70b": large.url}
        runs = [_validate_greedy(servers) for _ in range(2)]
    assert runs[0]["live"]["prompt_salt"] != runs[1]["live"]["prompt_salt"]
    first, second = (r["table"]["latency_mean_s"] for r in runs)
    assert first["simulated"] == second["simulated"]  # the replay is deterministic
    # a warm prefix cache made the second live run ~12 % faster than the first; cold, they agree (the margin is
    # for a loaded machine's noise)
    assert second["live"] >= 0.95 * first["live"], (first, second)
    assert all(r["failed_live_calls"] == 0 for r in runs)


def _validate_greedy(servers: dict) -> dict:
    out = maslat("validate-policy", "greedy_fastest", "--task", "mbpp", "--endpoints",
                 *(f"{k}={v}" for k, v in servers.items()), "--num-queries", "10", "--concurrency", "10", "--json")
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_prompt_salt_renames_token_ids_but_keeps_sharing_within_a_run():
    from maslat.livebackend import _segment_tokens

    assert _segment_tokens(7, 32, 0) == _segment_tokens(7, 32)  # no salt: the ids of earlier versions
    assert _segment_tokens(7, 32, 5) == _segment_tokens(7, 32, 5)  # one run: shared content, shared ids
    assert _segment_tokens(7, 32, 5) != _segment_tokens(7, 32, 6)  # another run: nothing to hit in the cache
    assert _segment_tokens(7, 32, 5)[:16] != _segment_tokens(7, 32, 0)[:16]


def test_cmdp_policy_needs_one_named_endpoint_per_model(servers):
    from maslat.validation import validate_cmdp_policy

    pol = make_baseline("always_small_flash", _env())
    with pytest.raises(ValueError, match="one endpoint per model pool, named"):
        validate_cmdp_policy(pol, {"llm": servers["llama-3.1-8b"]}, task="mbpp", num_queries=1)
    p = maslat("validate-policy", "greedy_fastest", "--endpoints", servers["llama-3.1-8b"], "--num-queries", "1",
               check=False)
    assert p.returncode != 0 and "llama-3.1-70b=URL" in p.stderr
