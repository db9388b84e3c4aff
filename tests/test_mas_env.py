"""MASLatency-v0: Gymnasium contract, registration, determinism, episode bookkeeping."""

import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import envs
from envs import ClusterConfig, MASLatencyEnv


def _small(**kw):
    return MASLatencyEnv("humaneval", "train", cluster=ClusterConfig(background_rate_per_s=2.0), **kw)


def test_check_env_passes():
    check_env(_small(), skip_render_check=True)
    check_env(MASLatencyEnv("gsm8k", "train", execution="sequential"), skip_render_check=True)


def test_make_by_id_and_by_module_string():
    env = gym.make("MASLatency-v0", task="math", split="test")
    obs, info = env.reset(seed=0)
    assert env.observation_space.contains(obs) and info["query"] == 0
    code = ("import gymnasium as gym; e = gym.make('envs:MASLatency-v0', task='mbpp'); o, _ = e.reset(seed=1); "
            "print(o['query'].shape)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "(384,)"


def _episode(env, seed, actions, query=None):
    obs, _ = env.reset(seed=seed, options=None if query is None else {"query": query})
    trace = [obs]
    for a in actions:
        obs, r, term, trunc, info = env.step(a)
        trace.append((obs, r, term, info))
        if term:
            return trace, info
    raise AssertionError("episode did not end")


def _same(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _same(x, y)
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b)
    else:
        assert a == b


def test_same_seed_same_episode_bit_for_bit():
    acts = [np.array([2, 1, 7, 7, 7, 7, 7]), np.array([3, 5, 7, 7, 7, 7, 7]), np.array([0, 6, 7, 7, 7, 7, 7])]
    t1, i1 = _episode(_small(), 5, acts)
    t2, i2 = _episode(_small(), 5, acts)
    _same(t1, t2)
    _same(i1, i2)
    _, i3 = _episode(_small(), 6, acts)
    assert i3["cp_seconds"] != i1["cp_seconds"]


def test_world_persists_across_episodes_and_rollout_is_deterministic():
    env = _small()
    env.reset(seed=0)
    t_before = env.world.now
    env.step(np.array([0, 6, 7, 7, 7, 7, 7]))
    env.reset()
    assert env.world.now > t_before          # same world, the clock kept running
    pol = envs_policy = _Fixed([[1], [5, 6]])
    a = _small()
    a.reset(seed=3)
    b = _small()
    b.reset(seed=3)
    ia = a.rollout(pol, list(range(10)), concurrency=4)
    ib = b.rollout(envs_policy, list(range(10)), concurrency=4)
    _same(ia, ib)
    assert [i["query"] for i in ia] == list(range(10))


class _Fixed:
    def __init__(self, layers):
        self.layers = layers

    def act(self, obs, episode=0):
        ops = self.layers[min(int(obs["layer"]), len(self.layers) - 1)]
        a = np.full(7, 7)
        a[: len(ops)] = ops
        return a


def test_final_info_bookkeeping():
    env = MASLatencyEnv("gsm8k", "test")
    _, info = _episode(env, 0, [np.array([1, 2, 5, 7, 7, 7, 7]), np.array([3, 4, 6, 7, 7, 7, 7])], query=3)
    assert info["num_layers"] == 2
    lay = info["layers"]
    assert lay[0]["ops"] == ["GenerateCoT", "MultiGenerateCoT", "SelfRefine"]
    # parallel: a layer's CP is its largest c(op), the bottleneck is that op (ties to the first)
    for L in lay:
        assert L["cp_tokens_layer"] == max(L["cp_tokens"])
        assert L["bottleneck"] == L["ops"][int(np.argmax(L["cp_tokens"]))]
    assert info["cp_tokens"] == pytest.approx(sum(L["cp_tokens_layer"] for L in lay) + info["cp_tokens_post"])
    assert info["cp_tokens_layers"] == pytest.approx(sum(L["cp_tokens_layer"] for L in lay))
    # the layer takes as long as its slowest operator; the query at least as long as its layers
    assert lay[0]["seconds"] == pytest.approx(max(lay[0]["op_seconds"]))
    assert info["cp_seconds"] >= sum(L["seconds"] for L in lay)
    assert info["score"] in (0.0, 1.0)
    assert info["cost_usd"] == pytest.approx((0.15 * info["prompt_tokens"] + 0.6 * info["completion_tokens"]) / 1e6)


def test_sequential_layer_sums_and_takes_longer():
    acts = [np.array([1, 5, 7, 7, 7, 7, 7]), np.array([6, 7, 7, 7, 7, 7, 7])]
    _, par = _episode(MASLatencyEnv("gsm8k", "train"), 1, acts, query=0)
    _, seq = _episode(MASLatencyEnv("gsm8k", "train", execution="sequential"), 1, acts, query=0)
    assert seq["layers"][0]["cp_tokens_layer"] == pytest.approx(sum(seq["layers"][0]["cp_tokens"]))
    assert seq["layers"][0]["seconds"] > par["layers"][0]["seconds"]


def test_layer0_ensemble_raises_and_the_query_retries():
    env = MASLatencyEnv("gsm8k", "train")
    obs, _ = env.reset(seed=0, options={"query": 1})
    obs, r, term, trunc, info = env.step(np.array([3, 0, 7, 7, 7, 7, 7]))  # ScEnsemble over no solutions
    assert not term and obs["layer"] == 0 and obs["attempt"] == 1
    obs, r, term, trunc, info = env.step(np.array([0, 6, 7, 7, 7, 7, 7]))
    assert term and info["retries"] == 1 and not info["failed"]
    assert info["cp_seconds"] > info["layers"][0]["seconds"] + 1.0   # the failed attempt and the 1 s wait


def test_bad_arguments_say_what_to_change():
    with pytest.raises(ValueError, match="task"):
        MASLatencyEnv("gsm9k")
    with pytest.raises(ValueError, match="execution"):
        MASLatencyEnv("gsm8k", execution="async")
    with pytest.raises(ValueError, match="replicas"):
        ClusterConfig(replicas=0)
    env = _small()
    env.reset(seed=0)
    with pytest.raises(ValueError, match="action entries"):
        env.step(np.array([9, 7, 7, 7, 7, 7, 7]))
    assert "MASLatency-v0" in gym.registry and envs.MASLatencyEnv is MASLatencyEnv
