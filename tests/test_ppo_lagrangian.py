"""PPO-Lagrangian's CleanRL layout: the named rollout record, GAE and counterfactual credit by hand, the Args
(one documented, simply typed field per hyper-parameter), determinism, and the optional TensorBoard log."""

import ast
import inspect
import sys
import textwrap
import types
import typing
from dataclasses import fields

import numpy as np
import pytest
import torch

from agents.cmdp_policies import Featurizer, action_dim, state_dim
from agents.ppo_lagrangian import COSTS, PPOLagArgs, train_ppo_lagrangian
from agents.ppo_nets import ActorCritics, NumpyActorCritics, RunningNorm
from agents.ppo_rollout import EpisodeCursor, Rollout, collect_rollout, compute_advantages, gae
from envs.cmdp import MASLatencyCMDPEnv
from envs.cmdp_catalog import quality_table

SMALL = {"total_steps": 120, "steps_per_epoch": 60, "minibatch": 30, "update_iters": 2, "hidden": 16}


def _env():
    return MASLatencyCMDPEnv("gsm8k", "train", load="idle", planner="fixed:IO", slo_factor=0.5, warmup_s=5.0)


def _untimed(hist):
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in hist]


def test_same_seed_same_training_bit_for_bit_and_another_seed_differs():
    runs = [train_ppo_lagrangian(_env(), PPOLagArgs(**SMALL, seed=s)) for s in (4, 4, 5)]
    (p0, h0), (p1, h1), (p2, h2) = runs
    assert repr(_untimed(h0)) == repr(_untimed(h1))              # repr: NaN == NaN, floats to the last bit
    s0, s1, s2 = (p.actor.state_dict() for p in (p0, p1, p2))
    assert all(torch.equal(s0[k], s1[k]) for k in s0)
    assert not all(torch.equal(s0[k], s2[k]) for k in s0)
    assert [r["steps"] for r in h0] == [60, 120] and list(h0[0])[-2:] == ["time/simulate_s", "time/learn_s"]


def test_rollout_record_is_consistent_with_the_policy_that_sampled_it():
    env = _env()
    env.counterfactual_quality = True
    nm = len(env.models)
    fz = Featurizer(quality_table(env.task, env.models))
    nets = ActorCritics(state_dim(nm), action_dim(nm), 16, torch.Generator().manual_seed(0))
    cursor = EpisodeCursor(next_obs=env.reset(seed=0)[0])
    calls = []
    ro = collect_rollout(env, nets, fz, RunningNorm(state_dim(nm)), RunningNorm(action_dim(nm)),
                         np.random.default_rng(0), cursor, 25, cost_fn=COSTS["violation"], reward="counterfactual",
                         progress=calls.append)
    assert isinstance(ro, Rollout) and len(calls) == 25 and ro.obs.shape == (25, state_dim(nm))
    np.testing.assert_allclose(ro.probs.sum(1), 1.0)
    np.testing.assert_allclose(ro.logprobs, np.log(ro.probs[np.arange(25), ro.actions]), rtol=1e-6)  # float32 pi
    assert ro.dones.sum() == len(ro.episodes) > 0 and set(ro.costs) <= {0.0, 1.0}
    assert ro.costs.sum() == sum(e.slo_violated for e in ro.episodes)
    last_done = int(np.flatnonzero(ro.dones)[-1])                # rows up to the last episode end have credit
    assert not np.isnan(ro.quality_by_action[:last_done + 1]).any()
    assert np.isnan(ro.quality_by_action[last_done + 1:]).all()
    adv = compute_advantages(ro, 0.5, gamma=0.99, gae_lambda=0.95, reward="counterfactual", adv_norm="joint")
    assert adv.advantages.shape == (25,) and abs(adv.advantages.mean()) < 1e-9


def test_the_rollouts_numpy_forward_pass_is_the_torch_nets_to_float32_rounding():
    nm = 3
    gen = torch.Generator().manual_seed(1)
    nets = ActorCritics(state_dim(nm), action_dim(nm), 16, gen)
    with torch.no_grad():                                        # non-zero biases, a larger output layer
        for p in nets.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    fwd = NumpyActorCritics(nets)
    rng = np.random.default_rng(0)
    for _ in range(5):
        s = rng.normal(size=state_dim(nm)).astype(np.float32)
        a = rng.normal(size=(3 * nm, action_dim(nm))).astype(np.float32)
        logits, v, vc = fwd(s, a)
        with torch.no_grad():
            st = torch.as_tensor(s[None])
            want = nets.actor(st, torch.as_tensor(a[None]))[0].numpy()
            want_v, want_vc = float(nets.reward_critic(st)[0, 0]), float(nets.cost_critic(st)[0, 0])
        assert logits.dtype == np.float32 and logits.shape == (3 * nm,)
        np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose([v, vc], [want_v, want_vc], rtol=1e-5, atol=1e-5)
    with torch.no_grad():                                        # a copy: later updates do not leak into it
        nets.reward_critic[0].bias.add_(1.0)
    assert fwd(s, a)[1] == v


