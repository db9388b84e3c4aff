"""The LAMaS controller: size, bounded cosine softmax, threshold sampling, layer-0 rules, credit, EMA."""

import numpy as np
import pytest
import torch

from agents.controller import (
    ControllerPolicy,
    Decision,
    LAMaSController,
    Trace,
    apply_layer0_rules,
    threshold_sample,
)
from agents.objectives import (
    EMANormaliser,
    ObjectiveInput,
    QueryBaseline,
    bottleneck_utilities,
    cost_deltas,
    cp_loss,
    layer_tokens,
)
from envs import operator_embeddings, operator_set

MATH = operator_set("math")


def test_parameter_count_and_bounded_probabilities():
    ctrl = LAMaSController(operator_embeddings("math"), seed=0)
    assert sum(p.numel() for p in ctrl.parameters()) == 135_424
    q = torch.as_tensor(np.random.default_rng(0).standard_normal((64, 384)), dtype=torch.float32)
    for layer in range(4):
        p = ctrl.probs(layer, q, torch.zeros(64, dtype=torch.long))
        assert torch.allclose(p.sum(-1), torch.ones(64))
        p = p.detach()
        assert float(p.max()) <= np.e / (np.e + 6 / np.e) + 1e-6 and float(p.min()) >= 0.0218
    # the numpy acting path agrees with the torch one
    for layer, prev in ((0, 7), (2, 3)):
        pt = ctrl.probs(layer, q[:1], torch.tensor([min(prev, 6)]))[0].detach().numpy()
        assert np.allclose(ctrl.probs_np(layer, q[0].numpy(), prev), pt, atol=1e-6)


def test_threshold_sampling_uniform_draws_three():
    rng = np.random.default_rng(0)
    p = np.full(7, 1 / 7)
    sizes = {len(threshold_sample(p, 0.3, rng)) for _ in range(200)}
    assert sizes == {3}
    for _ in range(50):
        s = threshold_sample(p, 0.3, rng)
        assert len(set(s)) == len(s)


def test_threshold_sampling_single_when_first_draw_is_heavy():
    rng = np.random.default_rng(1)
    p = np.array([0.55, 0.075, 0.075, 0.075, 0.075, 0.075, 0.075])
    draws = [threshold_sample(p, 0.3, rng) for _ in range(4000)]
    first = np.mean([d[0] == 0 for d in draws])
    assert first == pytest.approx(0.55, abs=0.03)
    assert all(len(d) == 1 for d in draws if d[0] == 0)
    # a light first draw continues until the drawn original mass reaches 0.3
    assert all(sum(p[d]) >= 0.3 for d in draws) and all(sum(p[d[:-1]]) < 0.3 for d in draws)


def test_layer0_rules():
    idx = {n: i for i, n in enumerate(MATH)}
    assert apply_layer0_rules([idx["SelfRefine"], idx["EarlyStop"], idx["GenerateCoT"]], MATH) == ([idx["Generate"]], True)
    assert apply_layer0_rules([idx["ScEnsemble"], idx["SelfRefine"]], MATH) == ([idx["Generate"]], False)
    sel, stop = apply_layer0_rules([idx["Programmer"], idx["ScEnsemble"], idx["MultiGenerateCoT"], idx["Generate"]], MATH)
    assert not stop and sel == [idx["MultiGenerateCoT"], idx["Programmer"], idx["ScEnsemble"], idx["Generate"]]
    assert apply_layer0_rules([idx["GenerateCoT"], idx["ScEnsemble"]], MATH) == ([idx["GenerateCoT"], idx["ScEnsemble"]], False)


def test_policy_stops_after_layer0_earlystop_and_records_decisions():
    ctrl = LAMaSController(operator_embeddings("math"), seed=0)
    pol = ControllerPolicy(ctrl, MATH, np.random.default_rng(0))
    q = operator_embeddings("math")[0]
    stops = 0
    for ep in range(300):
        a = pol.act({"layer": 0, "prev_first": 7, "query": q, "attempt": 0}, episode=ep)
        ops = [MATH[i] for i in a if i < 7]
        assert ops[0] in ("Generate", "GenerateCoT", "MultiGenerateCoT")
        d = pol.traces[ep].decisions[0]
        if d.penalty:
            stops += 1
            assert ops == ["Generate", "EarlyStop"] and [MATH[i] for i in d.selected] == ["Generate"]
    assert stops > 0


def test_critical_path_credit_goes_to_the_bottleneck_only():
    u = bottleneck_utilities(1.0, 0.001, [[100.0, 300.0, 300.0], [50.0]], token_weight=0.005)
    base, pen = 1.0 - 0.003, 1.0 - 0.003 - 0.005 / 50 * 350
    assert u == [[pytest.approx(base), pytest.approx(pen), pytest.approx(base)], [pytest.approx(pen)]]
    # lambda_t = 0: every operator gets s - 3c
    assert bottleneck_utilities(0.0, 0.0, [[5.0, 9.0]], 0.0) == [[0.0, 0.0]]


