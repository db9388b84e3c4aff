"""Speed work on the engine may not change a single result: fixed scenarios" per-request outputs, step counts,
time series and histograms are pinned by a digest computed on the engine before the speed-ups (issue 18),
in all three engine modes (reference, fast, jump).

If a change to the model itself (not its speed) is intended, recompute the digests on the new code and say why
in the commit; a speed change must leave them as they are.
"""

import hashlib
from dataclasses import replace

import numpy as np
import pytest

from sim import GammaArrivals, LognormalLengths, PoissonArrivals, PoolSpec, Workload, load_profile, make_world

from .helpers import ENGINE_MODES as MODES


def _digest(world, sums: bool) -> str:
    """sha256 over every record column (in record order), the time series, the engine counters and histogram
    counts; with ``sums`` also the histograms" float sums (the modes add the same ITLs in different orders, so
    those are pinned per mode)."""
    h = hashlib.sha256()
    cols = world.records.columns()
    for k in sorted(cols):
        h.update(k.encode())
        h.update(np.ascontiguousarray(cols[k]).tobytes())
    h.update("|".join(world.records.request_id).encode())
    h.update("|".join(world.records.status).encode())
    ts = world.timeseries.to_dataframe()
    for c in ts.columns:
        h.update(c.encode())
        h.update(np.ascontiguousarray(ts[c].to_numpy()).tobytes())
    for rep in world.replicas:
        c = rep.core
        h.update(repr((c.num_steps, c.num_preemptions, c.prompt_tokens, c.generation_tokens, c.prefix_cache_queries,
                       c.prefix_cache_hits, c.num_finished, c.num_aborted, c.ttft_ema_s, c.kv.free, c.t)).encode())
        for hist in (c.itl, c.ttft, c.iteration_tokens):
            h.update(repr((list(hist.counts), hist.count, hist.sum if sums else None)).encode())
    return h.hexdigest()


def _busy(mode):
    """4 replicas round-robin at a high load: queues, chunked prefills, truncated decode runs."""
    w = make_world(PoolSpec(name="p", profile=load_profile("h100-llama-3.1-8b"), replicas=4), seed=11, **MODES[mode])
    Workload(pool="p", arrivals=PoissonArrivals(70.0), lengths=LognormalLengths(1000, 250), num_requests=2500,
             name="bench").start(w)
    w.run_until_idle()
    return w


def _pressure(mode):
    """A small cache under bursty arrivals: preemptions, the reference fallback, least-KV routing."""
    prof = load_profile("h100-llama-3.1-8b")
    prof = prof.replace(engine=replace(prof.engine, num_gpu_blocks=900, max_model_len=8192, max_num_seqs=64,
                                       max_num_batched_tokens=2048))
    w = make_world(PoolSpec(name="p", profile=prof, replicas=2, router="least_kv"), seed=5, **MODES[mode])
    Workload(pool="p", arrivals=GammaArrivals(25.0, cv=3.0), lengths=LognormalLengths(1200, 400, max_output=1500),
             num_requests=600).start(w)
    w.run_until_idle()
    assert sum(r.core.num_preemptions for r in w.replicas) > 0
    return w


def _shared_prefixes_and_aborts(mode):
    """Prompts sharing system prefixes (prefix-cache hits), least-outstanding routing, clients that go away."""
    w = make_world(PoolSpec(name="p", profile=load_profile("h100-llama-3.1-8b"), replicas=2,
                            router="least_outstanding"), seed=2, **MODES[mode])
    rng = np.random.default_rng(7)
    gaps = rng.exponential(1 / 30.0, 800).cumsum()
    systems = rng.integers(0, 4, 800)
    own = rng.integers(20, 900, 800)
    outs = rng.integers(1, 600, 800)
    abort_after = rng.uniform(0.05, 3.0, 800)
    aborting = rng.random(800) < 0.1

    def arrive(i):
        segs = ((100 + int(systems[i]), 512), (10_000 + i, int(own[i])))
        req = w.open_request("p", 512 + int(own[i]), int(outs[i]), prompt_segments=segs)
        if aborting[i]:
            w.env.call_at(w.now + float(abort_after[i]), lambda _e: w.abort(req))

    for i, t in enumerate(gaps):
        w.env.call_at(float(t), lambda _e, i=i: arrive(i))
    w.run(until=float(gaps[-1]) + 1e-9)
    w.run_until_idle()
    assert w.num_aborted > 0 and sum(r.core.prefix_cache_hits for r in w.replicas) > 0
    return w


