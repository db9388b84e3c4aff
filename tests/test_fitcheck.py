"""``traces.fitcheck.identifiability``: a term the rows pin has a small relative standard error; a term whose column
all but repeats another's, or that a noisy offset column trades against, is reported weak."""

from __future__ import annotations

import numpy as np

from traces.fitcheck import identifiability


def _rows(rng, n, collinear):
    a = rng.uniform(1, 10, n)
    b = a * 2 + (rng.normal(0, 1e-3, n) if collinear else rng.uniform(1, 10, n))
    X = np.column_stack([np.ones(n), a, b])
    coef = np.array([1.0, 0.5, 0.25])
    y = X @ coef * (1 + rng.normal(0, 0.05, n))
    return X, y, coef


def test_separable_terms_are_pinned_and_collinear_ones_are_weak():
    rng = np.random.default_rng(0)
    names, steps = ("c", "a", "b"), np.ones(200)
    X, y, coef = _rows(rng, 200, collinear=False)
    ok = identifiability(X, y, steps, np.zeros(200, bool), names, names, coef, None)
    assert ok["weak"] == [] and max(ok["relative_se"].values()) < 0.2 and ok["condition_number"] < 20
    X, y, coef = _rows(rng, 200, collinear=True)
    bad = identifiability(X, y, steps, np.zeros(200, bool), names, names, coef, None)
    assert {"a", "b"} <= set(bad["weak"]) and bad["condition_number"] > 1e3


def test_an_offset_column_is_judged_with_the_coefficients():
    rng = np.random.default_rng(1)
    n = 60
    X = np.column_stack([np.ones(n), rng.uniform(100, 300, n)])
    has = np.zeros(n, bool)
    has[:30] = True
    coef = np.array([0.01, 0.0005])
    y = X @ coef + 0.03 * has + rng.normal(0, 0.03, n)  # noise as large as the offset itself
    out = identifiability(X, y, np.ones(n), has, ("s", "p"), ("s", "p"), coef, 0.03)
    assert "offset_s" in out["relative_se"] and out["relative_se"]["offset_s"] > 0.2