def test_ema_normalisation():
    ema = EMANormaliser()
    x1 = torch.tensor([1.0, 0.0, 1.0, 1.0])
    out1 = ema(x1)
    assert ema.mean == pytest.approx(0.75) and ema.std == pytest.approx(float(np.std([1, 0, 1, 1])))
    assert torch.allclose(out1, (x1 - 0.75) / ema.std)
    x2 = torch.tensor([2.0, 2.0])
    ema(x2)
    assert ema.mean == pytest.approx(0.95 * 0.75 + 0.05 * 2.0)
    assert ema.std == pytest.approx(0.95 * np.std([1, 0, 1, 1]) + 0.05 * 1e-8)


def test_cost_deltas_are_cumulative_differences():
    c, last = cost_deltas([0.003, 0.002, 0.006], previous_usd=0.001)
    assert c == pytest.approx([0.002, -0.001, 0.004]) and last == 0.006


def test_cp_loss_pushes_the_bottleneck_down():
    ctrl = LAMaSController(operator_embeddings("math"), seed=0)
    q = operator_embeddings("math")[2]
    sel = [1, 2, 5]                                   # GenerateCoT, MultiGenerateCoT, SelfRefine
    tr = Trace(q, [Decision(0, 7, sel, False)])
    info = {"layers": [{"ops": [MATH[i] for i in sel], "cp_tokens": [300.0, 10.0, 10.0]}]}
    batch = [ObjectiveInput(1.0, 0.0, 300.0, tr, layer_tokens(tr, info, MATH))]
    loss, _ = cp_loss(ctrl, batch, 0.5, EMANormaliser())
    loss.backward()
    opt = torch.optim.SGD(ctrl.parameters(), lr=0.5)
    p0 = ctrl.probs(0, torch.tensor(q[None].copy()), torch.zeros(1, dtype=torch.long))[0].detach()
    opt.step()
    p1 = ctrl.probs(0, torch.tensor(q[None].copy()), torch.zeros(1, dtype=torch.long))[0].detach()
    assert p1[sel[0]] < p0[sel[0]]                       # the bottleneck loses probability
    assert all(p1[j] > p0[j] for j in sel[1:])           # the others gain


def _one_op_input(score: float, query: int, tokens: float = 100.0) -> ObjectiveInput:
    q = operator_embeddings("math")[query % 7]
    tr = Trace(q, [Decision(0, 7, [0], False)])
    return ObjectiveInput(score, 0.0, tokens, tr, [[tokens]], query=query)


def test_query_baseline_is_the_query_s_own_earlier_mean():
    qb = QueryBaseline()
    b1 = [_one_op_input(1.0, 0), _one_op_input(0.0, 1)]
    assert qb.offsets(b1) == [0.5, 0.5]                 # first visits: the batch mean
    assert qb.offsets([_one_op_input(0.0, 0), _one_op_input(0.0, 1), _one_op_input(1.0, 2)]) == [1.0, 0.0, 1 / 3]
    assert qb.offsets([_one_op_input(1.0, 0)]) == [0.5]  # (1 + 0) / 2: never its own visit
    assert qb.visits == {0: 3, 1: 2, 2: 1}


def test_query_baseline_removes_what_the_query_fixes():
    """A query wrong under every architecture pushes its operators down without the baseline; with it, only the
    critical-path credit is left, so the same bottleneck gets the same push on an easy and a hard query."""
    torch.manual_seed(0)

    def grads(baseline, score):
        ctrl = LAMaSController(operator_embeddings("math"), seed=0)
        batch = [_one_op_input(score, 3, 300.0), _one_op_input(1.0, 4, 10.0)]
        if baseline is not None:
            baseline.offsets(batch)                       # an earlier epoch with the same outcomes
        loss, raw = cp_loss(ctrl, batch, 0.02, None, baseline)
        loss.backward()
        return torch.cat([p.grad.flatten() for p in ctrl.parameters() if p.grad is not None]), raw

    g_easy, raw_easy = grads(QueryBaseline(), 1.0)
    g_hard, raw_hard = grads(QueryBaseline(), 0.0)
    assert torch.allclose(g_easy, g_hard) and raw_hard == pytest.approx(raw_easy - 0.5)  # raw utility unchanged
    g_easy0, _ = grads(None, 1.0)
    g_hard0, _ = grads(None, 0.0)
    assert not torch.allclose(g_easy0, g_hard0, atol=1e-4)
