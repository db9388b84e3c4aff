"""LAMaS's CP length (docs/lamas.md#4-cp-length-and-cost) on hand-computed cases, and the task models'
calibration."""

import numpy as np
import pytest

from envs.operators import LENGTH_SIGMA, quality
from envs.supernet import Draws, GraphConfig, QueryRun
from envs.tasks import TASKS, calibrate, make_queries, make_task, sigmoid, vote_accuracy


def _run(task="gsm8k", split="train", execution="parallel", u=0.5):
    """A query of difficulty 0 whose draws are all z = 0 (mean lengths) and u = ``u``."""
    spec = make_task(task)
    d = Draws.__new__(Draws)
    d.u = np.full((6, 8, 6, 4), u)
    d.z = np.zeros((6, 8, 6, 4))
    return QueryRun(cfg=GraphConfig(task=spec, split=split, execution=execution), quality=quality(spec),
                    difficulty=0.0, query_tokens=80, query_content_id=1, draws=d)


def tok(mean):   # completion tokens at z = 0 and difficulty 0
    return round(mean * np.exp(-LENGTH_SIGMA**2 / 2))


TOOL = 0.1 * np.exp(-0.125)   # seconds of one program run at z = 0


def _layers(run, layers):
    for i, names in enumerate(layers):
        plans = [run.plan(n, i) for n in names]
        if run.cfg.parallel:
            for p in plans:
                run.apply(p)
        run.record_layer([p.cp_tokens for p in plans])
    for p in run.post_steps():
        run.apply_post(p)
    return run


def test_cp_parallel_gsm8k_train_by_hand():
    run = _layers(_run(), [["GenerateCoT", "SelfRefine"], ["ScEnsemble", "EarlyStop"]])
    # layer 0: max(CoT 212, SelfRefine 212); layer 1: max(ScEnsemble 111, EarlyStop 0);
    # post: one solution left -> no final ensemble; Programmer verification: code 148, no tool time on train
    assert (tok(230), tok(120), tok(160)) == (212, 111, 148)
    assert run.layer_cp == [[212, 212], [111, 0.0]]
    assert run.cp_layers == 212 + 111
    assert run.cp_tokens == 212 + 111 + 148


def test_cp_sequential_sums_layers():
    run = _run(execution="sequential")
    for i, names in enumerate([["GenerateCoT", "SelfRefine"], ["ScEnsemble", "EarlyStop"]]):
        plans = []
        for n in names:
            plans.append(run.plan(n, i))
            run.apply(plans[-1])
        run.record_layer([p.cp_tokens for p in plans])
    for p in run.post_steps():
        run.apply_post(p)
    assert run.cp_tokens == (212 + 212) + (111 + 0) + 148


def test_multigeneratecot_counts_a_third_and_final_ensemble_runs():
    run = _layers(_run(), [["MultiGenerateCoT", "Generate"]])
    mg = run.layer_cp[0][0]
    assert mg == pytest.approx(3 * 212 / 3)
    # four solutions in hand -> final ScEnsemble (111) + verification (148)
    assert run.post_cp == 111 + 148
    assert run.cp_tokens == max(mg, 212) + 111 + 148


def test_programmer_tool_time_counts_where_lamas_captures_it():
    # GSM8K test, parallel: code 148 + refine-answer 55 + 50 tokens/s x tool seconds
    test_run = _layers(_run(split="test"), [["Generate"], ["Programmer", "EarlyStop"]])
    assert test_run.layer_cp[1][0] == pytest.approx(148 + tok(60) + 50 * TOOL)
    assert test_run.post_cp == pytest.approx(111 + 148 + 50 * TOOL)     # 2 solutions -> ensemble; verification
    train_run = _layers(_run(split="train"), [["Generate"], ["Programmer", "EarlyStop"]])
    assert train_run.layer_cp[1][0] == 148 + tok(60)
    # sequential branches never add the Programmer's tool time
    seq = _run(split="test", execution="sequential")
    assert seq.plan("Programmer", 1).cp_tokens == 148 + tok(60)


def test_humaneval_post_test_counts_tool_time_and_improve_call():
    run = _layers(_run("humaneval", u=0.99), [["Generate", "EarlyStop"]])   # u=0.99: the attempt is wrong
    caught = run._caught(run.current.label)
    plan_test = run._plan_Test(5)
    reflects = sum(1 for s in plan_test.stages for c in s if hasattr(c, "kind"))
    tools = sum(1 for s in plan_test.stages for c in s if hasattr(c, "seconds"))
    assert plan_test.cp_tokens == pytest.approx(reflects * tok(320) + 50 * tools * TOOL)
    if caught:
        assert reflects == 3 and tools == 4 and not plan_test.passed
        assert run.post_cp == pytest.approx(plan_test.cp_tokens + tok(200))   # + ImproveCode
    else:
        assert reflects == 0 and tools == 1 and plan_test.passed


def test_math_pre_step_is_not_on_the_critical_path():
    run = _run("math", split="train")
    pre = list(run.pre_steps())
    assert len(pre) == 1 and pre[0].name == "Programmer" and pre[0].cp_tokens > 0
    for p in pre:
        run.apply(p)
    _layers(run, [["GenerateCoT", "EarlyStop"]])
    assert run.cp_tokens == tok(600) + tok(150)    # layer + final ensemble over {pre-step, CoT}
    cfg = GraphConfig(task=make_task("math"), split="test", variant="lamas")
    assert not cfg.pre_programmer and GraphConfig(task=make_task("math"), split="test", variant="maas").pre_programmer


def test_ensemble_over_nothing_raises():
    run = _run()
    assert run.plan("ScEnsemble", 0).raises
    run.apply(run.plan("Generate", 0))
    assert not run.plan("ScEnsemble", 1).raises


@pytest.mark.parametrize("name", sorted(TASKS))
def test_calibration_reproduces_published_accuracies(name):
    spec = make_task(name)
    cal = calibrate(spec)
    from envs.tasks import _GH_W, _GH_X
    p_cot = sigmoid(cal.theta["cot"] - cal.spread * _GH_X)
    if not spec.cot_is_generate:
        assert cal.mean_accuracy("cot") == pytest.approx(spec.acc_cot, abs=1e-6)
    assert cal.mean_accuracy("io") == pytest.approx(spec.acc_io, abs=1e-6)
    sc = float(np.dot(_GH_W, vote_accuracy(p_cot, 5)))
    base = spec.acc_io if spec.cot_is_generate else spec.acc_cot
    assert sc - base == pytest.approx(spec.acc_sc5 - spec.acc_cot, abs=0.01)
    q = make_queries(spec, "test")
    assert len(q) == spec.num_test and q.embedding.shape == (spec.num_test, 384)
    assert np.allclose(np.linalg.norm(q.embedding, axis=1), 1.0, atol=1e-5)
    assert abs(float(sigmoid(cal.theta["cot"] - q.difficulty).mean()) - cal.mean_accuracy("cot")) < 0.01
    # the embedding carries (noisy) information about difficulty
    tr = make_queries(spec, "train")
    assert tr.prompt_tokens.min() >= 8


def test_vote_accuracy_limits():
    assert vote_accuracy(np.array([1.0]), 5)[0] == pytest.approx(1.0)
    assert vote_accuracy(np.array([0.0]), 5)[0] == pytest.approx(0.0)
    p = np.array([0.7])
    assert vote_accuracy(p, 1)[0] == pytest.approx(0.7)
    assert vote_accuracy(p, 5)[0] > 0.7
