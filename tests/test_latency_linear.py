"""The shape-free step-time model: its basis spans the physics model's, its decode jumps agree with its steps,
and a profile without hardware or model loads, simulates and refuses clearly where it must."""

import json

import numpy as np
import pytest

import sim
from sim.latency_linear import LINEAR_BASIS_NAMES, LinearStepModel


def _as_linear(prof: sim.Profile) -> dict[str, float]:
    """The physics model's per-step, per-token and per-sequence costs as shape-free coefficients (exact when the
    physics model's pf_kv is 0: its per-cached-token part has no shape-free term)."""
    m = sim.PhysicsStepModel.from_profile(prof)
    c = prof.latency_coefficients
    assert c["pf_kv"] == 0.0
    step_s = m.step_seconds(0, 0, ())
    return {"step_s": step_s, "dc_seq_s": m.step_seconds(1, 0, ()) - step_s,
            "dc_ctx_s": m.step_seconds(0, 1, ()) - step_s, "pf_token_s": m.prefill_seconds(((1, 0),)) - m._pf_q
            - m._pf_1, "pf_attn_s": m._pf_q, "chunk_s": m._pf_1}


@pytest.mark.parametrize("name", sim.list_profiles())
def test_linear_basis_reproduces_every_embedded_physics_profile(name):
    prof = sim.load_profile(name)
    phys = sim.make_step_time_model(prof)
    lin = LinearStepModel(_as_linear(prof))
    rng = np.random.default_rng(0)
    for _ in range(200):
        n_dec = int(rng.integers(0, 300))
        ctx = int(n_dec * rng.integers(1, 4000))
        chunks = tuple((int(rng.integers(1, 4096)), int(rng.integers(0, 8000))) for _ in range(rng.integers(0, 3)))
        if n_dec == 0 and not chunks:
            continue
        assert lin.step_seconds(n_dec, ctx, chunks) == pytest.approx(phys.step_seconds(n_dec, ctx, chunks), rel=1e-9)
        assert lin.step_ticks(n_dec, ctx, chunks) == pytest.approx(phys.step_ticks(n_dec, ctx, chunks), rel=1e-9)


def test_decode_jumps_agree_with_step_ticks():
    lin = LinearStepModel({"step_s": 0.012, "dc_seq_s": 3e-5, "dc_ctx_s": 2e-8, "pf_token_s": 6e-5})
    a, b, g = lin.linear_decode
    for n, ctx in ((1, 10), (64, 64 * 900), (256, 256 * 3000)):
        assert lin.step_ticks(n, ctx, ()) == a + b * n + g * ctx
    assert len(lin.basis(3, 30, ((5, 2),))) == len(LINEAR_BASIS_NAMES)
    assert lin.basis(3, 30, ((5, 2),)) == (1.0, 5.0, 25.0 + 20.0, 1.0, 3.0, 30.0)


@pytest.mark.parametrize("bad,match", [({"step_s": -1.0}, "non-negative"), ({"weight": 1.0}, "unknown coefficient"),
                                       ({}, "every coefficient is 0")])
def test_bad_coefficients_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        LinearStepModel(bad)


def test_shape_free_profile_loads_and_serves_without_hardware_or_model(tmp_path):
    base = sim.load_profile("rtx4090-llama-3.1-8b")
    prof = base.replace(hardware=None, model=None, latency_model="linear", latency_coefficients=_as_linear(base))
    p = tmp_path / "p.json"
    p.write_text(prof.to_json())
    data = json.loads(p.read_text())
    assert "hardware" not in data and "model" not in data
    back = sim.load_profile(p)
    assert back.hardware is None and back.model is None and back.latency_coefficients == prof.latency_coefficients
    done = []
    for profile in (base, back):  # the same workload under the physics profile and its shape-free equivalent
        w = sim.make_world(sim.PoolSpec(name="p", profile=profile), seed=3)
        sim.Workload(pool="p", arrivals=sim.PoissonArrivals(8.0), lengths=sim.LognormalLengths(800, 200),
                     num_requests=120).start(w)
        w.run_until_idle()
        done.append(w.records.to_dataframe().sort_values("request_id")[["first_token_s", "last_token_s"]].to_numpy())
    np.testing.assert_allclose(done[0], done[1], rtol=1e-9, atol=1e-9)


def test_physics_profile_without_hardware_names_the_missing_section(tmp_path):
    data = json.loads(sim.load_profile("h100-llama-3.1-8b").to_json())
    del data["hardware"]
    with pytest.raises(sim.ProfileError, match="missing section 'hardware'.*'linear'"):
        sim.profile_from_dict(data, "x.json")
    with pytest.raises(ValueError, match="needs the profile's model.*'linear'"):
        sim.load_profile("h100-llama-3.1-8b").replace(model=None)
