"""What RL users run into: every registered env under Gymnasium's RecordEpisodeStatistics (single and vector),
info keys as typed in ``envs.infos``, the CMDP cost kinds, MASLatency-v0's flat/discrete options."""

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from gymnasium.wrappers import RecordEpisodeStatistics

import envs  # noqa: F401  (registers the ids)
from envs import ClusterConfig, MASLatencyEnv
from envs.cmdp import MASLatencyCMDPEnv
from envs.infos import CMDPFinalInfo, CMDPResetInfo, CMDPStepInfo, MASFinalInfo, MASResetInfo

#: cheap arguments per id (a registered id not listed runs with its defaults)
FAST = {"MASLatency-v0": {"cluster": ClusterConfig(replicas=1, background_rate_per_s=0.5), "num_layers": 2},
        "MASLatency-CMDP-v0": {"estimator": "none", "warmup_s": 0.0}}
OURS = sorted(i for i, s in gym.registry.items() if str(s.entry_point).startswith("envs."))


def test_the_project_ids_are_registered():
    assert {"MASLatency-v0", "MASLatency-CMDP-v0"} <= set(OURS)


@pytest.mark.parametrize("env_id", OURS)
def test_record_episode_statistics_single(env_id):
    env = RecordEpisodeStatistics(gym.make(env_id, **FAST.get(env_id, {})))
    env.action_space.seed(0)
    env.reset(seed=0)
    episodes = 0
    for _ in range(400):
        _, _, term, trunc, info = env.step(env.action_space.sample())
        if term or trunc:
            assert set(info["episode"]) == {"r", "l", "t"} and info["episode"]["l"] >= 1
            assert isinstance(info["episode_key"], int)
            episodes += 1
            if episodes == 3:
                break
            env.reset()
    assert episodes == 3


@pytest.mark.parametrize("env_id", OURS)
def test_record_episode_statistics_vector(env_id):
    kw = FAST.get(env_id, {})
    vec = gym.vector.SyncVectorEnv([lambda: gym.make(env_id, **kw) for _ in range(2)])
    vec = gym.wrappers.vector.RecordEpisodeStatistics(vec)
    vec.action_space.seed(1)
    vec.reset(seed=1)
    ended = 0
    for _ in range(400):
        _, _, term, trunc, info = vec.step(vec.action_space.sample())
        if np.any(term | trunc):
            assert "episode" in info and np.all(info["episode"]["l"][info["_episode"]] >= 1)
            ended += int(np.sum(term | trunc))
            if ended >= 4:
                break
    assert ended >= 4
    vec.close()


def _keys(td) -> tuple[set, set]:
    return set(td.__required_keys__), set(td.__optional_keys__)


def _check_keys(info: dict, td) -> None:
    req, opt = _keys(td)
    assert req <= set(info) <= req | opt, (sorted(req - set(info)), sorted(set(info) - req - opt))


def test_infos_are_the_typed_dicts():
    env = MASLatencyEnv("gsm8k", "train", **FAST["MASLatency-v0"])
    _, info = env.reset(seed=0)
    _check_keys(info, MASResetInfo)
    while True:
        _, _, term, _, info = env.step(env.action_space.sample())
        if term:
            break
        assert info == {}
    _check_keys(info, MASFinalInfo)
    for cf in (False, True):
        env = MASLatencyCMDPEnv("mbpp", "train", counterfactual_quality=cf, **FAST["MASLatency-CMDP-v0"])
        _, info = env.reset(seed=0)
        _check_keys(info, CMDPResetInfo)
        while True:
            _, _, term, _, info = env.step(env.action_space.sample())
            if term:
                break
            _check_keys(info, CMDPStepInfo)
        _check_keys(info, CMDPFinalInfo)
        assert ("quality_by_action" in info) == cf


def _episode_costs(env, seed):
    env.reset(seed=seed)
    costs = []
    while True:
        _, _, term, _, info = env.step([1, 2])
        costs.append(info["cost"])
        if term:
            return costs, info