def test_gae_and_the_counterfactual_credit_by_hand():
    r, v, d = np.array([0.0, 1.0, 0.5]), np.array([0.2, 0.4, 0.1]), np.array([0.0, 1.0, 0.0])
    adv, ret = gae(r, v, d, next_value=0.3, gamma=0.9, gae_lambda=0.5)
    a2 = 0.5 + 0.9 * 0.3 - 0.1                                   # last row bootstraps next_value
    a1 = 1.0 - 0.4                                               # episode ends: no bootstrap, no carry
    a0 = (0.0 + 0.9 * 0.4 - 0.2) + 0.9 * 0.5 * a1
    np.testing.assert_allclose(adv, [a0, a1, a2])
    np.testing.assert_allclose(ret, adv + v)
    ro = Rollout.empty(3, 2, 2, 1)
    ro.actions[:] = [1, 0, 0]
    ro.probs[:] = [[0.25, 0.75], [0.5, 0.5], [0.5, 0.5]]
    ro.quality_by_action[:2] = [[0.2, 0.6], [0.9, 0.1]]          # the third row's episode is still running
    ro.rewards[:], ro.values[:], ro.dones[:], ro.next_value = r, v, d, 0.3
    out = compute_advantages(ro, 0.0, gamma=0.9, gae_lambda=0.5, reward="counterfactual", adv_norm="separate")
    raw = np.array([0.6 - (0.25 * 0.2 + 0.75 * 0.6), 0.9 - 0.5, 0.0])
    np.testing.assert_allclose(out.advantages, (raw - raw.mean()) / (raw.std() + 1e-8))
    np.testing.assert_allclose(out.reward_returns, ret)         # the reward critic still regresses on GAE


def test_every_hyper_parameter_is_a_documented_simply_typed_field():
    tree = ast.parse(textwrap.dedent(inspect.getsource(PPOLagArgs))).body[0].body
    docs = {a.target.id: b.value.value for a, b in zip(tree, tree[1:], strict=False)
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value.value, str)}
    hints = typing.get_type_hints(PPOLagArgs)
    for f in fields(PPOLagArgs):
        assert len(docs.get(f.name, "")) > 10, f"{f.name} has no docstring"
        tp = hints[f.name]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        simple = tp in (int, float, str, bool) or typing.get_origin(tp) is typing.Literal or (
            typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1 and args[0] in (int, float, str))
        assert simple, f"{f.name}: {tp}"
    assert typing.get_args(hints["cost"]) == tuple(COSTS) or set(typing.get_args(hints["cost"])) == set(COSTS)
    assert PPOLagArgs.__dataclass_params__.frozen and hasattr(PPOLagArgs, "__slots__")
    # no number left inside the loop: the update's constants are fields
    src = inspect.getsource(sys.modules["agents.ppo_lagrangian"].ppo_update)
    assert "40.0" not in src and "0.5" not in src and "1e-5" not in src
    with pytest.raises(ValueError, match="max_grad_norm"):
        PPOLagArgs(max_grad_norm=0.0)


def test_tensorboard_option_writes_the_csv_metrics_as_event_scalars(tmp_path):
    pytest.importorskip("tensorboard", reason="install the tensorboard extra: pip install 'maslatency[tensorboard]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = PPOLagArgs(**SMALL, seed=4, tensorboard_dir=str(tmp_path / "tb"))
    _, hist = train_ppo_lagrangian(_env(), args)
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    ea = EventAccumulator(str(tmp_path / "tb"))
    ea.Reload()
    assert set(ea.Tags()["scalars"]) == set(hist[0]) - {"epoch", "steps"}
    lam = ea.Scalars("constraint/lambda")
    assert [e.step for e in lam] == [60, 120]
    np.testing.assert_allclose([e.value for e in lam], [h["constraint/lambda"] for h in hist], rtol=1e-6)
    # logging changes nothing in the training itself
    _, plain = train_ppo_lagrangian(_env(), PPOLagArgs(**SMALL, seed=4))
    assert repr(_untimed(plain)) == repr(_untimed(hist))


def test_tensorboard_option_without_the_package_fails_first_and_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorboard", None)           # as if not installed
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'maslatency\[tensorboard\]'"):
        train_ppo_lagrangian(None, PPOLagArgs(**SMALL, tensorboard_dir=str(tmp_path)))  # before the env is used
