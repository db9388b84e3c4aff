"""CMDP agents: the Lagrangian updates, PPO-Lagrangian learning a known constrained optimum, the baselines."""

import numpy as np
import pytest

from agents.cmdp_experiment import evaluate
from agents.cmdp_oracle import LookaheadOracle
from agents.cmdp_policies import Featurizer, make_baseline
from agents.lagrange import GradientLagrange, PIDLagrange, make_lagrange
from agents.masrouter import MasRouterArgs, MasRouterPolicy, train_masrouter
from agents.ppo_lagrangian import PPOLagArgs, PPOLagPolicy, train_ppo_lagrangian
from envs.cmdp import MASLatencyCMDPEnv
from envs.cmdp_catalog import STRATEGY_NAMES, quality_table


# ------------------------------------------------------------------------------------------ multipliers
def test_gradient_lagrange_steps_by_lr_towards_the_violation_and_projects_at_zero():
    lag = GradientLagrange(0.02, init=0.001, lr=0.035)
    assert lag.update(0.5) == pytest.approx(0.036)          # Adam's first step is lr in the gradient's sign
    for _ in range(5):
        lag.update(0.5)
    up = lag.value
    assert up == pytest.approx(0.001 + 6 * 0.035, rel=1e-6)  # a constant sign keeps steps at lr
    seen = [lag.update(0.0) for _ in range(400)]            # satisfied: lambda falls (once Adam's momentum has
    assert seen[-1] == 0.0 and min(seen) == 0.0             # turned), projected at 0, never below
    assert all(b <= a for a, b in zip(seen[30:], seen[31:], strict=False))
    capped = GradientLagrange(0.0, init=0.0, lr=1.0, max_value=0.5)
    assert capped.update(3.0) == 0.5


def test_pid_lagrange_matches_a_hand_computation():
    lag = PIDLagrange(0.0, kp=0.1, ki=0.01, kd=0.01, delay=10, alpha_p=0.95, alpha_d=0.95)
    # e = 1: I = 0.01; EMA(e) = 0.05; EMA(J) = 0.05, rise over 10 epochs ago (0) = 0.05
    assert lag.update(1.0) == pytest.approx(0.1 * 0.05 + 0.01 + 0.01 * 0.05)
    # e = 1 again: I = 0.02; EMA(e) = 0.0975; EMA(J) = 0.0975, delayed value still 0
    assert lag.update(1.0) == pytest.approx(0.1 * 0.0975 + 0.02 + 0.01 * 0.0975)
    for _ in range(200):
        lag.update(0.0)                  # at the limit the P and D terms decay; the integral keeps its 0.02
    assert lag.value == pytest.approx(0.02, abs=1e-3)
    for _ in range(10):
        lag.update(-1.0)                 # below the limit the integral unwinds, projected at 0
    assert lag.value == 0.0
    with pytest.raises(ValueError, match="unknown Lagrangian"):
        make_lagrange("newton", 0.1)


# ------------------------------------------------------------------------------------------ learning
def _io_env(split="train"):
    # one call per query on idle replicas with an SLO of half the 70B-DeepThink idle latency: 70B DeepThink
    # (the best quality) misses it ~98 % of the time, 70B Concise meets it ~99 % with quality ~0.90, every
    # other action is worse: the constrained optimum is (70B, Concise), the unconstrained one (70B, DeepThink)
    return MASLatencyCMDPEnv("gsm8k", split, load="idle", planner="fixed:IO", slo_factor=0.5, warmup_s=10.0)


@pytest.mark.slow
def test_ppo_lagrangian_learns_the_known_constrained_optimum():
    env = _io_env()
    args = PPOLagArgs(total_steps=6000, steps_per_epoch=500, lr=1e-3, cost="violation", cost_limit=0.02,
                      lambda_lr=0.1, seed=0)
    pol, hist = train_ppo_lagrangian(env, args)
    assert hist[-1]["constraint/lambda"] > 0.1                 # the constraint was active during training
    test = _io_env("test")
    rows = evaluate(pol, test, range(60), [0.5], seed=0, regime="idle")
    picks = np.mean([r["large_share"] == 1.0 and r["deepthink_share"] == 0.0 for r in rows])
    ppo_good = np.mean([r["goodput"] for r in rows])
    assert np.mean([r["attained"] for r in rows]) >= 0.95
    concise = [r for r in evaluate(_Fixed(1, 1), test, range(60), [0.5], seed=0, regime="idle")]
    assert picks >= 0.9, f"chose (70B, Concise) on {picks:.0%} of queries"
    assert ppo_good >= np.mean([r["goodput"] for r in concise]) - 0.02
    for b in ("always_large_deepthink", "always_small_flash", "greedy_fastest"):
        base = evaluate(make_baseline(b, test), test, range(60), [0.5], seed=0, regime="idle")
        assert ppo_good > np.mean([r["goodput"] for r in base]), b
    # the checkpoint round trip gives the same greedy choices
    again = PPOLagPolicy.from_state(pol.state_dict())
    obs, _ = test.reset(seed=5)
    assert again.act(obs) == pol.act(obs)