@pytest.mark.parametrize("seed", range(3))
def test_cmdp_cost_kinds(seed):
    kw = {"load": "busy", "task": "gsm8k", "slo_factor": (0.4, 1.6), "estimator": "none", "warmup_s": 5.0}
    viol, ov = (MASLatencyCMDPEnv(cost=c, **kw) for c in ("violation", "overrun"))
    assert viol.cost_kind == "violation" and ov.cost_kind == "overrun"
    assert MASLatencyCMDPEnv(**kw).cost_kind == "violation"    # the published constraint is the default
    cv, iv = _episode_costs(viol, seed)
    co, io = _episode_costs(ov, seed)
    assert iv["latency_s"] == io["latency_s"]                  # the cost kind changes no dynamics
    assert cv[:-1] == [0.0] * (len(cv) - 1) and cv[-1] == float(iv["slo_violated"])
    assert sum(co) == pytest.approx(max(0.0, io["latency_s"] - io["slo_s"]), abs=1e-9)
    with pytest.raises(ValueError, match="cost must be one of"):
        MASLatencyCMDPEnv(cost="seconds")


def test_cmdp_violation_cost_sees_both_outcomes():
    kw = {"load": "busy", "task": "gsm8k", "estimator": "none", "warmup_s": 5.0}
    tight = _episode_costs(MASLatencyCMDPEnv(slo_factor=0.3, **kw), 0)[0]
    loose = _episode_costs(MASLatencyCMDPEnv(slo_factor=50.0, **kw), 0)[0]
    assert tight[-1] == 1.0 and loose[-1] == 0.0


def test_unbounded_observations_use_inf():
    for space in (MASLatencyEnv().observation_space, MASLatencyCMDPEnv(estimator="none").observation_space):
        highs = [s.high for s in space.spaces.values() if isinstance(s, gym.spaces.Box)]
        assert any(np.isinf(h).any() for h in highs) and not any((h == 1e9).any() for h in highs)


@pytest.mark.filterwarnings("ignore:.*infinity")
@pytest.mark.parametrize("kw", [{"action_type": "discrete"}, {"flatten_obs": True},
                                {"action_type": "discrete", "flatten_obs": True, "execution": "sequential"}])
def test_mas_flat_and_discrete_options_pass_check_env(kw):
    check_env(MASLatencyEnv("gsm8k", "train", **FAST["MASLatency-v0"], **kw), skip_render_check=True)


def test_mas_discrete_and_flat_run_the_same_episode():
    plain = MASLatencyEnv("math", "train", **FAST["MASLatency-v0"])
    other = MASLatencyEnv("math", "train", action_type="discrete", flatten_obs=True, **FAST["MASLatency-v0"])
    assert isinstance(other.action_space, gym.spaces.Discrete) and other.action_space.n == 8 ** 7
    o1, _ = plain.reset(seed=4)
    o2, _ = other.reset(seed=4)
    rng = np.random.default_rng(0)
    while True:
        assert np.array_equal(gym.spaces.flatten(plain.observation_space, o1), o2)
        a = rng.integers(0, 8, 7)
        code = other.encode_action(a)
        assert np.array_equal(other.decode_action(code), a)
        o1, r1, t1, _, i1 = plain.step(a)
        o2, r2, t2, _, i2 = other.step(code)
        assert (r1, t1) == (r2, t2)
        if t1:
            break
    assert i1 == i2
    other.reset()
    with pytest.raises(ValueError, match="Discrete"):
        other.step(np.array([1, 2, 7, 7, 7, 7, 7]))


def test_mas_discrete_rollout_accepts_slot_policies():
    from agents.policies import StaticPolicy

    pol = StaticPolicy("math", [["GenerateCoT"], ["SelfRefine"]])
    infos = [MASLatencyEnv("gsm8k", "test", action_type=t, **FAST["MASLatency-v0"]).rollout(pol, [0, 1, 2], concurrency=2)
             for t in ("multidiscrete", "discrete")]
    assert infos[0] == infos[1]
