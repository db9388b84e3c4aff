"""Hand-derived vLLM v1 behaviour, step by step (block_size 4 keeps the arithmetic readable).

Each expected trace below was worked out from ``Scheduler.schedule`` / ``KVCacheManager.allocate_slots``
by hand, not by running the simulator.
"""

import pytest

from sim import RequestStatus

from .helpers import Harness


def cfg(**kw):
    base = dict(block_size=4, num_gpu_blocks=9, max_num_batched_tokens=16, max_num_seqs=4, max_model_len=32,
                enable_prefix_caching=False)
    base.update(kw)
    return base


def test_recompute_preemption_lifo_and_no_admission_in_that_step():
    h = Harness(**cfg())  # 8 usable blocks = 32 tokens
    a, b = h.request("A", 8, 10), h.request("B", 8, 10)
    h.add(a)
    h.add(b)
    for _ in range(12):
        h.step()
    t = h.trace
    assert t[0][1:] == ([("A", 8), ("B", 8)], [])            # both prompts in one step (2 blocks each)
    for k in range(1, 9):                                     # steps 2-9: two decodes, no preemption
        assert t[k][1:] == ([("A", 1), ("B", 1)], []), k
    # step 10: A needs its 5th block, none free -> preempt the last admitted (B); no waiting pass
    assert t[9][1:] == ([("A", 1)], ["B"])
    assert a.status == RequestStatus.FINISHED_LENGTH_CAPPED and a.last_token_ts == pytest.approx(0.10)
    # step 11: B re-prefills prompt + its 9 outputs (17 tokens) under the 16-token budget; step 12 the rest
    assert t[10][1:] == ([("B", 16)], [])
    assert t[11][1:] == ([("B", 1)], [])
    assert b.status == RequestStatus.FINISHED_LENGTH_CAPPED
    assert b.num_preemptions == 1 and b.num_output_tokens == 10
    assert b.first_token_ts == pytest.approx(0.01) and b.last_token_ts == pytest.approx(0.12)
    assert h.core.num_preemptions == 1


def test_self_preemption_stops_running_pass():
    # 4 usable blocks. After step 1, A (2 blocks) and B (1 block) leave one free; in step 2 A takes it and B,
    # the last admitted, cannot grow: it preempts itself and the running pass ends.
    h = Harness(**cfg(num_gpu_blocks=5, max_model_len=16))
    a, b = h.request("A", 8, 8), h.request("B", 4, 8)
    h.add(a)
    h.add(b)
    h.step()
    h.step()
    assert h.trace[1][1:] == ([("A", 1)], ["B"])
    assert b.status == RequestStatus.PREEMPTED and list(h.core.waiting) == [b]
    for _ in range(6):  # steps 3-8: B's whole sequence (5 tokens = 2 blocks) does not fit until A is done
        h.step()
    assert all(step[1] == [("A", 1)] for step in h.trace[2:8])
    assert a.status == RequestStatus.FINISHED_LENGTH_CAPPED
    h.step()
    assert h.trace[8][1] == [("B", 5)]
    h.run()
    assert b.num_output_tokens == 8


def test_head_of_line_blocking_and_full_isl_gate():
    # C's whole prompt (20 tokens = 5 blocks) does not fit next to A and B, so C waits and D (tiny) waits
    # behind it: the waiting pass never skips its head.
    h = Harness(**cfg())
    a, b = h.request("A", 8, 2), h.request("B", 8, 2)
    c, d = h.request("C", 20, 2), h.request("D", 2, 2)
    for r in (a, b, c, d):
        h.add(r)
    h.step()
    assert h.trace[0][1:] == ([("A", 8), ("B", 8)], [])   # budget 16 used up: C is not even tried
    h.step()
    # A and B decode (2 tokens), C needs 5 blocks for its full sequence but only 4 are free -> blocked, D too
    assert h.trace[1][1:] == ([("A", 1), ("B", 1)], [])
    assert [r.request_id for r in h.core.waiting] == ["C", "D"]
    h.step()  # A and B finished at the end of step 2; now C (5 blocks) and D (1 block) fit
    assert h.trace[2][1:] == ([("C", 16)], [])          # C takes the whole budget (chunked prefill)
    h.run()
    assert all(r.status == RequestStatus.FINISHED_LENGTH_CAPPED for r in (a, b, c, d))


