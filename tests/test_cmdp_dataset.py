"""The two-phase estimator dataset (docs/system_aware.md#4-estimators) and the F_lat / F_len estimators."""

import numpy as np
import pandas as pd
import pytest

from agents.estimators import EstimatorArgs, _predict, train_estimators
from envs.cmdp_catalog import ROLE_NAMES, STRATEGIES, STRATEGY_NAMES
from envs.cmdp_dataset import (
    AUX_COLUMNS,
    PHASE1_COLUMNS,
    PHASE2_COLUMNS,
    Phase2Config,
    phase1,
    phase2,
    read_phase1,
    read_phase2,
    synthetic_text,
    write_csv,
)
from envs.estimators import MLPEstimator, lat_features, load_estimator, save_bundle

MODELS = ("llama-3.1-8b", "llama-3.1-70b")


@pytest.fixture(scope="module")
def small():
    p1 = phase1(("mbpp", "gsm8k"), max_queries=12)
    p2, aux = phase2(p1, Phase2Config(concurrency=(1, 10, 50), max_prompts=16, warmup_s=10.0))
    return p1, p2, aux


def test_phase1_prompts_have_the_seed_columns_and_exact_token_counts(small):
    from maslat.server.tokenizer import text_token_ids

    p1, _, _ = small
    assert tuple(p1.columns) == PHASE1_COLUMNS and tuple(p1.columns[:2]) == ("prompt_text", "role_id")
    assert set(p1.role_id) <= set(ROLE_NAMES) and set(p1.task) == {"mbpp", "gsm8k"}
    for text, n in zip(p1.prompt_text[:20], p1.prompt_tokens[:20], strict=True):
        assert len(text_token_ids(text)) == n
    # prompts carry their predecessors' outputs: later nodes of a topology have longer prompts
    chain = p1[(p1.node > 0)]
    assert chain.prompt_tokens.mean() > p1[p1.node == 0].prompt_tokens.mean()
    assert synthetic_text(5, 1) == synthetic_text(5, 1) != synthetic_text(5, 2)
    assert phase1(("mbpp",), max_queries=5).equals(phase1(("mbpp",), max_queries=5))


def test_phase2_has_exactly_the_seed_columns_and_spans_the_concurrency(small):
    from traces.phase2 import PHASE2_COLUMNS as LIVE_COLUMNS
    from traces.phase2 import STRATEGIES as LIVE_STRATEGIES

    _, p2, aux = small
    assert tuple(p2.columns) == PHASE2_COLUMNS == LIVE_COLUMNS    # same file as the live collector writes
    assert STRATEGIES == LIVE_STRATEGIES
    assert tuple(aux.columns) == AUX_COLUMNS and len(aux) == len(p2)
    assert len(p2) == 16 * 3 * 2 * 3                               # prompts x strategies x models x N
    assert set(p2.strategy_id) == set(STRATEGY_NAMES) and set(p2.model_id) == set(MODELS)
    run = p2.groupby(aux.concurrency).queue_running.mean()
    assert run[1] < 2 and 7 < run[10] < 11 and 40 < run[50] < 51  # the closed loop holds N requests in flight
    assert (p2.actual_ttft > 0).all() and (p2.output_tokens >= 1).all()
    deep, flash = (p2[p2.strategy_id == s].output_tokens.mean() for s in ("DeepThink", "Flash"))
    assert deep > 3 * flash
    # TPOT grows with the batch the engine decodes
    t = p2[p2.output_tokens > 1].groupby(aux.concurrency).actual_tpot.median()
    assert t[50] > t[1]


def test_phase2_is_deterministic(small):
    p1, p2, aux = small
    q2, qa = phase2(p1, Phase2Config(concurrency=(1, 10, 50), max_prompts=16, warmup_s=10.0))
    pd.testing.assert_frame_equal(p2, q2)
    pd.testing.assert_frame_equal(aux, qa)


