"""How well a step-time fit's rows pin each fitted term (``traces.stepfit``; reported by ``maslat calibrate``).

NNLS returns a value for every free term whether or not the data determine it. On a 2-core CPU engine served
over HTTP, a client-side constant fitted with the step coefficients came out anywhere from 0.1 to 125 ms on
collections of the same loads: formally identified (its column is not collinear with the others: condition
numbers ~25), but its standard error was ~20-30 ms, as large as the constant itself, with prefill rows whose
steps wander by ~25 %. ``identifiability`` says so in the report instead of leaving it to be found by replays.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["WEAK_RELATIVE_SE", "identifiability"]

#: a fitted term whose standard error exceeds this fraction of its value is reported as weakly identified
WEAK_RELATIVE_SE = 0.5


def identifiability(X: np.ndarray, y: np.ndarray, steps: np.ndarray, has_offset: np.ndarray, names: Sequence[str],
                    free: Sequence[str], coef: np.ndarray, offset: float | None) -> dict:
    """The condition number of the weighted design (rows weighted ``1/sqrt(steps)`` as in the fit) with its
    columns scaled to unit RMS (the ``free`` coefficients, plus the offset column when ``offset`` was fitted), and
    each term's standard error relative to its value, from the least-squares covariance at the fit's residuals
    (prior rows left out); ``weak`` lists the terms above ``WEAK_RELATIVE_SE``."""
    cols = [list(names).index(c) for c in free]
    w = 1.0 / np.sqrt(np.maximum(steps, 1))
    A, labels, vals = X[:, cols] * w[:, None], list(free), [float(coef[c]) for c in cols]
    if offset is not None:
        A, labels, vals = np.hstack([A, (has_offset * w)[:, None]]), [*labels, "offset_s"], [*vals, offset]
    rms = np.sqrt((A**2).mean(axis=0))
    keep = rms > 0
    As = A[:, keep] / rms[keep]
    resid = (y - X @ coef - (offset or 0.0) * has_offset) * w
    s2 = float(resid @ resid) / max(len(resid) - As.shape[1], 1)
    se = np.full(len(labels), np.inf)
    se[keep] = np.sqrt(np.maximum(np.diag(s2 * np.linalg.pinv(As.T @ As)), 0.0)) / rms[keep]
    rel = {n: (float(e / abs(v)) if v else None) for n, e, v in zip(labels, se, vals, strict=True)}
    return {"condition_number": float(np.linalg.cond(As)) if As.size else None, "relative_se": rel,
            "weak": sorted(n for n, r in rel.items() if r is None or r > WEAK_RELATIVE_SE)}