@pytest.mark.parametrize("gate", [True, False])
def test_full_isl_gate(gate):
    # A decodes; C (28 tokens = 7 blocks) arrives. After A's decode takes its 3rd block, 5 blocks are free:
    # C's first chunk (budget 16 - 1 = 15 tokens = 4 blocks) fits, its whole sequence does not.
    h = Harness(**cfg(scheduler_reserve_full_isl=gate))
    a = h.request("A", 8, 3)
    h.add(a)
    h.step()
    h.add(h.request("C", 28, 2))
    h.step()
    assert h.trace[1][1:] == (([("A", 1)] if gate else [("A", 1), ("C", 15)]), [])


def test_prefix_cache_hit_eviction_order_and_last_token_recompute():
    h = Harness(**cfg(enable_prefix_caching=True))  # 8 usable blocks
    shared = (0, 8)
    a = h.request("A", 12, 2, segments=(shared, (1, 4)))
    h.add(a)
    h.run()
    kv = h.core.kv
    # A held 4 blocks: 2 of the shared prefix, 1 of its own prompt tail, 1 partial (output); all free again,
    # and freeing never lowers the free count: evictable cached blocks count as free
    assert kv.free == 8 and kv.usage == 0.0
    assert kv.num_cached_blocks == 3
    # B shares the 8-token prefix: 2 blocks hit, only its own 4 tokens are computed
    b = h.request("B", 12, 2, segments=(shared, (2, 4)))
    h.add(b)
    h.step()
    assert h.trace[-1][1] == [("B", 4)] and b.num_cached_tokens == 8
    h.run()
    # an identical prompt hits at most num_tokens - 1 tokens: the last block is recomputed
    a2 = h.request("A2", 12, 2, segments=(shared, (1, 4)))
    h.add(a2)
    h.step()
    assert a2.num_cached_tokens == 8 and h.trace[-1][1] == [("A2", 4)]
    h.run()
    assert h.core.prefix_cache_hits == 16 and h.core.prefix_cache_queries == 36


def test_lru_eviction_is_tail_first_within_a_request():
    h = Harness(**cfg(enable_prefix_caching=True))
    shared = (0, 12)  # 3 full blocks of shared content
    a = h.request("A", 12, 1, segments=(shared,))
    h.add(a)
    h.run()
    kv = h.core.kv
    assert kv.num_cached_blocks == 3  # blocks 0,1,2 of the shared node, all evictable
    # C (unique, 24 tokens = 6 blocks) must evict: 5 never-used blocks first, then A's LAST block (index 2).
    # Its first chunk (16 tokens) takes 4 never-used blocks; the second chunk (8 tokens) the 5th and block 2.
    c = h.request("C", 24, 1)
    h.add(c)
    h.step()
    assert kv.num_evicted_blocks == 0
    h.step()
    assert kv.num_evicted_blocks == 1 and kv.num_cached_blocks == 2
    h.run()
    # the surviving chain is blocks 0 and 1: a new request sharing the prefix hits 8 tokens, not 12
    d = h.request("D", 16, 1, segments=(shared, (5, 4)))
    h.add(d)
    h.step()
    assert d.num_cached_tokens == 8


def test_preempted_request_hits_its_own_blocks_on_resume():
    h = Harness(**cfg(enable_prefix_caching=True))
    a, b = h.request("A", 8, 10), h.request("B", 8, 10)
    h.add(a)
    h.add(b)
    for _ in range(10):
        h.step()
    assert h.trace[9][2] == ["B"]
    # B had 4 full blocks (16 computed tokens) when preempted; they join the free queue tail-first (output
    # blocks 3, 2, then prompt blocks 1, 0), so A's allocation in the same step evicts output block 3.
    # On resume B hits blocks 0-2 (12 tokens) and recomputes 5 of its 17.
    h.step()
    assert h.trace[10][1] == [("B", 5)] and b.num_cached_tokens == 0  # first-schedule hit was 0
    assert b.status == RequestStatus.FINISHED_LENGTH_CAPPED and b.last_token_ts == pytest.approx(0.11)


@pytest.mark.parametrize("mode", ["fast", "jump"])
def test_fast_and_jump_modes_match_reference_on_scenarios(mode):
    def play(m):
        h = Harness(mode=m, **cfg(enable_prefix_caching=True))
        reqs = [h.request(f"R{i}", 6 + 3 * i, 9 + (i % 3), segments=((0, 4), (i, 2 + 3 * i))) for i in range(5)]
        for r in reqs:
            h.add(r)
        h.run()
        return [(r.request_id, r.first_token_ts, r.last_token_ts, r.num_preemptions, r.num_cached_tokens) for r in reqs]

    assert play(mode) == play("reference")
