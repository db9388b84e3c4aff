"""Choosing one controller among restarts on a validation run of the train split (issue 18, ``agents.selection``).

Fast checks of the mechanism: the constrained rule, that validation replays the train split only and in
worlds of its own, that restart 0 is the single run bit for bit, and that the experiment reports what each
seed kept. Whether it makes every seed reproduce the paper's claim is ``test_lamas_robust`` (slow)."""

import numpy as np
import pytest
import torch

from agents.lamas import PROTOCOLS, Args, train, train_one
from agents.selection import select, validate, validation_seed


def _fig(score, cp):
    return {"val_score_pct": score, "val_cp_tokens_mean": cp}


def test_select_takes_the_shortest_path_among_candidates_near_the_best_score():
    k, table = select([_fig(93.0, 900.0), _fig(92.7, 600.0), _fig(91.0, 400.0)], margin_pts=0.5)
    assert k == 1 and [t["chosen"] for t in table] == [False, True, False]
    # 91.0 is 2 points below the best: its shorter path does not buy it in; margin 0 keeps the best score
    assert select([_fig(93.0, 900.0), _fig(92.7, 600.0), _fig(91.0, 400.0)], margin_pts=0.0)[0] == 0
    assert select([_fig(93.0, 900.0), _fig(93.0, 900.0)], margin_pts=0.5)[0] == 0     # ties: the earlier
    with pytest.raises(ValueError, match="at least one candidate"):
        select([], 0.5)


def test_validation_replays_the_train_split_in_worlds_of_its_own():
    torch.set_num_threads(1)
    a = Args(method="lamas", task="humaneval", seed=3, epochs=1, max_train_queries=8, restarts=1)
    tr = train(a)
    fig = validate(a, tr.controller, min_episodes=20)
    assert fig["val_episodes"] == 24                     # whole passes over the 8 train queries, >= 20
    assert 0.0 <= fig["val_score_pct"] <= 100.0 and fig["val_cp_tokens_mean"] > 0
    assert fig == validate(a, tr.controller, min_episodes=20)          # deterministic
    seeds = {validation_seed(3, p) for p in range(3)}
    assert len(seeds) == 3 and 3 not in seeds                           # not the training/test run's seed


def test_restarts_train_different_controllers_and_keep_one():
    torch.set_num_threads(1)
    a = Args(method="lamas", task="humaneval", seed=1, epochs=1, max_train_queries=8, restarts=3)
    tr = train(a)
    assert len(tr.selection) == 3 and sum(t["chosen"] for t in tr.selection) == 1
    chosen = next(t["restart"] for t in tr.selection if t["chosen"])
    assert tr.args.restart == chosen
    one = train_one(Args(method="lamas", task="humaneval", seed=1, epochs=1, max_train_queries=8, restarts=1))
    other = train_one(Args(method="lamas", task="humaneval", seed=1, epochs=1, max_train_queries=8, restart=1))
    w = [next(c.parameters()).detach().numpy() for c in (one.controller, other.controller)]
    assert not np.array_equal(w[0], w[1])
    # restart 0 is the single run, bit for bit
    if chosen == 0:
        assert torch.equal(next(tr.controller.parameters()), next(one.controller.parameters()))
    single = train(Args(method="lamas", task="humaneval", seed=1, epochs=1, max_train_queries=8, restarts=1))
    assert single.selection == [] and single.metrics == one.metrics


def test_restarts_are_validated_and_single_by_default():
    assert PROTOCOLS["robust"].restarts == 1 and PROTOCOLS["paper"].restarts == 1
    with pytest.raises(ValueError, match="restarts"):
        Args(restarts=0)


def test_maas_is_selected_by_its_own_objective_the_best_score():
    """MaAS has no latency term: among restarts it keeps the best validation score, not a shorter path."""
    torch.set_num_threads(1)
    tr = train(Args(method="maas", task="humaneval", seed=2, epochs=1, max_train_queries=8, restarts=2))
    best = max(t["val_score_pct"] for t in tr.selection)
    assert next(t for t in tr.selection if t["chosen"])["val_score_pct"] == best


def test_experiment_reports_each_seeds_selection():
    from agents.experiment import run_experiment

    torch.set_num_threads(1)
    out = run_experiment("humaneval", [0], ["lamas", "single_cot"], epochs=1, restarts=3).to_json()
    (one,) = out["per_seed"]
    assert set(one["selection"]) == {"lamas"}                          # static methods train nothing
    assert len(one["selection"]["lamas"]) == 3
    assert sum(t["chosen"] for t in one["selection"]["lamas"]) == 1
