"""Step-speed jitter (any family, ``jitter_*`` coefficients): a step model whose speed wanders (a CPU engine's steps), seeded, mean one, correlated."""

import numpy as np
import pytest

import sim
from sim.latency import JitteredStepModel


def _jittered(sigma: float, corr: float = 50.0, seed: int = 0) -> sim.Profile:
    p = sim.load_profile("h100-llama-3.1-8b")
    c = {**p.latency_coefficients, "jitter_sigma": sigma, "jitter_corr_steps": corr, "jitter_seed": seed}
    return p.replace(latency_coefficients=c)


def test_jitter_is_seeded_mean_one_and_correlated():
    base = sim.make_step_time_model(sim.load_profile("h100-llama-3.1-8b"))
    t0 = base.step_ticks(16, 16 * 2000, [])
    draws = [np.array([m.step_ticks(16, 16 * 2000, []) for _ in range(20000)]) / t0
             for m in (JitteredStepModel(base, 0.25, 50.0, seed=3), JitteredStepModel(base, 0.25, 50.0, seed=3))]
    assert np.array_equal(draws[0], draws[1]), "same seed, same steps"
    x = np.log(draws[0])
    assert draws[0].mean() == pytest.approx(1.0, abs=0.05) and x.std() == pytest.approx(0.25, rel=0.15)
    assert np.corrcoef(x[:-1], x[1:])[0, 1] == pytest.approx(np.exp(-1 / 50), abs=0.02)
    assert np.array_equal(np.array([JitteredStepModel(base, 0.0, 10.0).step_ticks(16, 32000, [])]), [t0])
    with pytest.raises(ValueError, match="jitter_sigma"):
        JitteredStepModel(base, -0.1, 10.0)


def test_jitter_widens_tpot_but_keeps_its_mean_and_round_trips(tmp_path):
    """The same workload: TPOT p90/p50 grows with sigma, the mean stays; the profile survives JSON."""

    def tpot(prof):
        world = sim.make_world(sim.PoolSpec(name="p", profile=prof), seed=0)
        sim.Workload(pool="p", arrivals=sim.PoissonArrivals(8.0), lengths=sim.FixedLengths(800, 200),
                     num_requests=300).start(world)
        world.run_until_idle()
        return world.records.to_dataframe()["tpot_s"].to_numpy()

    plain, jit = tpot(sim.load_profile("h100-llama-3.1-8b")), tpot(_jittered(0.3))
    assert jit.mean() == pytest.approx(plain.mean(), rel=0.1)
    assert np.percentile(jit, 90) / np.median(jit) > np.percentile(plain, 90) / np.median(plain) + 0.05
    path = tmp_path / "j.json"
    path.write_text(_jittered(0.3).to_json())
    assert np.array_equal(tpot(sim.load_profile(str(path))), jit)
    bad = _jittered(0.3)
    with pytest.raises(ValueError, match="jitter_corr_steps"):
        sim.make_step_time_model(bad.replace(latency_coefficients={
            k: v for k, v in bad.latency_coefficients.items() if k != "jitter_corr_steps"}))
