"""The fast path and the decode-run jumps produce exactly what the literal vLLM algorithm produces."""

import pandas as pd
import pytest

from sim import (
    FixedLengths,
    GammaArrivals,
    LognormalLengths,
    PoissonArrivals,
    PoolSpec,
    Workload,
    load_profile,
    make_world,
)

from .helpers import ENGINE_MODES as MODES


def _run(mode, profile, n, arrivals, lengths, replicas=2, router="least_outstanding", seed=3):
    w = make_world(PoolSpec(name="m", profile=profile, replicas=replicas, router=router), seed=seed,
                   check_invariants=True, **MODES[mode])
    Workload(pool="m", arrivals=arrivals, lengths=lengths, num_requests=n).start(w)
    w.run_until_idle()
    return w


def _same(worlds):
    dfs = [w.records.to_dataframe() for w in worlds]
    for df in dfs[1:]:
        pd.testing.assert_frame_equal(dfs[0], df)
    ts = [w.timeseries.to_dataframe() for w in worlds]
    for t in ts[1:]:
        pd.testing.assert_frame_equal(ts[0], t)
    steps = [sum(r.core.num_steps for r in w.replicas) for w in worlds]
    assert len(set(steps)) == 1, steps


@pytest.mark.parametrize("caching", [True, False])
def test_modes_identical_h100(caching):
    from dataclasses import replace

    prof = load_profile("h100-llama-3.1-8b")
    prof = prof.replace(engine=replace(prof.engine, enable_prefix_caching=caching))
    worlds = [_run(m, prof, 300, PoissonArrivals(20.0), LognormalLengths(900, 250)) for m in MODES]
    _same(worlds)
    assert worlds[0].num_finished == 300


def test_modes_identical_under_kv_pressure_with_preemption():
    """A small cache forces preemptions; the reference algorithm handles those steps in every mode."""
    from dataclasses import replace

    prof = load_profile("h100-llama-3.1-8b")
    prof = prof.replace(engine=replace(prof.engine, num_gpu_blocks=700, max_model_len=8192, max_num_seqs=64,
                                       max_num_batched_tokens=2048))
    worlds = [_run(m, prof, 250, GammaArrivals(30.0, cv=3.0), LognormalLengths(1200, 400, max_output=1500),
                   replicas=1) for m in MODES]
    _same(worlds)
    assert sum(r.core.num_preemptions for r in worlds[0].replicas) > 0


def test_modes_identical_fixed_lengths_deterministic_ties():
    prof = load_profile("h100-llama-3.1-70b-tp4")
    worlds = [_run(m, prof, 120, PoissonArrivals(8.0), FixedLengths(512, 128), replicas=3, router="least_kv")
              for m in MODES]
    _same(worlds)


def test_jumps_replace_decode_steps_and_say_so():
    """Long outputs at a light load: nearly every step lies in a jumped run; the steps and the records are those
    of the step-by-step engine, and the counters add up (one boundary per single step or run)."""
    prof = load_profile("h100-llama-3.1-8b")
    jump, fast = (_run(m, prof, 40, PoissonArrivals(0.5), FixedLengths(300, 600), replicas=1) for m in ("jump", "fast"))
    _same([jump, fast])
    c, f = jump.replicas[0].core, fast.replicas[0].core
    assert f.num_jumps == f.num_jumped_steps == 0
    assert c.num_jumped_steps > 0.9 * c.num_steps and c.num_jumped_steps / c.num_jumps > 20
    assert c.num_truncated_jumps <= c.num_jumps
    boundaries = c.num_steps - c.num_jumped_steps + c.num_jumps
    assert boundaries < 0.1 * f.num_steps
