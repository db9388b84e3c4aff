"""MASLatency-CMDP-v0: Gymnasium contract, determinism, costs, SLO, topologies, quality model, wrappers."""

import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import envs  # noqa: F401  (registers the ids)
from envs.cmdp import MASLatencyCMDPEnv
from envs.cmdp_catalog import STRATEGY_NAMES, attempt_theta, model_accuracy, target_accuracy
from envs.loads import REGIMES, LoadRegime, PhasedPoissonArrivals, PhaseSchedule
from envs.tasks import calibrate, make_queries, make_task, sigmoid
from envs.topologies import MODES, make_planner, make_topology
from envs.wrappers import SafetyGymnasiumWrapper


def _env(**kw):
    kw.setdefault("estimator", "none")
    kw.setdefault("warmup_s", 5.0)
    return MASLatencyCMDPEnv(kw.pop("task", "mbpp"), kw.pop("split", "train"), **kw)


def _run(env, seed, policy, options=None):
    obs, info0 = env.reset(seed=seed, options=options)
    steps = []
    while True:
        a = policy(obs)
        obs, r, term, trunc, info = env.step(a)
        steps.append((obs, r, info))
        if term:
            return info0, steps


@pytest.mark.parametrize("kw", [{}, {"flatten_obs": True, "action_type": "discrete", "load": "busy", "task": "gsm8k"},
                                {"execution": "sequential", "load": "shift"}])
def test_check_env_passes(kw):
    check_env(_env(**kw), skip_render_check=True)


