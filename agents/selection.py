"""Choosing one controller among restarts on a validation run (the robust protocol, ``agents.lamas``).

Why (issue 18): a controller's expected test score depends on its training run. Over five seeds and six
repeated test runs each, HumanEval LAMaS controllers scored 91.7 to 93.6 % in expectation and MaAS ones 92.5
to 94.3 %, so a seed whose LAMaS run drew low and whose MaAS run drew high lost over a point whatever its
critical-path cut. Training several controllers and keeping one by validation figures narrows that spread.

Validation never touches the test split. It replays the train split in file order, whole passes, until at
least ``min_episodes`` episodes, each pass in a world and with LLM outcomes drawn from its own seed (not the
training run's) and the controller sampling as at test time (stochastic, as LAMaS tests). Every candidate
sees the same passes (common random numbers), so their differences are paired.

Selection is constrained, like the paper's claim (a shorter critical path at no score loss): among the
candidates whose validation score is within ``margin_pts`` of the best one's, the shortest mean CP length.
A method without a latency term (MaAS, the lambda_t = 0 ablation) is selected by its own objective, the best
validation score (margin 0), so the unconstrained baseline gets the same restarts and the same validation
but no latency preference.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["select", "validate", "validation_seed"]

VAL_STREAM = 1000   # policy streams of validation passes (training uses 1 + 16 r, the test run 2)


def validation_seed(seed: int, pass_index: int) -> int:
    """The world and LLM-outcome seed of one validation pass: unrelated to the training and test runs' ``seed``."""
    return int(np.random.SeedSequence([seed, 0x5A11D, pass_index]).generate_state(1)[0])


def validate(args, controller, min_episodes: int) -> dict:
    """Score and mean CP tokens of ``controller`` over whole passes of the train split (module docstring)."""
    from dataclasses import replace

    from .lamas import METHODS, _make_env, make_policy

    method = METHODS[args.method]
    scores, cps = [], []
    passes = 0
    while passes == 0 or len(scores) < min_episodes:
        env = _make_env(replace(args, seed=validation_seed(args.seed, passes)), method, "train")
        n = len(env.queries) if args.max_train_queries is None else min(len(env.queries), args.max_train_queries)
        policy = make_policy(args, controller, record=False, stream=VAL_STREAM + passes)
        infos = env.rollout(policy, list(range(n)), concurrency=args.test_concurrency)
        scores += [i["score"] for i in infos]
        cps += [i["cp_tokens"] for i in infos]
        passes += 1
    return {"restart": args.restart, "val_score_pct": 100.0 * float(np.mean(scores)),
            "val_cp_tokens_mean": float(np.mean(cps)), "val_episodes": len(scores)}


def select(figures: Sequence[dict], margin_pts: float) -> tuple[int, list[dict]]:
    """Index of the chosen candidate, and the figures with ``chosen`` set: the shortest validation CP among
    those within ``margin_pts`` of the best validation score (ties: the earlier restart)."""
    if not figures:
        raise ValueError("select needs at least one candidate")
    best = max(f["val_score_pct"] for f in figures)
    ok = [i for i, f in enumerate(figures) if f["val_score_pct"] >= best - margin_pts]
    k = min(ok, key=lambda i: (figures[i]["val_cp_tokens_mean"], i))
    return k, [{**f, "chosen": i == k} for i, f in enumerate(figures)]
