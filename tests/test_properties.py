"""Hypothesis: random request sequences never break the block pool, never lose a request, and every
engine mode produces the same result."""

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from .helpers import ENGINE_MODES as MODES

request_st = st.tuples(
    st.integers(0, 6),        # arrival step
    st.integers(1, 40),       # prompt tokens
    st.integers(1, 30),       # max tokens
    st.sampled_from([None, 0, 1]),  # shared prefix content id (None = unique prompt)
    st.integers(0, 12),       # shared prefix length
)

config_st = st.fixed_dictionaries({
    "block_size": st.sampled_from([2, 4, 16]),
    "max_num_batched_tokens": st.integers(8, 64),
    "max_num_seqs": st.integers(1, 6),
    "enable_prefix_caching": st.booleans(),
    "scheduler_reserve_full_isl": st.booleans(),
    "long_prefill_token_threshold": st.sampled_from([None, 5]),
})


def _play(mode, cfg, reqs):
    from dataclasses import replace

    from sim import PoolSpec, load_profile, make_world

    bs = cfg["block_size"]
    prof = load_profile("h100-llama-3.1-8b")
    prof = prof.replace(engine=replace(prof.engine, max_model_len=80, num_gpu_blocks=80 // bs + 3, **cfg))
    w = make_world(PoolSpec(name="p", profile=prof), seed=0, check_invariants=True, **MODES[mode])
    events = []

    def submit(i, prompt, out, shared, plen):
        segs = None
        if shared is not None:
            plen = min(plen, prompt)
            segs = ((shared, plen), (100 + i, prompt - plen)) if plen < prompt else ((shared, prompt),)
        events.append(w.submit("p", prompt, out, prompt_segments=segs, request_id=f"r{i}", wait=True))

    for i, (at, prompt, out, shared, plen) in enumerate(reqs):
        w.env.call_at(at * 0.0173, lambda _e, a=(i, prompt, out, shared, plen): submit(*a))
    w.run(until=1.0)
    w.run_until_idle()
    recs = sorted((e.value for e in events), key=lambda r: r.request_id)
    assert len(recs) == len(reqs)
    return [(r.request_id, r.status, r.first_token_s, r.last_token_s, r.num_preemptions, r.num_cached_tokens,
             r.output_tokens) for r in recs], w


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=config_st, reqs=st.lists(request_st, min_size=1, max_size=10))
# found by hypothesis: a decode run was jumped while the preempted head of the queue could be admitted once the
# decodes' new blocks had evicted part of its cached prefix (its hit shrinks, and with it what it needs)
@example(cfg={"block_size": 2, "max_num_batched_tokens": 10, "max_num_seqs": 5, "enable_prefix_caching": True,
              "scheduler_reserve_full_isl": False, "long_prefill_token_threshold": None},
         reqs=[(0, 1, 1, None, 0)] * 4 + [(0, 1, 10, None, 0), (0, 11, 10, None, 0), (0, 21, 8, None, 0),
                                          (0, 5, 7, None, 0), (0, 27, 1, None, 0)])
# found by hypothesis: the same eviction by the blocks of a later step of the run (not the first), which lets
# the head's chunked prefill in part-way through the run
@example(cfg={"block_size": 2, "max_num_batched_tokens": 13, "max_num_seqs": 5, "enable_prefix_caching": True,
              "scheduler_reserve_full_isl": False, "long_prefill_token_threshold": 5},
         reqs=[(0, 1, 1, None, 0)] * 4 + [(0, 19, 9, None, 0), (1, 33, 3, None, 0), (2, 25, 1, 0, 6),
                                          (2, 6, 1, 0, 6)])
def test_random_sequences_conserve_blocks_and_requests_in_every_mode(cfg, reqs):
    ref, w = _play("reference", cfg, reqs)
    assert all(status == "FINISHED_LENGTH_CAPPED" for _, status, *_ in ref)
    wanted = {f"r{i}": r[2] for i, r in enumerate(reqs)}
    assert all(out == wanted[rid] for rid, *_, out in ref)
    kv = w.replicas[0].core.kv
    assert kv.free == kv.num_usable  # everything returned to the pool
    for mode in ("fast", "jump"):
        got, _ = _play(mode, cfg, reqs)
        assert got == ref, mode