def test_counterfactual_credit_finds_a_one_point_quality_gap_that_the_sampled_answer_hides():
    # HumanEval, one call, an SLO nothing misses: the optimum is the best-quality action (70B DeepThink),
    # 1.1 points above 70B Concise -- a gap a 0/1 answer per episode hardly shows in 3,000 episodes
    def env(split):
        return MASLatencyCMDPEnv("humaneval", split, load="idle", planner="fixed:IO", slo_factor=20.0,
                                 warmup_s=5.0)

    pol, hist = train_ppo_lagrangian(env("train"), PPOLagArgs(total_steps=3000, steps_per_epoch=500, seed=0))
    assert hist[-1]["constraint/lambda"] == 0.0
    test = env("test")
    rows = evaluate(pol, test, range(40), [20.0], seed=0, regime="idle")
    assert np.mean([r["large_share"] == 1.0 and r["deepthink_share"] == 1.0 for r in rows]) >= 0.95
    with pytest.raises(ValueError, match="reward must be one of"):
        PPOLagArgs(reward="dense")


class _Fixed:
    def __init__(self, m, s):
        self.a, self.name = (m, s), f"fixed{m}{s}"

    def act(self, obs):
        return self.a


# ------------------------------------------------------------------------------------------ baselines
def test_masrouter_is_load_blind_and_trained_on_quality_minus_price():
    env = MASLatencyCMDPEnv("humaneval", "train", load="idle", warmup_s=5.0)
    pol, hist = train_masrouter(env, MasRouterArgs(epochs=1, batch_size=8, seed=0))
    assert pol.args["cost_rate"] == 200.0 and len(hist) == int(np.ceil(len(env.queries) / 8))
    obs, _ = env.reset(seed=0)
    other = {**obs, "system": obs["system"] * 0 + 500.0, "budget": obs["budget"] * 0 - 3.0,
             "estimates": obs["estimates"] * 0 + 99.0}
    assert pol.act(obs) == pol.act(other)                    # no queue, KV, TTFT or budget input
    again = MasRouterPolicy.from_state(pol.state_dict())
    assert again.act(obs) == pol.act(obs)


def test_oracle_meets_the_slo_whenever_the_fastest_plan_does_and_beats_static_quality():
    env = MASLatencyCMDPEnv("gsm8k", "test", load="busy", warmup_s=10.0)
    oracle = LookaheadOracle(lambda: MASLatencyCMDPEnv("gsm8k", "test", load="busy", warmup_s=10.0))
    fast = make_baseline("greedy_fastest", env)
    qs, fs = range(6), [0.75, 1.5]
    o = evaluate(oracle, env, qs, fs, seed=1, regime="busy")
    g = evaluate(fast, env, qs, fs, seed=1, regime="busy")
    for a, b in zip(o, g, strict=True):
        assert a["query"] == b["query"] and a["slo_factor"] == b["slo_factor"]
        if b["attained"]:
            assert a["attained"]
    assert np.mean([r["large_share"] for r in o]) > np.mean([r["large_share"] for r in g])
    assert oracle.replays >= sum(r["calls"] for r in o)


def test_featurizer_ranks_actions_by_published_quality_and_slack():
    env = MASLatencyCMDPEnv("gsm8k", "train", load="idle", warmup_s=0.0)
    fz = Featurizer(quality_table(env.task, env.models))
    obs, _ = env.reset(seed=0)
    s, a = fz(obs)
    assert a.shape == (len(env.models) * len(STRATEGY_NAMES), a.shape[1]) and np.isfinite(s).all()
    assert a[5, 0] == pytest.approx(quality_table(env.task, env.models)[1, 2])   # 70B DeepThink's quality
    assert a[0, 2] > a[2, 2]                                                     # Flash has more slack than DeepThink


@pytest.mark.slow
def test_pid_lagrangian_variant_meets_the_constraint_on_the_known_case():
    args = PPOLagArgs(total_steps=6000, steps_per_epoch=500, lagrangian="pid", seed=0)
    pol, hist = train_ppo_lagrangian(_io_env(), args)
    lams = [h["constraint/lambda"] for h in hist]
    assert lams[-1] > 0.3 and all(b >= a - 1e-9 for a, b in zip(lams, lams[1:], strict=False))  # damped rise
    rows = evaluate(pol, _io_env("test"), range(60), [0.5], seed=0, regime="idle")
    assert np.mean([r["attained"] for r in rows]) >= 0.95 and np.mean([r["goodput"] for r in rows]) >= 0.85
