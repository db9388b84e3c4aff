"""avg@K test runs (``agents.lamas.Args.test_repeats``): one run is the old single test run bit for bit, K runs
differ from each other, share their worlds and LLM outcomes between methods, and are averaged; same seed, same
bits."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from agents import lamas
from agents.experiment import ExperimentResult, run_experiment
from agents.lamas import (
    Args,
    evaluate,
    evaluate_repeats,
    make_policy,
    new_controller,
    repeat_seed,
    summarize,
    summarize_repeats,
)


@pytest.fixture(scope="module")
def trained():
    torch.set_num_threads(1)
    args = Args(method="lamas", task="humaneval", seed=3, epochs=1, max_train_queries=8, test_repeats=1)
    return args, lamas.train(args).controller


def _old_evaluate(args, controller):
    """``evaluate`` as it was before avg@K (commit 6fc2587): the run's seed, policy stream 2."""
    env = lamas._make_env(args, lamas.METHODS[args.method], "test")
    policy = make_policy(args, controller, record=False, stream=2)
    return env.rollout(policy, list(range(len(env.queries))), concurrency=args.test_concurrency)


def test_one_repeat_is_the_old_single_test_run_bit_for_bit(trained):
    args, ctrl = trained
    old = _old_evaluate(args, ctrl)
    (new,) = evaluate_repeats(args, ctrl)
    assert new == old
    mean, rows = summarize_repeats([new])
    assert rows == [summarize(old)]
    assert {k: v for k, v in mean.items() if k != "score_pct_repeat_std"} == summarize(old)
    assert mean["score_pct_repeat_std"] == 0.0


def test_repeats_differ_from_each_other_and_are_averaged(trained):
    args, ctrl = trained
    runs = evaluate_repeats(replace(args, test_repeats=3), ctrl)
    assert runs[0] == evaluate(args, ctrl)   # repeat 0 is the single run
    rows = [summarize(r) for r in runs]
    assert len({r["cp_tokens_mean"] for r in rows}) == 3   # fresh outcomes and samples every run
    mean, got = summarize_repeats(runs)
    assert got == rows
    for k in rows[0]:
        assert mean[k] == pytest.approx(np.mean([r[k] for r in rows]), rel=1e-12)
    assert mean["score_pct_repeat_std"] == pytest.approx(np.std([r["score_pct"] for r in rows]))


def test_repeat_streams_are_shared_between_methods(trained, monkeypatch):
    """Repeat r's world and LLM-outcome seed depends on (seed, r) alone; a second method with the same
    execution and the same controller (the lambda_t = 0 ablation) therefore runs exactly the same episodes."""
    args, ctrl = trained
    other = replace(args, method="lamas_lambda0")
    assert evaluate(other, ctrl, repeat=2) == evaluate(args, ctrl, repeat=2)
    seen = []
    make_env = lamas._make_env
    monkeypatch.setattr(lamas, "_make_env", lambda a, m, split: seen.append((a.method, a.seed)) or make_env(a, m, split))
    for m in ("lamas", "maas"):
        evaluate_repeats(replace(args, method=m, test_repeats=3), new_controller(args))
    worlds = [s for _, s in seen]
    assert worlds[:3] == worlds[3:] == [repeat_seed(3, r) for r in range(3)] and worlds[0] == 3
    assert len(set(worlds[:3])) == 3


def test_same_seed_same_bits(trained):
    args, ctrl = trained
    k3 = replace(args, test_repeats=3)
    assert evaluate_repeats(k3, ctrl) == evaluate_repeats(k3, ctrl)
    assert repeat_seed(5, 4) == repeat_seed(5, 4) != repeat_seed(6, 4)
    with pytest.raises(ValueError, match="test_repeats"):
        Args(test_repeats=0)


def test_experiment_reports_the_repeat_spread_per_seed():
    torch.set_num_threads(1)
    kw = {"epochs": 1, "test_repeats": 2}
    a = run_experiment("humaneval", [0], ["lamas", "maas"], **kw)
    out = a.to_json()
    assert out == run_experiment("humaneval", [0], ["lamas", "maas"], **kw).to_json()
    assert out["test_repeats"] == 2 and a.cpu_s["test"] > 0 and a.cpu_s["train"] > 0
    (one,) = out["per_seed"]
    gaps = [x["score_pct"] - y["score_pct"] for x, y in zip(a.repeats["lamas"][0], a.repeats["maas"][0], strict=True)]
    assert one["repeats"]["score_gap_points"] == gaps and len(one["repeats"]["cp_tokens_reduction_pct"]) == 2
    assert one["savings"]["score_gap_points_repeat_std"] == pytest.approx(np.std(gaps))
    assert one["savings"]["score_gap_points"] == pytest.approx(np.mean(gaps))
    assert one["methods"]["lamas"]["score_pct_repeat_std"] == pytest.approx(
        np.std([x["score_pct"] for x in a.repeats["lamas"][0]]))
    assert "score_pct_repeat_std_std" not in out["methods"]["lamas"]


def test_gap_repeat_spread_is_averaged_over_seeds():
    res = ExperimentResult("humaneval", [0, 1], ["lamas", "maas"])
    row = {"score_pct": 90.0, "cp_tokens_mean": 500.0, "cp_seconds_mean": 5.0, "score_pct_repeat_std": 1.0}
    res.runs = {"lamas": [row, row], "maas": [{**row, "cp_tokens_mean": 1000.0, "cp_seconds_mean": 10.0}] * 2}
    def rep(*scores):
        return [{"score_pct": x, "cp_tokens_mean": 500.0} for x in scores]

    res.repeats = {"lamas": [rep(90.0, 92.0), rep(91.0, 91.0)], "maas": [rep(91.0, 91.0), rep(90.0, 94.0)]}
    out = res.to_json()
    assert [p["savings"]["score_gap_points_repeat_std"] for p in out["per_seed"]] == [1.0, 2.0]
    assert out["savings"]["score_gap_points_repeat_std"] == 1.5
    assert [p["repeats"]["score_gap_points"] for p in out["per_seed"]] == [[-1.0, 1.0], [1.0, -3.0]]


def test_command_takes_test_repeats():
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    run = subprocess.run([sys.executable, "-m", "maslat", "experiment", "lamas", "--task", "humaneval", "--seeds", "1",
                          "--methods", "lamas", "maas", "--epochs", "1", "--test-repeats", "2", "--json"],
                         capture_output=True, text=True, cwd=root)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["test_repeats"] == 2 and len(out["per_seed"][0]["repeats"]["score_gap_points"]) == 2
    assert "per seed (avg@2" in run.stdout and out["cpu_s"]["test"] > 0
