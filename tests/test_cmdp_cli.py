"""The CMDP commands end to end (small runs), and the notebook executed headless."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from agents.cmdp_experiment import PROTOCOL

ROOT = Path(__file__).resolve().parent.parent


def _maslat(*argv, cwd=None, ok=True):
    out = subprocess.run([sys.executable, "-m", "maslat", *argv], capture_output=True, text=True, cwd=cwd or ROOT)
    if ok:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def _last_json(out):
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_train_estimators_writes_dataset_and_bundle(tmp_path):
    res = _last_json(_maslat("train", "estimators", "--tasks", "mbpp", "--max-prompts", "8", "--concurrency", "1", "10",
                             "--estimator-steps", "300", "--out", str(tmp_path / "est.npz"), "--json"))
    assert set(res["mape_pct"]) == {"ttft", "tpot", "output_tokens", "total_latency"}
    assert 0 < res["calibration"]["within_prediction"] < 1 and res["models"] == ["llama-3.1-8b", "llama-3.1-70b"]
    head = (tmp_path / "phase2.csv").read_text().splitlines()[0]
    assert head == ("queue_waiting,queue_running,kv_utilization,model_id,role_id,strategy_id,total_input_tokens,"
                    "actual_ttft,actual_tpot,output_tokens")
    assert (tmp_path / "intermediate_prompts.csv").read_text().startswith("prompt_text,role_id")
    from envs.estimators import load_estimator
    est = load_estimator(str(tmp_path / "est.npz"), ("llama-3.1-8b", "llama-3.1-70b"))
    assert est.meta["source"]["phase2"]["concurrency"] == [1, 10]
    # retrain on the written dataset
    again = _last_json(_maslat("train", "estimators", "--data", str(tmp_path), "--estimator-steps", "300",
                               "--out", str(tmp_path / "b"), "--json"))
    assert again["rows"] == res["rows"]


def test_train_policy_then_evaluate(tmp_path):
    res = _last_json(_maslat("train", "ppo_lagrangian", "--task", "gsm8k", "--load", "idle", "--steps", "1000",
                             "--out", str(tmp_path / "p"), "--json"))
    assert Path(res["checkpoint"]).is_file() and res["load"] == "idle"
    head = (tmp_path / "p" / "metrics.csv").read_text().splitlines()[0]
    assert "constraint/lambda" in head and "latency/slo_attainment" in head
    ev = _last_json(_maslat("evaluate", res["checkpoint"], "--num-queries", "3", "--slo-factor", "1.0", "2.0",
                            "--load", "busy", "--json"))
    assert ev["policy"] == "ppo_lagrangian" and ev["load"] == "busy" and ev["episodes"] == 6
    assert set(ev["by_slo"]) == {"1", "2"} and 0 <= ev["goodput"] <= ev["slo_attainment"] <= 1
    mr = _last_json(_maslat("train", "masrouter", "--task", "humaneval", "--out", str(tmp_path / "m"), "--json"))
    ev2 = _last_json(_maslat("evaluate", "masrouter", mr["checkpoint"], "--num-queries", "2", "--slo-factor", "1.5",
                             "--json"))
    assert ev2["policy"] == "masrouter" and ev2["load"] == "idle"
    bad = _maslat("train", "ppo-lagrangian", "--load", "rush", "--steps", "1000", ok=False)
    assert bad.returncode == 2 and "invalid choice: 'rush'" in bad.stderr
    wrong = _maslat("evaluate", "masrouter", res["checkpoint"], "--num-queries", "1", ok=False)
    assert wrong.returncode == 2 and "holds a ppo-lagrangian policy, not masrouter" in wrong.stderr


def test_experiment_cmdp_json_last_line(tmp_path):
    res = _last_json(_maslat("experiment", "cmdp", "--task", "humaneval", "--seeds", "1", "--regimes", "busy",
                             "--eval-queries", "2", "--steps", "1000", "--slo-factor", "1.0", "--policies",
                             "ppo_lagrangian", "masrouter", "always_small_flash", "--plots", str(tmp_path),
                             "--out", str(tmp_path), "--json"))
    assert res["task"] == "humaneval" and set(res["regimes"]) == {"busy"}
    for pol in ("ppo_lagrangian", "masrouter", "always_small_flash"):
        m = res["regimes"]["busy"][pol]
        for k in ("quality_pct", "slo_attainment", "goodput", "latency_p50_s", "latency_p90_s", "latency_p95_s",
                  "cost_usd_per_query"):
            assert np.isfinite(m[k])
    assert (tmp_path / "goodput_vs_slo.png").stat().st_size > 0 and (tmp_path / "training.png").stat().st_size > 0
    assert (tmp_path / "episodes.csv").read_text().count("\n") == 3 * 2 + 1
    (one,) = res["per_seed"]
    assert one["seed"] == 0 and one["regimes"] == res["regimes"] and one["findings"] == res["findings"]
    assert res["background"] == {"train": "tape", "evaluate": "tape", "warmup_s": 60.0,  # the defaults
                                 "protocol": PROTOCOL}
    assert set(res["timing"]["evaluate_policy_cpu_s"]["busy"]) == {"ppo_lagrangian", "masrouter", "always_small_flash"}


def test_estimators_train_on_a_live_phase2_run_of_the_stand_in(tmp_path):
    """The same pipeline against a live OpenAI-compatible server: a simulator Phase-1 file, the collector's
    Phase 2 on the stand-in server, then the estimators trained on what it measured."""
    from envs.cmdp_dataset import phase1, write_csv
    from tests.standin import serving

    prompts = write_csv(phase1(("mbpp",), max_queries=2), tmp_path / "intermediate_prompts.csv")
    text_only = tmp_path / "text.csv"
    text_only.write_text("prompt_text,role_id\nWrite a function that sums a list.,ProgrammingExpert\n"
                         "Check this function for bugs.,TestAnalyst\n")
    runs = []
    with serving("--time-scale", "0.5") as srv:
        for name, pfile in (("sim", prompts), ("text", text_only)):
            out = tmp_path / name
            subprocess.run([sys.executable, "-m", "maslat", "collect", "--endpoint", srv.url, "--phase2", "--prompts",
                            str(pfile), "--concurrency", "2", "--max-tokens", "12", "--limit-prompts", "3", "--model-id", "llama-3.1-8b", "--out", str(out)],
                           cwd=ROOT, capture_output=True, text=True, timeout=180, check=True)
            runs.append(out)
    for out in runs:
        res = _last_json(_maslat("train", "estimators", "--data", str(out), "--estimator-steps", "50",
                                 "--out", str(tmp_path / f"{out.name}.npz"), "--json"))
        assert res["rows"] > 0 and np.isfinite(res["mape_pct"]["ttft"])


def test_cmdp_per_seed_entries_have_the_keys_of_the_means():
    import pandas as pd

    from agents.cmdp_experiment import findings, summarise, summarise_per_seed

    rng = np.random.default_rng(0)
    rows = pd.DataFrame([{"policy": p, "regime": "busy", "seed": s, "query": q, "slo_factor": f,
                          "quality": float(rng.random() < 0.8), "latency_s": float(rng.gamma(2.0)),
                          "attained": bool(rng.random() < 0.9 - 0.2 * s), "goodput": float(rng.random() < 0.7),
                          "cost_usd": 0.01, "calls": 3, "large_share": 0.5, "deepthink_share": 0.5}
                         for s in (0, 1) for p in ("ppo_lagrangian", "masrouter") for q in range(5) for f in (1.0, 2.0)])
    mean = summarise(rows)
    mean["findings"] = findings(mean)
    per = summarise_per_seed(rows)
    assert [p["seed"] for p in per] == [0, 1]
    for p in per:
        assert set(p) == {"seed", "regimes", "by_slo", "findings"}
        assert set(p["regimes"]["busy"]["ppo_lagrangian"]) == set(mean["regimes"]["busy"]["ppo_lagrangian"])
        assert set(p["findings"]["busy"]) == set(mean["findings"]["busy"])
    att = [p["regimes"]["busy"]["ppo_lagrangian"]["slo_attainment"] for p in per]
    assert np.isclose(np.mean(att), mean["regimes"]["busy"]["ppo_lagrangian"]["slo_attainment"])
    assert att == [float(rows[(rows.seed == s) & (rows.policy == "ppo_lagrangian")].attained.mean()) for s in (0, 1)]


def test_findings_text_with_ppo_lagrangian_alone_names_no_other_policy():
    from maslat.commands._cmdp_report import findings_text

    f = {"ppo_slo_attainment": 0.947, "ppo_min_attainment_over_slos": 0.9, "ppo_meets_target": False,
         "ppo_goodput": 0.749, "best_other": None, "best_other_goodput": None, "ppo_highest_goodput": True,
         "oracle_goodput": None, "masrouter_slo_attainment": None}
    text = findings_text({"findings": {"busy": f}})               # `--policies ppo_lagrangian` crashed here
    assert "goodput 0.749 vs best other (none run)" in text and "MISSES" in text
