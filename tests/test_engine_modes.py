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

MODES = {"jump": dict(jumps=True), "fast": dict(jumps=False), "reference": dict(force_reference=True)}


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
