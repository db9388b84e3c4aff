"""``maslat bench sim --soak``: the RSS slope it reports, on synthetic samples and on a small real soak."""

import pytest

from maslat.commands.bench_sim import SOAK_FLAT_MB, soak_slope

from .test_cli_sim import last_json, maslat


def test_soak_slope_ignores_the_warmup_and_flags_growth():
    n = 1_000_000
    warm = [(0, 30.0), (100_000, 80.0)]  # the warm-up fills queues and free lists: not counted
    flat = warm + [(f, 90.0 + (f % 3) * 0.1) for f in range(200_000, n + 1, 50_000)]
    d = soak_slope(flat, n)
    assert d["flat"] and abs(d["slope_mb_per_million"]) < 1.0 and 90.0 <= d["rss_after_warmup_mb"] <= 90.2
    leak = warm + [(f, 90.0 + 40.0 * f / n) for f in range(200_000, n + 1, 50_000)]
    d = soak_slope(leak, n)
    assert d["slope_mb_per_million"] == pytest.approx(40.0) and d["growth_mb"] > SOAK_FLAT_MB and not d["flat"]
    assert soak_slope([(0, 1.0), (n, 2.0)], n)["flat"] is False  # too few samples to say


def test_bench_sim_soak_small_json():
    d = last_json(maslat("bench", "sim", "--soak", "3000", "--replicas", "2", "--json"))
    assert d["finished"] == d["soak_requests"] == 3000
    assert len(d["rss_samples"]) >= 10 and all(m > 10 for _, m in d["rss_samples"])
    assert d["rss_samples"][-1][0] == 3000 and d["slope_mb_per_million"] == d["slope_mb_per_million"]