def test_make_by_id_and_by_module_string():
    env = gym.make("MASLatency-CMDP-v0", task="gsm8k", estimator="none", warmup_s=0.0)
    obs, info = env.reset(seed=0)
    assert env.observation_space.contains(obs) and info["slo_s"] > 0
    code = ("import gymnasium as gym; e = gym.make('envs:MASLatency-CMDP-v0', estimator='none', warmup_s=0.0); "
            "o, _ = e.reset(seed=1); print(sorted(o))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "'estimates'" in out.stdout and "'system'" in out.stdout


def _same(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    return a == b or (a != a and b != b)


def test_same_seed_same_episode_bit_for_bit():
    pol = lambda obs: [int(obs["step"]) % 2, int(obs["role"]) % 3]  # noqa: E731
    e1, e2 = _env(load="bursty", estimator="default"), _env(load="bursty", estimator="default")
    r1, r2 = _run(e1, 7, pol), _run(e2, 7, pol)
    assert _same(r1, r2)
    r3 = _run(e1, 8, pol)
    assert not _same(r1[1][-1][2]["latency_s"], r3[1][-1][2]["latency_s"])


def test_costs_sum_to_the_overrun_and_rewards_are_quality():
    env = _env(load="busy", task="gsm8k", slo_factor=0.5, cost="overrun")
    for seed in range(4):
        _, steps = _run(env, seed, lambda obs: [1, 2])          # 70B DeepThink under load: overruns
        info = steps[-1][2]
        total = sum(s[2]["cost"] for s in steps)
        assert total == pytest.approx(max(0.0, info["latency_s"] - info["slo_s"]), abs=1e-9)
        assert all(s[2]["cost"] >= -1e-12 for s in steps)
        assert steps[-1][1] == info["quality"] and all(s[1] == 0.0 for s in steps[:-1])
        assert info["slo_violated"] == (info["latency_s"] > info["slo_s"])
        assert info["goodput"] == float(info["quality"] > 0 and not info["slo_violated"])


def test_slo_is_factor_times_reference_and_reference_is_the_idle_critical_path():
    env = _env(load="idle", task="gsm8k", planner="fixed:Chain", warmup_s=0.0, slo_factor=1.0)
    _, info = env.reset(seed=0, options={"query": 3, "slo_factor": 2.0})
    assert info["slo_s"] == pytest.approx(2.0 * info["reference_s"])
    # a chain's reference is the sum of its three calls alone on an idle 70B replica
    ep = env._ep
    deep = STRATEGY_NAMES.index("DeepThink")
    st = ep.state
    from envs.cmdp_catalog import role_lengths
    from envs.cmdp_world import unloaded_latency_s
    total, outs = 0.0, {}
    for node in ep.topology.nodes:
        outs[node.index] = max(1, int(round(st.mean_completion(node, deep))))
        prompt = (int(role_lengths(st.task, node.role)[1]) + st.query_tokens + sum(outs[d] + 12 for d in node.deps)
                  + 13)                                   # instructions + query + inputs + the DeepThink text
        total += unloaded_latency_s("h100-llama-3.1-70b-tp4", prompt, outs[node.index])
    assert info["reference_s"] == pytest.approx(total, rel=1e-12)
    _, info2 = env.reset(options={"query": 3, "slo_s": 4.5})
    assert info2["slo_s"] == 4.5


def test_parallel_branches_are_decided_at_one_instant_and_run_concurrently():
    env = _env(load="idle", task="gsm8k", planner="fixed:ParallelMap", warmup_s=0.0)
    obs, _ = env.reset(seed=0)
    times = []
    while True:
        times.append((int(obs["step"]), env.world.now))
        obs, _, term, _, info = env.step([0, 2])
        if term:
            break
    t = dict(times)
    assert t[1] == t[2] == t[3] == t[4] > t[0]        # the four branches start together after the planner
    calls = {c["node"]: c for c in info["calls"]}
    starts = {calls[i]["start_s"] for i in (1, 2, 3, 4)}
    assert len(starts) == 1
    # sequential execution runs them one after another
    seq = _env(load="idle", task="gsm8k", planner="fixed:ParallelMap", warmup_s=0.0, execution="sequential")
    _, steps = _run(seq, 0, lambda o: [0, 2])
    c2 = sorted(steps[-1][2]["calls"], key=lambda c: c["node"])
    assert all(c2[i + 1]["start_s"] >= c2[i]["start_s"] + c2[i]["latency_s"] - 1e-9 for i in range(len(c2) - 1))
    assert steps[-1][2]["latency_s"] > info["latency_s"]


def test_observation_reports_live_load_and_estimates():
    env = _env(load="busy", task="gsm8k", estimator="default", warmup_s=20.0)
    obs, _ = env.reset(seed=3)
    sysm = obs["system"].reshape(2, 4)
    assert sysm[0, 1] > 50 and sysm[1, 1] > 20            # running requests in both pools under busy load
    assert 0 < sysm[0, 2] < 1
    est = obs["estimates"].reshape(2, 3)
    assert np.all(est > 0) and np.all(est[:, 0] < est[:, 2])  # Flash is predicted faster than DeepThink
    assert obs["budget"][1] == pytest.approx(1.0, abs=1e-6)   # nothing spent at the first call
    idle = _env(load="idle", task="gsm8k", estimator="default", warmup_s=20.0)
    o2, _ = idle.reset(seed=3)
    assert o2["estimates"][2] < est[0, 2]                     # the same call is predicted faster on idle


def test_safety_gymnasium_wrapper_gives_the_six_tuple():
    env = SafetyGymnasiumWrapper(_env(load="busy", slo_factor=0.3, cost="overrun"))
    env.reset(seed=0)
    total = 0.0
    while True:
        obs, r, c, term, trunc, info = env.step([1, 2])
        assert c == info["cost"]
        total += c
        if term:
            break
    assert total == pytest.approx(info["overrun_s"])
    plain = SafetyGymnasiumWrapper(gym.make("CartPole-v1"))
    plain.reset(seed=0)
    with pytest.raises(KeyError, match="not a constrained env"):
        plain.step(0)


def test_stable_baselines3_ppo_runs_on_dict_and_multidiscrete():
    sb3 = pytest.importorskip("stable_baselines3", reason="the rl extra is installed by make test")
    env = _env(load="idle", task="gsm8k", estimator="default")
    model = sb3.PPO("MultiInputPolicy", env, n_steps=64, batch_size=32, n_epochs=1, seed=0, device="cpu")
    model.learn(total_timesteps=128)
    obs, _ = env.reset(seed=1)
    a, _ = model.predict(obs, deterministic=True)
    assert env.action_space.contains(a)
    flat = _env(load="idle", flatten_obs=True, action_type="discrete")
    sb3.PPO("MlpPolicy", flat, n_steps=32, batch_size=32, n_epochs=1, seed=0, device="cpu").learn(total_timesteps=32)


def test_bad_configuration_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown load regime"):
        _env(load="rush-hour")
    with pytest.raises(ValueError, match="slo_s must be > 0"):
        _env(slo_s=0.0)
    with pytest.raises(ValueError, match="slo_factor"):
        _env(slo_factor=(2.0, 1.0))
    with pytest.raises(ValueError, match="execution"):
        _env(execution="parallel")
    with pytest.raises(ValueError, match="planner"):
        _env(planner="random")
    with pytest.raises(ValueError, match="utilisations per phase"):
        _env(load=LoadRegime(name="x", phases=((0.1, 0.1, 0.1),)))
    with pytest.raises(ValueError, match="trained for models"):
        from envs.cmdp_catalog import ModelEntry
        _env(estimator="default", load=LoadRegime(name="one", phases=((0.1,),)),
             models=(ModelEntry(name="llama-3.1-8b", profile="h100-llama-3.1-8b", price_usd_per_token=1e-7),))
    env = _env()
    env.reset(seed=0)
    with pytest.raises(ValueError, match="action must be"):
        env.step([5, 0])


# ------------------------------------------------------------------------------------------ the world
def test_target_accuracies_are_reproduced_by_the_solved_offsets():
    for task in ("gsm8k", "math", "humaneval", "mbpp"):
        spec = make_task(task)
        cal = calibrate(spec)
        from envs.tasks import _GH_W, _GH_X
        for m in ("llama-3.1-8b", "llama-3.1-70b"):
            for s in STRATEGY_NAMES:
                th = attempt_theta(spec, m, s)
                acc = float(np.dot(_GH_W, sigmoid(th - cal.spread * _GH_X)))
                assert acc == pytest.approx(target_accuracy(spec, m, s), abs=1e-6)
    g = make_task("gsm8k")
    assert model_accuracy(g, "llama-3.1-70b") == 0.951
    assert target_accuracy(g, "llama-3.1-70b", "DeepThink") == pytest.approx(0.951, abs=1e-12)
    # Chain of Draft: Concise loses a few points, Flash (answer only) a lot, on math
    assert 0.85 < target_accuracy(g, "llama-3.1-70b", "Concise") < 0.93
    assert target_accuracy(g, "llama-3.1-70b", "Flash") < 0.65


def test_the_instance_quality_matches_the_target_for_a_single_call():
    env = _env(task="gsm8k", split="test", planner="fixed:IO", warmup_s=0.0, slo_factor=100.0)
    qs = make_queries(make_task("gsm8k"), "test")
    env.reset(seed=0)
    got = []
    for q in range(len(qs)):
        env.reset(options={"query": q})
        _, _, _, _, info = env.step([0, 2])
        got.append(info["quality"])
    assert np.mean(got) == pytest.approx(target_accuracy(make_task("gsm8k"), "llama-3.1-8b", "DeepThink"), abs=0.03)


def test_topologies_and_planner():
    for mode in MODES:
        for kind in ("math", "code"):
            t = make_topology(mode, kind)
            assert t.nodes[-1].function != "plan" and all(d < n.index for n in t.nodes for d in n.deps)
    assert make_topology("Debate", "math").path_lengths() == [3, 3, 3, 2, 2, 2, 1]
    p1, p2 = make_planner("mix", "math", 0), make_planner("mix", "math", 0)
    picks = [p1(q, 1).mode for q in range(400)]
    assert picks == [p2(q, 1).mode for q in range(400)] and set(picks) == set(MODES)
    assert {make_planner("fixed:Chain", "code")(q, 2).mode for q in range(20)} == {"Chain"}


def test_phase_schedule_and_phased_arrivals_are_exact():
    rng = np.random.Generator(np.random.PCG64(0))
    sch = PhaseSchedule(2, 10.0, rng)
    arr = PhasedPoissonArrivals(sch, (0.0, 50.0))       # arrivals only in phase 1
    g = arr.gaps(np.random.Generator(np.random.PCG64(1)))
    t, times = 0.0, []
    for _ in range(5000):
        t += next(g)
        times.append(t)
    assert all(sch.phase_at(x) == 1 for x in times)
    busy = sum(b - a for k in range(60) for a, b, p in [sch.segment(k)] if p == 1 and b <= times[-1])
    n = sum(1 for x in times if x <= sch.segment(59)[1])
    assert n / busy == pytest.approx(50.0, rel=0.05)
    assert set(REGIMES) == {"idle", "busy", "bursty", "shift"}


def test_shift_regime_changes_the_load_within_episodes():
    env = _env(load="shift", task="gsm8k", warmup_s=0.0)
    env.reset(seed=2)
    runs = []
    for _ in range(400):
        env.world.run(until=env.world.now + 1.0)
        runs.append(env.system_state()[0, 1])
    assert max(runs) > 4 * max(1.0, min(runs))


def test_expected_quality_is_the_sampled_answer_averaged_over_the_answer_draws():
    env = _env(task="humaneval", load="idle", slo_factor=3.0, counterfactual_quality=True)
    rng = np.random.default_rng(0)
    modes = set()
    for seed in range(40):
        env.reset(seed=seed)
        while True:
            st = env._ep.state
            _, r, term, _, info = env.step([int(rng.integers(2)), int(rng.integers(3))])
            if term:
                break
        modes.add(info["topology"])
        # the vectorised re-simulation with the episode's own draws is the environment's answer, exactly
        assert st.expected_score(u=st._u[None]) == info["quality"] == r
        assert 0.0 <= info["quality_expected"] <= 1.0
        assert st.expected_score() == info["quality_expected"]          # deterministic
        q = info["quality_by_action"]                                    # (nodes, 6) counterfactuals
        for c in info["calls"]:
            a = env.model_names.index(c["model"]) * 3 + STRATEGY_NAMES.index(c["strategy"])
            assert q[c["node"], a] == pytest.approx(info["quality_expected"], abs=1e-12)
    assert {"Debate", "ParallelMap"} <= modes                           # votes with ties were exercised
    # one call: the expectation is the attempt's probability of being right
    env = _env(task="gsm8k", load="idle", planner="fixed:IO")
    env.reset(seed=1)
    st = env._ep.state
    env.step([0, 0])
    assert st.expected_score(draws=8192) == pytest.approx(st.p_right(0, 0), abs=0.03)
    q = st.counterfactual_scores(draws=8192)[0]
    assert q == pytest.approx([st.p_right(*divmod(a, 3)) for a in range(6)], abs=0.03)
    assert q[5] == q.max()                                               # 70B DeepThink is the strongest


def test_vectorised_vote_is_the_plurality_with_ties_broken_in_ascending_label_order():
    from collections import Counter

    from envs.cmdp_query import _vote_many

    rng = np.random.default_rng(3)
    rows = rng.integers(0, 6, size=(4000, 4))
    rows[:1000, 2:] = rows[:1000, :2]                       # plenty of two-way ties
    u = rng.random(4000)
    got = _vote_many(rows, u)
    for r, ui, g in zip(rows, u, got, strict=True):
        counts = Counter(r.tolist())
        tied = sorted(lab for lab, c in counts.items() if c == max(counts.values()))
        assert g == tied[int(ui * len(tied))]


def _trajectory(env, seed, query, actions_seed):
    rng = np.random.default_rng(actions_seed)
    obs, info0 = env.reset(seed=seed, options={"query": query, "slo_factor": 1.5})
    out = [info0["start_s"], obs["system"].tolist(), obs["estimates"].tolist()]
    while True:
        obs, r, term, _, info = env.step(np.array([rng.integers(len(env.models)), rng.integers(len(STRATEGY_NAMES))]))
        out += [r, info["cost"], info["elapsed_s"], obs["system"].tolist()]
        if term:
            break
    w = env.world
    out += [info["latency_s"], info["quality"], w.now, w.num_submitted,
            [(c.core.num_steps, c.core.num_finished, c.core.prompt_tokens, c.core.generation_tokens,
              c.core.ttft.counts, c.core.itl.counts) for c in w.replicas]]
    return out


@pytest.mark.parametrize("load", sorted(REGIMES))
def test_warm_world_snapshot_is_exact(load):
    """An episode started from a copied warm-up snapshot is the episode started from a re-simulated warm-up,
    bit for bit: observations (queue lengths, KV usage, TTFT EMA), costs, latency, and every engine counter.
    Seeds repeat, so the second visit of a seed is served from the snapshot (a cache hit)."""
    from envs.background import WARM_WORLDS

    WARM_WORLDS.clear()
    h0 = WARM_WORLDS.hits
    fast = MASLatencyCMDPEnv("gsm8k", "test", load=load, estimator="none", warmup_s=15.0)
    slow = MASLatencyCMDPEnv("gsm8k", "test", load=load, estimator="none", warmup_s=15.0, reuse_warmup=False)
    for seed, q, a in ((3, 0, 0), (3, 1, 1), (4, 2, 2), (3, 0, 3), (4, 2, 2)):
        assert _trajectory(fast, seed, q, a) == _trajectory(slow, seed, q, a)
    assert WARM_WORLDS.hits - h0 == 3
