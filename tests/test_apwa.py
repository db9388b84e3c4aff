"""APWA on the simulated cluster: contracts, registry, executor, baselines, the env and the experiment."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import envs  # noqa: F401  (registers the ids)
from envs.apwa import (
    WORKLOADS,
    APWAConfig,
    APWARun,
    Capability,
    CapabilityRegistry,
    Decomposition,
    auto_decomposition,
    default_registry,
    make_plan,
    make_table,
    run_method,
)
from envs.apwa.workloads import context_quality, manager_prompt_tokens


def test_manager_prompt_follows_metadata_not_n():
    w = WORKLOADS["summarise"]
    sizes = {manager_prompt_tokens(make_table(w, n, np.random.default_rng(0)).meta(), 6) for n in (3, 30, 3000)}
    assert len(sizes) == 1


def test_plan_expands_contract_over_every_row_once():
    w = WORKLOADS["extract"]
    meta = make_table(w, 137, np.random.default_rng(1)).meta()
    plan = make_plan(w, meta, Decomposition(group_size=5, fan_in=4), 6)
    rows = np.concatenate([np.arange(lo, hi) for lo, hi in plan.groups])
    assert np.array_equal(rows, np.arange(137)) and plan.width == 28
    assert [len(level) for level in plan.tree] == [7, 2, 1] and plan.depth == 3
    assert make_plan(w, meta, Decomposition(group_size=5, fan_in=None), 6).depth == 1
    assert auto_decomposition(w, meta).group_size == int((4096 - 200) // (meta.mean_row_tokens + w.output_tokens))


def test_registry_binds_at_run_time_and_spreads():
    reg = CapabilityRegistry([Capability(name="summarise", pools=("a", "b"))])
    assert [reg.bind("summarise") for _ in range(3)] == ["a", "b", "a"]
    with pytest.raises(ValueError, match="no worker registered for capability 'code'"):
        reg.bind("code")
    reg.register(Capability(name="code", pools=("b",)))
    assert reg.bind("code") == "b"


def test_context_quality_from_ruler():
    assert context_quality("llama-3.1-8b", 1000) == 1.0
    assert context_quality("llama-3.1-8b", 131072) == pytest.approx(77.0 / 95.5)
    with pytest.raises(ValueError, match="no long-context scores"):
        context_quality("gpt-x", 10)


@pytest.mark.parametrize("workload", sorted(WORKLOADS))
def test_apwa_completes_every_row(workload):
    r = run_method("apwa", workload, 60, seed=2)
    assert r.complete and r.structural_completeness == 1.0 and r.lost_items == 0
    assert 0.95 < r.semantic_utility <= 1.0
    assert r.peak_context_tokens < 8192   # prompt sizes follow the contract's groups, not N


def test_split_on_refusal_recovers_a_group_too_long_for_the_server():
    run = APWARun(APWAConfig(fail_prob=0.0), "summarise", 200, seed=0)
    r = run.run("apwa", Decomposition(group_size=200, fan_in=8))   # 200 x 781 tokens > max_model_len
    assert r.rejected_calls >= 1 and r.complete
    assert r.failure_reason is None and r.width == 1


def test_centralised_breaks_at_large_n_on_max_model_len():
    small = run_method("centralised", "summarise", 30, seed=0)
    big = run_method("centralised", "summarise", 300, seed=0)
    assert small.complete
    assert not big.complete and big.lost_items > 100
    assert big.failure_reason == "prompt_plus_max_tokens_exceeds_max_model_len"
    assert big.peak_context_tokens > 120_000          # the conversation reached the context limit
    assert big.semantic_utility < 0.5 < small.semantic_utility


def test_apwa_makespan_sublinear_and_beats_baselines_at_scale():
    ns = (10, 30, 100, 300)
    ys = [run_method("apwa", "summarise", n, seed=1).makespan_s for n in ns]
    slope = np.polyfit(np.log(ns), np.log(ys), 1)[0]
    assert slope < 0.7, ys
    for m in ("chain", "fixed_map", "centralised"):
        assert run_method(m, "summarise", 300, seed=1).makespan_s > 2 * ys[-1]


def test_runs_are_deterministic():
    a = run_method("apwa", "redact", 50, seed=7).summary()
    b = run_method("apwa", "redact", 50, seed=7).summary()
    assert a == b
    assert run_method("apwa", "redact", 50, seed=8).summary() != a


@pytest.mark.filterwarnings("ignore:.*infinity")
def test_env_check_env_and_flat():
    env = gym.make("MASLatency-APWA-v0", items=(10, 20))
    check_env(env.unwrapped, skip_render_check=True)
    flat = gym.make("MASLatency-APWA-v0", items=(10,), flatten_obs=True)
    check_env(flat.unwrapped, skip_render_check=True)
    obs, _ = flat.reset(seed=0)
    assert flat.observation_space.contains(obs)


def test_env_seeds_deterministic_and_info_keys():
    outs = []
    for _ in range(2):
        env = gym.make("MASLatency-APWA-v0", items=(40,), workload="summarise")
        env = gym.wrappers.RecordEpisodeStatistics(env)
        obs, _ = env.reset(seed=5)
        _, rew, term, trunc, info = env.step(np.array([2, 2, 1, 0, 0]))
        outs.append((obs["system"].tolist(), rew, info["apwa"]))
        assert term and not trunc and "episode" in info and info["structural_completeness"] == 1.0
        assert info["width"] == 10 and info["depth"] == 2
    assert outs[0] == outs[1]
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.array([0, 0, 0, 0, 0]))


def _check_keys(info: dict, td) -> None:
    req, opt = set(td.__required_keys__), set(td.__optional_keys__)
    assert req <= set(info) <= req | opt, (sorted(req - set(info)), sorted(set(info) - req - opt))


def test_env_on_the_skeleton_infos_world_and_rollout():
    from agents.apwa_policies import ManagerRulePolicy
    from envs.apwa_env import MASLatencyAPWAEnv
    from envs.infos import APWAFinalInfo, APWAResetInfo

    env = MASLatencyAPWAEnv(workload="mix", items=(10, 30))
    assert env.cases[3] == ("extract", 30) and env.action_space.nvec.tolist()[3:] == [3, 3]
    _, info = env.reset(seed=3, options={"query": 3})
    _check_keys(info, APWAResetInfo)
    assert (info["workload"], info["items"], info["seed"], info["start_s"]) == ("extract", 30, 3, 30.0)
    with pytest.raises(ValueError, match="action must be 5 integers"):
        env.step([9, 0, 0, 0, 0])                                   # refused before the world moves
    _, rew, term, _, first = env.step([1, 1, 1, 0, 0])
    _check_keys(first, APWAFinalInfo)
    assert term and first["episode_key"] == 1 and first["end_s"] == pytest.approx(30.0 + first["makespan_s"])
    assert first["preemptions"] == 0 and 0 < first["kv_peak"] < 1
    # the first query of a world meets run_method's table and failures for the seed
    same = run_method("apwa", "extract", 30, seed=3, decomposition=env.decode_action([1, 1, 1, 0, 0]))
    assert first["apwa"] == same.summary()
    _, info = env.reset(options={"query": 3})                    # the world goes on, a new table
    _, _, _, _, second = env.step([1, 1, 1, 0, 0])
    assert second["start_s"] == first["end_s"] and second["episode_key"] == 2 and second["visit"] == 1
    assert second["apwa"] != first["apwa"]
    env.start_world(0)
    infos = env.rollout(ManagerRulePolicy(), range(len(env.cases)), concurrency=len(env.cases))
    assert sorted((i["workload"], i["items"]) for i in infos) == sorted(env.cases)
    assert all(i["structural_completeness"] == 1.0 for i in infos) and len({i["episode_key"] for i in infos}) == 6
    with pytest.raises(ValueError, match="options\\['workload'\\]"):
        env.reset(options={"workload": "translate"})


def test_env_pool_choice_rebinds_workers():
    env = gym.make("MASLatency-APWA-v0", items=(20,), workload="extract")
    env.reset(seed=0)
    m = len(env.unwrapped.pools)
    _, _, _, _, info = env.step(np.array([1, 4, 3, m, 1]))
    assert info["structural_completeness"] == 1.0


def test_experiment_summary():
    from agents.apwa_experiment import run_apwa_experiment

    s = run_apwa_experiment([10, 30], [0], methods=["apwa", "chain"], workload="extract")
    assert set(s["methods"]) == {"apwa", "chain"}
    row = s["methods"]["apwa"]["by_items"]["30"]
    assert row["structural_completeness"] == 1.0 and row["tokens"] > 0
    assert s["methods"]["apwa"]["scaling_exponent"] is not None
    with pytest.raises(ValueError, match="unknown methods"):
        run_apwa_experiment([10], [0], methods=["nope"])


def test_cli_experiment_apwa_json_and_plots(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-m", "maslat", "experiment", "apwa", "--items", "10,40", "--seeds", "1",
                          "--workload", "redact", "--plots", str(tmp_path), "--json"],
                         capture_output=True, text=True, cwd=root)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["experiment"] == "apwa" and res["items"] == [10, 40]
    assert set(res["methods"]) == {"apwa", "centralised", "chain", "fixed_map"}
    assert (tmp_path / "makespan_vs_items.png").stat().st_size > 1000
    bad = subprocess.run([sys.executable, "-m", "maslat", "experiment", "apwa", "--items", "ten"],
                         capture_output=True, text=True, cwd=root)
    assert bad.returncode == 2 and "--items must be comma-separated integers" in bad.stderr


@pytest.mark.slow
def test_centralised_saturates_kv_under_load_where_apwa_does_not():
    cfg = APWAConfig(load="busy")
    central, apwa = APWARun(cfg, "summarise", 100, seed=0), APWARun(cfg, "summarise", 100, seed=0)
    rc, ra = central.run("centralised"), apwa.run("apwa")
    assert central.kv_peak > 0.95 and central.preemptions > 50       # its growing context crowds the pool
    assert apwa.kv_peak < 0.9 and apwa.preemptions == 0
    assert rc.makespan_s > 5 * ra.makespan_s


def test_apwa_plan_runs_unchanged_on_a_live_server():
    """The executor only uses the Backend seam: the same plan on the stand-in server over HTTP gives the same
    calls, tokens, completeness and utility as in the simulator (seconds: same order, HTTP overheads differ)."""
    from envs.cmdp_catalog import default_models
    from envs.loads import LoadRegime
    from maslat.livebackend import LiveBackend

    from .standin import serving

    m8 = default_models()[0]
    cfg = APWAConfig(models=(m8,), warmup_s=0.0, fail_prob=0.0, load=LoadRegime(name="none", phases=((0.0,),)))
    d = Decomposition(group_size=4, fan_in=2, max_in_flight=4)
    with serving("--profile", m8.profile, "--replicas", "2", "--time-scale", "0.2") as srv:
        be = LiveBackend({m8.name: srv.url})
        try:
            live = APWARun(cfg, "extract", 24, seed=0, registry=default_registry((m8.name,)), backend=be).run("apwa", d)
        finally:
            be.close()
    sim = APWARun(cfg, "extract", 24, seed=0, registry=default_registry((m8.name,))).run("apwa", d)
    a, b = live.summary(), sim.summary()
    for k in ("num_calls", "prompt_tokens", "completion_tokens", "structural_completeness", "semantic_utility",
              "width", "depth"):
        assert a[k] == b[k], k
    assert live.complete and 0.3 < live.makespan_s / sim.makespan_s < 3.0


def test_apwa_env_runs_on_a_live_server():
    """MASLatency-APWA-v0 with a LiveBackend on the stand-in server: the same decision seam, ``system`` from
    ``/metrics``, the same calls and tokens as the simulated episode, and ``rollout`` of concurrent queries."""
    from agents.apwa_policies import ManagerRulePolicy
    from envs.apwa_env import MASLatencyAPWAEnv
    from envs.cmdp_catalog import default_models
    from envs.infos import APWAFinalInfo
    from envs.loads import LoadRegime
    from maslat.livebackend import LiveBackend

    from .standin import serving

    m8 = default_models()[0]
    kw = {"models": (m8,), "warmup_s": 0.0, "fail_prob": 0.0, "load": LoadRegime(name="none", phases=((0.0,),)),
          "workload": "extract", "items": (12, 24)}
    action = [2, 1, 0, 1, 0]     # 4 rows per worker, fan-in 4, at most 4 calls in flight, spread over pools
    with serving("--profile", m8.profile, "--replicas", "2", "--time-scale", "0.2") as srv:
        env = MASLatencyAPWAEnv(backend=LiveBackend({m8.name: srv.url}), **kw)
        try:
            obs, _ = env.reset(seed=0, options={"query": 1})
            assert env.world is None and obs["system"].shape == (4,) and np.isfinite(obs["system"]).all()
            _, rew, term, _, live = env.step(action)
            infos = env.rollout(ManagerRulePolicy(), [0, 1, 0], concurrency=3)
        finally:
            env.close()
    _check_keys(live, APWAFinalInfo)
    assert term and live["preemptions"] is None and live["kv_peak"] is None and isinstance(live["episode_key"], int)
    sim_env = MASLatencyAPWAEnv(**kw)
    sim_env.reset(seed=0, options={"query": 1})
    sim = sim_env.step(action)[4]
    for k in ("num_calls", "prompt_tokens", "completion_tokens", "structural_completeness", "semantic_utility",
              "width", "depth"):
        assert live["apwa"][k] == sim["apwa"][k], k
    assert 0.3 < live["makespan_s"] / sim["makespan_s"] < 3.0 and live["end_s"] > live["start_s"]
    assert [i["items"] for i in infos] == [12, 24, 12] and all(i["structural_completeness"] == 1.0 for i in infos)
    assert len({i["episode_key"] for i in infos}) == 3


def test_manager_rule_policy_beats_one_row_per_call_and_a_single_call():
    from agents.apwa_policies import FixedActionPolicy, ManagerRulePolicy

    env = gym.make("MASLatency-APWA-v0", workload="summarise", items=(120,))
    scores = {}
    for name, pol in (("rule", ManagerRulePolicy()), ("one_row", FixedActionPolicy([0, 0, 0, 0, 0])),
                      ("one_call", FixedActionPolicy([6, 4, 3, 0, 0]))):
        rew = []
        for seed in (0, 1):
            obs, _ = env.reset(seed=seed)
            rew.append(env.step(pol.act(obs))[1])
        scores[name] = float(np.mean(rew))
    assert scores["rule"] > scores["one_row"] and scores["rule"] > scores["one_call"], scores


@pytest.mark.parametrize("group_size,fan_in,bound", [(1, 2, 1), (3, 3, 2), (7, None, None), (50, 16, 4)])
def test_any_decomposition_answers_and_merges_every_row_once(group_size, fan_in, bound):
    run = APWARun(APWAConfig(fail_prob=0.3, max_retries=20), "summarise", 41, seed=group_size)
    r = run.run("apwa", Decomposition(group_size=group_size, fan_in=fan_in, max_in_flight=bound))
    assert r.complete and r.lost_items == 0 and r.malformed_calls == r.retries > 0
    assert r.width == -(-41 // group_size)
    assert max(c.prompt_tokens for c in r.calls if c.capability == "summarise") < 200 + group_size * 4000
    if bound is not None:   # never more than `bound` worker and merge calls in flight
        ev = sorted([(c.start_s, 1) for c in r.calls if c.capability != "plan"]
                    + [(c.start_s + c.latency_s, -1) for c in r.calls if c.capability != "plan"])
        assert max(np.cumsum([d for _, d in ev])) <= bound


def test_registry_rejects_unknown_pools_and_unknown_methods():
    with pytest.raises(ValueError, match="not in the world's pools"):
        default_registry(("a", "b"), workers=("c",))
    with pytest.raises(ValueError, match="unknown method"):
        APWARun(APWAConfig(), "summarise", 5, seed=0).run("mapreduce")
    with pytest.raises(ValueError, match="unknown workload"):
        run_method("apwa", "translate", 5, seed=0)
