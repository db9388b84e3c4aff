"""Invalid configurations and profiles fail with messages that say what to change."""

import json

import pytest

from sim import EngineConfig, PoolSpec, ProfileError, list_profiles, load_profile, make_world
from sim.latency import PhysicsCoefficients


def test_embedded_profiles_load_and_cite_sources():
    names = list_profiles()
    assert {"h100-llama-3.1-8b", "h100-llama-3.1-70b-tp4"} <= set(names)
    for n in names:
        p = load_profile(n)
        assert p.name == n
        assert p.sources, f"{n} names no sources"
        assert "engine.num_gpu_blocks" in p.sources or p.derived_from, f"{n}: where does num_gpu_blocks come from?"


def test_h100_profiles_are_physically_plausible():
    """Batch-1 decode sits above the weight-read roofline bound and within published ranges."""
    from sim import make_step_time_model

    for name, bound_ms, lo_ms, hi_ms in (("h100-llama-3.1-8b", 4.8, 5, 15), ("h100-llama-3.1-70b-tp4", 10.5, 10, 40)):
        m = make_step_time_model(load_profile(name))
        t_ms = m.step_seconds(1, 1000, []) * 1e3
        assert bound_ms < t_ms and lo_ms <= t_ms <= hi_ms, (name, t_ms)
        # a 1,000-token prefill is compute-bound: ~ 15 TFLOP at 45 % MFU on the 8B is ~34 ms (+ weights)
    m8 = make_step_time_model(load_profile("h100-llama-3.1-8b"))
    assert 30 <= m8.step_seconds(0, 0, [(1000, 0)]) * 1e3 <= 60


def test_engine_config_errors_say_what_to_change():
    with pytest.raises(ValueError, match="lower max_model_len to at most 160"):
        EngineConfig(num_gpu_blocks=11, max_model_len=1000)
    with pytest.raises(ValueError, match="max_num_seqs must be a positive integer"):
        EngineConfig(num_gpu_blocks=100, max_model_len=16, max_num_seqs=0)
    with pytest.raises(ValueError, match="long_prefill_token_threshold"):
        EngineConfig(num_gpu_blocks=100, max_model_len=16, long_prefill_token_threshold=0)
    with pytest.raises(ValueError, match="non-negative"):
        PhysicsCoefficients(dc_kv=-1.0)


def _write(tmp_path, data, name="bad.json"):
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else json.dumps(data))
    return p


def test_profile_errors_name_file_and_field(tmp_path):
    good = load_profile("h100-llama-3.1-8b").to_dict()
    p = _write(tmp_path, "{not json")
    with pytest.raises(ProfileError, match=r"bad.json: line 1 column 2: invalid JSON"):
        load_profile(p)
    d = json.loads(json.dumps(good))
    d["engine"]["num_gpu_blocks"] = 100
    with pytest.raises(ProfileError, match=r"bad.json: section 'engine': max_model_len=131072"):
        load_profile(_write(tmp_path, d))
    d = json.loads(json.dumps(good))
    d["engine"]["max_num_seq"] = 3
    with pytest.raises(ProfileError, match=r"unknown field\(s\) \['max_num_seq'\] in 'engine'"):
        load_profile(_write(tmp_path, d))
    d = json.loads(json.dumps(good))
    d["latency"]["coefficients"]["weights"] = 1.0
    with pytest.raises(ProfileError, match=r"latency: unknown latency coefficient\(s\) \['weights'\]"):
        load_profile(_write(tmp_path, d))
    d = json.loads(json.dumps(good))
    del d["model"]
    with pytest.raises(ProfileError, match="missing section 'model'"):
        load_profile(_write(tmp_path, d))
    with pytest.raises(ProfileError, match="unknown profile 'nope'"):
        load_profile("nope")


def test_profile_round_trips_through_json(tmp_path):
    p = load_profile("h100-llama-3.1-70b-tp4")
    q = load_profile(_write(tmp_path, p.to_json(), "p.json"))
    assert q == p


def test_bad_pool_and_router():
    prof = load_profile("h100-llama-3.1-8b")
    with pytest.raises(ValueError, match="unknown router 'fastest'"):
        PoolSpec(name="p", profile=prof, router="fastest")
    with pytest.raises(ValueError, match="replicas must be an integer >= 1"):
        PoolSpec(name="p", profile=prof, replicas=0)
    w = make_world(PoolSpec(name="p", profile=prof))
    with pytest.raises(ValueError, match="unknown pool 'q'"):
        w.submit("q", 10, 10)
    with pytest.raises(ValueError, match="prompt_segments"):
        w.submit("p", 10, 10, prompt_segments=((0, 5),))