def _long_outputs(mode):
    """Long decodes at a light load: runs of hundreds of jumped steps, cut by arrivals."""
    w = make_world(PoolSpec(name="p", profile=load_profile("h100-llama-3.1-70b-tp4"), replicas=2), seed=1,
                   **MODES[mode])
    Workload(pool="p", arrivals=PoissonArrivals(1.5), lengths=LognormalLengths(512, 1500, sigma=0.3),
             num_requests=60).start(w)
    w.run_until_idle()
    return w


SCENARIOS = {"busy": _busy, "pressure": _pressure, "shared_prefixes_and_aborts": _shared_prefixes_and_aborts,
             "long_outputs": _long_outputs}
# computed on the engine as of commit a6656a8 (before the issue-18 speed work): (common to the three modes,
# {mode: with the histogram sums})
PINNED = {
    "busy": ("c5739e3022f5e6e13941d79bb31cb10c406a7fbb685fb75bfd1f8f366088dd64",
        {"jump": "0d37ff9182c6bfe20f15aedf03c804c20961cd830c29e122b0017c7844f5ea0d",
         "fast": "993025209e72f9c11362ac91c9ca427683fd6aaa59e46fa4ec3ed1e5e039cabd",
         "reference": "b264806068a0161198025219c00e816361eba2adced90485e8940db5e61eeff2"}),
    "pressure": ("9e6536c735541018435b79c8ca7bbf2198c18eaa409f095c6213dbfe626f0e33",
        {"jump": "0bf47fb7d43ba076d78d043ec6065f116f336ef3ce9a70c9c525c0d4d2abec1e",
         "fast": "3175cb2ec2c5e553b6b61c0342237e896625f2d21a1349449c86df53cebd80db",
         "reference": "aebdc9a9c2e3e2689838ed3d857bd1b67fbd52848aa856fa83ea2cf2f674b314"}),
    "shared_prefixes_and_aborts": ("93cb407dd5c00bae8b640d86a1d11934bd5766d75efc662ba5caa6d38c0337d9",
        {"jump": "655cdb1fe6668bbcbbf8ac5d5a3a24169acf8c419ee1916b7bf9a1536a01b1d0",
         "fast": "fc6039c4404fcd003eb44a553b7400fb9781ffc08c99fc2221b74f518c739081",
         "reference": "e1ac46e9b86912ae76c06561d54b6d6d152f14c23238f45619cbe7260143b170"}),
    "long_outputs": ("8b0f65624c5ce2edc62237a75faf8ff3a4e406675646636157fe29b8d38f8d70",
        {"jump": "8ca1768abe9fb501c606f61e498a8f016cd06445688521e504ff15f1ae2b8b65",
         "fast": "255dccf8a5f3ce9d7b6292ab18e43db33f603ced41bc02edb995ed0008646503",
         "reference": "40feb6258e76491053e6ac6f2a00b156d826b4971b082c31838271f0b0dae94a"}),
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_results_match_the_pinned_digest(scenario, mode):
    world = SCENARIOS[scenario](mode)
    common, per_mode = PINNED[scenario]
    assert _digest(world, False) == common, "results differ from the engine before the speed work"
    assert _digest(world, True) == per_mode[mode], "histogram sums differ from the engine before the speed work"
