"""``EngineConfig.vllm_version``: the scheduler and KV-cache rules that changed after 0.19.0, derived by hand
(block_size 4) from the two releases' ``BlockPool.free_blocks`` and ``Scheduler.schedule``; and duplicate
copies of a cached block, which every release keeps. ``tests/test_conformance_vllm.py`` checks the same
against the real schedulers on random streams."""

import pytest

from sim import EngineConfig
from sim.config import VLLM_BEHAVIOURS, parse_vllm_version

from .helpers import Harness

OLD, NEW = "0.19.0", "0.32.0"


def cfg(**kw):
    base = dict(block_size=4, num_gpu_blocks=5, max_num_batched_tokens=16, max_num_seqs=4, max_model_len=16,
                enable_prefix_caching=True)
    base.update(kw)
    return base


def _serve(h: Harness, rid: str, segments, max_tokens: int):
    r = h.request(rid, sum(n for _, n in segments), max_tokens, segments=segments)
    h.add(r)
    h.run()
    return r


def test_versions_parse_and_bad_ones_say_what_to_write():
    assert parse_vllm_version("0.19.0") == (0, 19, 0)
    assert parse_vllm_version("0.11.2.post2") == (0, 11, 2) and parse_vllm_version("v0.32") == (0, 32, 0)
    assert parse_vllm_version("0.32.0+cpu") == (0, 32, 0)
    with pytest.raises(ValueError, match="vllm_version must look like '0.19.0'"):
        EngineConfig(num_gpu_blocks=5, max_model_len=16, vllm_version="latest")
    c = EngineConfig(num_gpu_blocks=5, max_model_len=16)
    assert c.vllm_version == OLD and not any(c.has_behaviour(b) for b in VLLM_BEHAVIOURS)
    assert all(EngineConfig(num_gpu_blocks=5, max_model_len=16, vllm_version=NEW).has_behaviour(b)
               for b in VLLM_BEHAVIOURS)


@pytest.mark.parametrize("mode", ["reference", "fast", "jump"])
@pytest.mark.parametrize(("version", "hit_tokens"), [(OLD, 4), ("0.27.1", 4), ("0.28.0", 8), (NEW, 8)])
def test_partial_block_reused_first_from_0_28(version, hit_tokens, mode):
    h = Harness(mode=mode, **cfg(vllm_version=version))
    # A caches 3 blocks of content 1 and frees them tail first: queue [free, A2, A1, A0]
    _serve(h, "A", ((1, 12),), 1)
    # B (5 tokens) takes the free block and evicts A2; it frees its partial block 1 and its cached block 0.
    # 0.19: both to the back [A1, A0, B1, B0]; >= 0.28: the partial one (no hash in vLLM) to the front
    # [B1, A1, A0, B0]
    _serve(h, "B", ((2, 5),), 1)
    # C (one block) evicts A1 under 0.19 and takes B's partial block under >= 0.28
    _serve(h, "C", ((3, 3),), 1)
    d = _serve(h, "D", ((1, 8), (4, 1)), 1)
    assert d.num_cached_tokens == hit_tokens


@pytest.mark.parametrize("mode", ["reference", "fast", "jump"])
@pytest.mark.parametrize(("version", "first_chunk"), [(OLD, 4), ("0.30.0", 4), ("0.31.0", 12), (NEW, 12)])
def test_lone_request_prefill_uncapped_from_0_31(version, first_chunk, mode):
    h = Harness(mode=mode, **cfg(vllm_version=version, long_prefill_token_threshold=4))
    a = h.request("A", 12, 2, segments=((1, 12),))
    h.add(a)
    h.step()
    assert a.num_computed_tokens == first_chunk
    # with a second request in the scheduler every release caps both
    h2 = Harness(mode=mode, **cfg(vllm_version=version, long_prefill_token_threshold=4, num_gpu_blocks=9,
                                  max_model_len=32))
    a, b = h2.request("A", 12, 2, segments=((1, 12),)), h2.request("B", 12, 2, segments=((2, 12),))
    h2.add(a)
    h2.add(b)
    h2.step()
    assert (a.num_computed_tokens, b.num_computed_tokens) == (4, 4)


@pytest.mark.parametrize("mode", ["reference", "fast", "jump"])
@pytest.mark.parametrize("version", [OLD, NEW])
def test_duplicate_copy_serves_hits_once_the_first_copy_is_evicted(version, mode):
    h = Harness(mode=mode, **cfg(vllm_version=version))
    _serve(h, "A", ((1, 4),), 1)  # caches content 1's block 0 (copy A); queue [free x3, A0]
    # B has the same 4-token prompt: the hit is capped at 3 tokens (the last token is recomputed), so B computes
    # block 0 again and registers a second copy under the same hash (vLLM does not de-duplicate)
    b = _serve(h, "B", ((1, 4),), 2)
    assert b.num_cached_tokens == 0 and h.core.kv.num_cached_blocks == 1
    # C (2 blocks) takes the never-used block and evicts copy A (under >= 0.28 B's partial block goes first
    # instead, and copy A survives): either way content 1's block 0 is still cached, now or later by copy B
    _serve(h, "C", ((2, 8),), 1)
    d = _serve(h, "D", ((1, 4), (3, 4)), 1)
    assert d.num_cached_tokens == 4
    h.core.check_invariants()


def test_calibration_takes_the_release_from_meta_json(traces_dir, tmp_path):
    """``maslat calibrate`` mirrors the scheduler of the release that served the run (``meta.vllm_version``)."""
    import json
    import shutil

    from traces.calibrate import calibrate_run
    from traces.runs import read_run

    run = tmp_path / "rtxpro6000-llama-3.1-8b-v032"
    shutil.copytree(traces_dir / "vllm" / "rtxpro6000-llama-3.1-8b", run)
    meta = json.loads((run / "meta.json").read_text())
    assert meta["vllm_version"] == OLD
    meta["vllm_version"] = NEW
    (run / "meta.json").write_text(json.dumps(meta))
    prof = calibrate_run(read_run(run)).profile
    assert prof.engine.vllm_version == NEW and "meta.vllm_version" in prof.sources["engine.vllm_version"]
    meta["vllm_version"] = "nightly"
    (run / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="vllm_version 'nightly' is not a vLLM release"):
        calibrate_run(read_run(run))