def test_readers_name_file_line_and_field(tmp_path, small):
    p1, p2, aux = small
    write_csv(p2, tmp_path / "phase2.csv")
    write_csv(aux, tmp_path / "phase2_aux.csv")
    a, b = read_phase2(tmp_path / "phase2.csv")
    assert len(a) == len(p2) and b is not None
    bad = p2.astype({"actual_ttft": object})
    bad.loc[5, "actual_ttft"] = "fast"
    write_csv(bad, tmp_path / "bad" / "phase2.csv")
    with pytest.raises(ValueError, match=r"phase2.csv:7: field actual_ttft"):
        read_phase2(tmp_path / "bad" / "phase2.csv")
    write_csv(p2.drop(columns=["kv_utilization"]), tmp_path / "cols" / "phase2.csv")
    with pytest.raises(ValueError, match="columns must be exactly"):
        read_phase2(tmp_path / "cols" / "phase2.csv")
    q = p1.copy()
    q.loc[2, "role_id"] = "Wizard"
    write_csv(q, tmp_path / "p1.csv")
    with pytest.raises(ValueError, match=r"p1.csv:4: field role_id"):
        read_phase1(tmp_path / "p1.csv")
    with pytest.raises(FileNotFoundError):
        read_phase2(tmp_path / "nope.csv")


def test_estimators_train_export_and_predict_like_the_trainer(tmp_path, small):
    _, p2, aux = small
    args = EstimatorArgs(steps=300, seed=1)
    nets, metrics = train_estimators(p2, aux, MODELS, args)
    nets2, metrics2 = train_estimators(p2, aux, MODELS, args)
    assert all(np.array_equal(nets["lat"][k], nets2["lat"][k]) for k in nets["lat"])   # deterministic
    assert set(metrics["mape_pct"]) == {"ttft", "tpot", "output_tokens", "total_latency"}
    assert set(metrics["mape_pct_by_concurrency"]) == {"1", "10", "50"}
    assert {"within_prediction", "measured_over_predicted", "slope", "deciles"} <= set(metrics["calibration"])
    path = save_bundle(tmp_path / "e.npz", nets, {"models": list(MODELS), "roles": list(ROLE_NAMES),
                                                  "strategies": list(STRATEGY_NAMES)})
    est = load_estimator(path, MODELS)
    assert isinstance(est, MLPEstimator)
    system = np.array([[3.0, 40.0, 0.2, 80.0], [0.0, 5.0, 0.05, 120.0]])
    prompts = np.full((2, 3), 600.0)
    ttft, tpot, length = est.predict(system, 2, prompts, np.full(384, 0.05))
    x = lat_features(system[[0, 0, 0, 1, 1, 1]], np.full(6, 2), prompts.reshape(-1), np.repeat([0, 1], 3), 2)
    y = np.exp(_predict(nets["lat"], x))
    assert np.allclose(ttft.reshape(-1), y[:, 0]) and np.allclose(tpot.reshape(-1), y[:, 1])
    assert ttft.shape == tpot.shape == length.shape == (2, 3) and np.all(length > 0)


def test_the_shipped_bundle_is_calibrated_and_load_aware():
    est = load_estimator("default", MODELS)
    meta = est.meta
    assert meta["metrics"]["calibration"]["measured_over_predicted"] == pytest.approx(1.0, abs=0.15)
    prompts = np.full((2, 3), 600.0)
    emb = np.full(384, 0.05)
    light = est.predict(np.array([[0, 2, 0.01, 30.0], [0, 2, 0.01, 70.0]]), 0, prompts, emb)
    heavy = est.predict(np.array([[0, 400, 0.6, 300.0], [0, 300, 0.5, 400.0]]), 0, prompts, emb)
    assert np.all(heavy[1] > light[1])                          # TPOT grows with the running batch
    assert np.all(light[2][:, 0] < light[2][:, 1]) and np.all(light[2][:, 1] < light[2][:, 2])  # Flash < Concise < Deep
