"""Keyed architecture sampling (``ControllerPolicy(key=...)``, the robust protocol's default): a decision's
draws depend on the key, the query, its visit, the attempt and the layer only, so two methods' controllers
tested with one key are coupled (common random numbers), and the order episodes act in does not matter."""

import numpy as np
import torch

from agents.controller import ControllerPolicy, LAMaSController, query_key
from agents.lamas import PROTOCOLS, Args, make_policy
from envs import operator_embeddings, operator_set

MATH = operator_set("math")
QUERIES = np.random.default_rng(3).standard_normal((6, 384)).astype(np.float32)


def _obs(q: int, layer: int = 0, attempt: int = 0, prev: int = 7) -> dict:
    return {"query": QUERIES[q], "layer": layer, "attempt": attempt, "prev_first": prev}


def _episode(pol: ControllerPolicy, q: int, episode: int, attempt: int = 0) -> list[tuple[int, ...]]:
    out, prev = [], 7
    for layer in range(4):
        a = pol.act(_obs(q, layer, attempt, prev), episode=episode)
        sel = tuple(int(i) for i in np.flatnonzero(a))
        out.append(sel)
        prev = pol.traces[episode].decisions[-1].selected[0]
    return out


def _policy(seed: int, key, record: bool = True) -> ControllerPolicy:
    ctrl = LAMaSController(operator_embeddings("math"), seed=seed)
    return ControllerPolicy(ctrl, MATH, np.random.default_rng(99), record=record, key=key)


def test_keyed_draws_do_not_depend_on_the_order_episodes_act():
    a, b = _policy(0, (5, 1)), _policy(0, (5, 1))
    first = {q: _episode(a, q, episode=q) for q in range(6)}
    second = {q: _episode(b, q, episode=10 + q) for q in reversed(range(6))}
    assert first == second
    # the shared-stream sampler (LAMaS's) depends on the order
    c, d = _policy(0, None), _policy(0, None)
    assert {q: _episode(c, q, q) for q in range(6)} != {q: _episode(d, q, q) for q in reversed(range(6))}


def test_visits_attempts_and_keys_draw_afresh():
    pol = _policy(0, (5, 1))
    visits = [_episode(pol, 0, episode=e) for e in range(8)]
    assert len({tuple(v) for v in visits}) > 1        # a query's later visits are not replays
    assert _episode(_policy(0, (5, 1)), 0, 0) == visits[0]
    other = [_episode(_policy(0, (6, 1)), 0, e) for e in range(8)]
    assert other != visits


def test_two_controllers_with_one_key_agree_where_their_probabilities_do():
    """Identical weights: identical architectures; a slightly moved controller: mostly identical (coupled),
    far more often than under independent draws."""
    base, moved, indep = _policy(0, (1, 2)), _policy(0, (1, 2)), _policy(0, (9, 9))
    same = [_episode(base, q, q) == _episode(_policy(0, (1, 2)), q, q) for q in range(6)]
    assert all(same)
    base = _policy(0, (1, 2))       # fresh visit counters
    with torch.no_grad():
        for p in moved.controller.parameters():
            p.add_(0.005 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    moved.controller.refresh()
    assert not np.allclose(base.controller.probs_np(0, QUERIES[0], 7), moved.controller.probs_np(0, QUERIES[0], 7))
    coupled = np.mean([_episode(base, q % 6, q) == _episode(moved, q % 6, q) for q in range(60)])
    base = _policy(0, (1, 2))
    free = np.mean([_episode(base, q % 6, q) == _episode(indep, q % 6, q) for q in range(60)])
    assert coupled > 0.9 and coupled > free + 0.3, (coupled, free)


def test_the_robust_protocol_samples_keyed_and_the_paper_one_does_not():
    assert PROTOCOLS["robust"].keyed_sampling and not PROTOCOLS["paper"].keyed_sampling
    ctrl = LAMaSController(operator_embeddings("code"), seed=0)
    robust = make_policy(Args(task="humaneval", seed=4), ctrl, record=False, stream=2)
    maas = make_policy(Args(task="humaneval", seed=4, method="maas"), ctrl, record=False, stream=2)
    paper = make_policy(Args(task="humaneval", seed=4, protocol="paper"), ctrl, record=False, stream=2)
    assert robust.key == maas.key and robust.key is not None and paper.key is None


def test_query_key_is_stable():
    assert query_key(QUERIES[0]) == query_key(QUERIES[0].copy()) != query_key(QUERIES[1])
    assert 0 <= query_key(QUERIES[0]) < 2 ** 63
