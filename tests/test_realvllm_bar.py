"""The real-engine accuracy bar (``tests/realvllm.py``: ``pooled_row``, ``bar_passes``) on synthetic numbers: it
passes a simulator within the engine's own spread and fails one beyond it, in every mode that asserts a bar."""

from __future__ import annotations

import math

import pytest

from .realvllm import ACCURACY_MODES, DEFAULT_BARS, accuracy_for, bar_passes, pooled_row


def _pair(a: float, b: float, err_a_pct: float, err_b_pct: float) -> list[dict]:
    return [{"measured": a, "error_pct": err_a_pct}, {"measured": b, "error_pct": err_b_pct}]


def test_the_pooled_error_is_the_two_predictions_against_the_two_measurements():
    # A = 1.0, B = 1.2 (spread 0.2 / 1.1); the replays predict 1.1 for both: the pooled error is 2.2 / 2.2 - 1 = 0
    row = pooled_row("held", "ttft_s.mean", _pair(1.0, 1.2, 10.0, 100 * (1.1 / 1.2 - 1)), "strict")
    assert row[2:4] == (1.0, 1.2) and row[4] == pytest.approx(100 * 0.2 / 1.1)
    assert row[5] == pytest.approx(0.0, abs=1e-9)
    assert all(row[7:])


def test_a_third_collection_widens_the_spread_to_what_the_engine_did():
    """Two collections that agree, a third (between the calibration loads) 30 % slower: the spread is the range
    over all three, and the pooled error charges the simulator only for missing all three."""
    runs = [{"measured": 94.0, "error_pct": 32.0}, {"measured": 124.0, "error_pct": 0.0},
            {"measured": 94.5, "error_pct": 31.3}]
    row = pooled_row("held", "engine.decode_s", runs, "guard")
    assert row[2:4] == (94.0, 124.0) and row[4] == pytest.approx(100 * 30.0 / (312.5 / 3))
    sims = 94.0 * 1.32 + 124.0 + 94.5 * 1.313
    assert row[5] == pytest.approx(100 * (sims / 312.5 - 1)) and row[-1]
    assert not pooled_row("held", "engine.decode_s", runs[::2], "guard")[-1]


@pytest.mark.parametrize(("spread", "err", "strict", "guard", "coarse"), [
    (10.0, 8.0, True, True, True),      # within the spread
    (10.0, -12.0, False, True, True),   # beyond the spread, within the guard's 15 % floor
    (10.0, 22.0, False, False, True),   # beyond 2 x 10 %, within the coarse floor of 30 %
    (10.0, -31.0, False, False, False),
    (2.0, 4.9, True, True, True),       # spread below 5 %: the strict bar is 5 %
    (2.0, 6.0, False, True, True),
    (30.0, -55.0, False, True, True),   # guard: 2 x spread
    (30.0, 61.0, False, False, True),   # coarse: 3 x spread
    (30.0, 91.0, False, False, False),
])
def test_the_bar_of_each_mode(spread, err, strict, guard, coarse):
    assert bar_passes(spread, err, "strict") is strict
    assert bar_passes(spread, err, "guard") is guard
    assert bar_passes(spread, err, "coarse") is coarse
    assert bar_passes(spread, err, "report") is True


def test_a_deliberately_wrong_profile_fails_the_default_bar():
    """A measured pair 5 % apart, a simulator 40 % slow on both: the default bar of every gated metric fails it;
    only ``report`` lets it through."""
    for stat in ("tpot_s.p50", "cp_seconds_mean", "engine.decode_s"):
        row = pooled_row("held", stat, _pair(0.050, 0.0525, 40.0, 40.0),
                         next(v for k, v in DEFAULT_BARS.items() if stat.startswith(k)))
        assert row[4] == pytest.approx(100 * 0.0025 / 0.05125) and row[5] == pytest.approx(40.0)
        assert not row[-1], stat
    assert [m for m in ACCURACY_MODES if bar_passes(5.0, 40.0, m)] == ["report"]


def test_each_metric_has_its_default_bar():
    if not __import__("os").environ.get("MASLAT_REAL_VLLM_ACCURACY"):
        assert accuracy_for("ttft_s.p90") == "report" and accuracy_for("tpot_s.mean") == "coarse"
        assert accuracy_for("e2e_s.p50") == "report" and accuracy_for("cp_seconds_p90") == "coarse"
        assert accuracy_for("engine.decode_s") == "guard"


def test_a_missing_figure_fails_every_mode_and_a_bad_mode_is_refused():
    for mode in ACCURACY_MODES:
        assert not bar_passes(10.0, math.nan, mode)
        assert not pooled_row("held", "e2e_s.p90", _pair(1.0, 1.1, math.nan, 3.0), mode)[-1]
    with pytest.raises(ValueError, match="MASLAT_REAL_VLLM_ACCURACY"):
        bar_passes(1.0, 1.0, "lenient")
