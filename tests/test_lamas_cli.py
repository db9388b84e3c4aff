"""The LAMaS commands end to end (small runs), and the notebook executed headless."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _maslat(*argv, cwd=None):
    out = subprocess.run([sys.executable, "-m", "maslat", *argv], capture_output=True, text=True, cwd=cwd or ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_experiment_json_last_line(tmp_path):
    out = _maslat("experiment", "lamas", "--task", "humaneval", "--seeds", "1", "--methods", "lamas", "maas",
                  "single_cot", "--epochs", "1", "--plots", str(tmp_path), "--json")
    res = json.loads(out.strip().splitlines()[-1])
    assert res["task"] == "humaneval" and res["seeds"] == 1
    for name in ("lamas", "maas", "single_cot"):
        for k in ("score_pct", "cp_tokens_mean", "cp_tokens_p90", "cp_seconds_mean", "cp_seconds_p90",
                  "cost_usd_per_query", "calls_per_query"):
            assert res["methods"][name][k] >= 0
    assert "cp_tokens_reduction_pct" in res["savings"]
    (one,) = res["per_seed"]
    assert one["seed"] == 0 and one["methods"] == res["methods"] and one["savings"] == res["savings"]
    assert (tmp_path / "pareto.png").stat().st_size > 0 and (tmp_path / "curves.png").stat().st_size > 0


def test_train_then_evaluate(tmp_path):
    out = _maslat("train", "maas", "--task", "humaneval", "--epochs", "1", "--out", str(tmp_path / "r"), "--json")
    res = json.loads(out.strip().splitlines()[-1])
    assert Path(res["checkpoint"]).is_file() and res["steps"] == 9
    assert (tmp_path / "r" / "metrics.csv").read_text().startswith("epoch,step,losses/loss")
    ev = json.loads(_maslat("evaluate", res["checkpoint"], "--json").strip().splitlines()[-1])
    assert ev["method"] == "maas" and ev["task"] == "humaneval" and 0 <= ev["score_pct"] <= 100


def test_bench_env_json():
    res = json.loads(_maslat("bench", "env", "--episodes", "60", "--gym-episodes", "5", "--json").strip().splitlines()[-1])
    assert res["episodes_per_s"] > 0 and res["gym_episodes_per_s"] > 0


def test_per_seed_has_the_keys_of_the_means():
    """Two seeds: each entry is that seed's figures, and their mean is the reported mean."""
    from agents.experiment import ExperimentResult

    res = ExperimentResult("humaneval", [3, 4], ["lamas", "maas"])
    res.runs = {"lamas": [{"score_pct": 90.0, "cp_tokens_mean": 600.0, "cp_seconds_mean": 6.0},
                          {"score_pct": 92.0, "cp_tokens_mean": 900.0, "cp_seconds_mean": 9.0}],
                "maas": [{"score_pct": 91.0, "cp_tokens_mean": 1000.0, "cp_seconds_mean": 10.0},
                         {"score_pct": 92.0, "cp_tokens_mean": 1000.0, "cp_seconds_mean": 10.0}]}
    out = res.to_json()
    assert [p["seed"] for p in out["per_seed"]] == [3, 4]
    for p in out["per_seed"]:
        assert set(p["methods"]) == set(out["methods"]) and set(p["savings"]) == set(out["savings"])
        assert set(p["methods"]["lamas"]) == set(out["methods"]["lamas"])
    import numpy as np

    assert np.allclose([p["savings"]["cp_tokens_reduction_pct"] for p in out["per_seed"]], [40.0, 10.0])
    assert np.isclose(out["savings"]["cp_tokens_reduction_pct"], 25.0)
    assert out["per_seed"][1]["methods"]["lamas"]["score_pct"] == 92.0


def test_small_train_splits_get_at_least_min_updates_adam_steps():
    from agents.lamas import MIN_UPDATES, PROTOCOLS, Args, train_epochs

    assert PROTOCOLS["robust"].min_updates == MIN_UPDATES
    got = {t: train_epochs(Args(task=t)) for t in ("gsm8k", "math", "humaneval", "mbpp")}
    assert got == {"gsm8k": 4, "math": 8, "humaneval": 27, "mbpp": 11}
    for t, ep in got.items():   # whole epochs, the fewest that reach MIN_UPDATES (never fewer than the paper's 4)
        from envs import make_task

        batches = -(-make_task(t).num_train // 4)
        assert ep * batches >= MIN_UPDATES and (ep == 4 or (ep - 1) * batches < MIN_UPDATES)
    assert train_epochs(Args(task="humaneval", epochs=4)) == 4
    assert train_epochs(Args(task="humaneval", max_train_queries=4)) == MIN_UPDATES
    # the paper's protocol: 4 epochs everywhere
    assert {train_epochs(Args(task=t, protocol="paper")) for t in ("gsm8k", "math", "humaneval", "mbpp")} == {4}
