"""vLLM's data-parallel load balancing (``sim.dplb``): hand-computed routes from each release's rule."""

from dataclasses import replace

import pytest

import sim
from sim.dplb import DP_RULES, VllmDPRouter, dp_router_name


def _world(router: str, blocks: int, **options):
    base = sim.load_profile("h100-llama-3.1-8b")
    prof = base.replace(engine=replace(base.engine, max_num_seqs=1, num_gpu_blocks=blocks, max_model_len=1500),
                        overheads=sim.Overheads())
    pool = sim.PoolSpec(name="p", profile=prof, replicas=2, router=router, router_options=tuple(options.items()))
    return sim.make_world(pool, seed=0, sample_interval_s=None)


def _route(world, batches):
    """Submit ``(time_s, [(prompt, max_tokens), ...])`` batches; return the engine of each request in order."""
    reqs = []
    for t, batch in batches:
        world.env.call_at(t, lambda _e, b=batch: reqs.extend(world.open_request("p", p, n) for p, n in b))
    world.run(until=max(t for t, _ in batches) + 0.01)
    return [r.replica for r in reqs]


@pytest.mark.parametrize("blocks, expected", [(101, [0, 1, 0, 1, 1]), (1001, [0, 1, 0, 1, 0])])
def test_current_rule_inflight_and_kv_penalty(blocks, expected):
    """vLLM >= 0.27 (``get_core_engine_for_request``), max_num_seqs 1 so the third request waits on engine 0.

    t=0, a burst of A(1000 tok), B(100 tok), C(1000 tok); nothing published yet (lb_engines all 0):
      A: scan 0,1: scores max(0, 0) = 0 both -> engine 0 (first scanned); start -> 1
      B: scan 1,0: engine 1 inflight 0 -> 0; engine 0 inflight 1 -> 1 -> engine 1; start -> 0
      C: scan 0,1: max(1, 0+1 local waiting) = 1 both -> tie -> engine 0; start -> 1
    t=1 s, after many 0.1 s snapshots: engine 0 (waiting 1, running 1, KV of A's 1000+ tokens), engine 1
    (0, 1, KV of B's 100+ tokens):
      D: scan 1,0: engine 1 max(1, 1) = 1; engine 0 max(2, 2) + penalty -> engine 1; start -> 0
      E: scan 0,1: engine 0 max(2, 2) + 1 x 6 x max(0, kv0 - 0.5); engine 1 max(2, 1 + 1) = 2 (no waiting in
         its snapshot; the local +1 counts as waiting: + 1 x 6 x max(0, kv1 - 0.5) = 0 at low KV)
         - 100 usable blocks: kv0 = 70/100 -> 3.2 > 2 -> engine 1
         - 1000 usable blocks: kv0 = 0.07, no penalty -> tie at 2 -> engine 0 (first scanned)
    """
    w = _world("vllm_dp", blocks)
    assert _route(w, [(0.0, [(1000, 400), (100, 400), (1000, 400)]), (1.0, [(100, 10), (100, 10)])]) == expected


def test_v019_dense_rule_is_round_robin_reset_every_5s():
    """0.19-0.24, dense model: engines report nothing, so the client sees only its own +1 per pick (score 4 x
    waiting), wiped by the coordinator's zero snapshot every 5 s; the scan always starts at engine 0.
    t=0..4: counts [1,0] [1,1] [2,1] [2,2] [3,2] -> 0,1,0,1,0; t=5: reset -> 0; t=6 -> 1."""
    w = _world("vllm_dp_v0.19", 1001)
    assert _route(w, [(float(k), [(100, 10)]) for k in range(7)]) == [0, 1, 0, 1, 0, 0, 1]


def test_v025_rule_rotates_the_scan_start():
    """0.25-0.26: as 0.19 but the scan start advances after each pick, so after the t=5 reset (counts [3,2] ->
    [0,0], start at engine 1) the next request goes to engine 1."""
    w = _world("vllm_dp_v0.25", 1001)
    assert _route(w, [(float(k), [(100, 10)]) for k in range(7)]) == [0, 1, 0, 1, 0, 1, 0]


def test_publish_phase_moves_the_reset():
    w = _world("vllm_dp_v0.19", 1001, publish_phase_s=0.5)  # zero snapshots at 0.5 and 5.5: resets before t=1, 6
    assert _route(w, [(float(k), [(100, 10)]) for k in range(7)]) == [0, 0, 1, 0, 1, 0, 0]


def test_two_api_servers_each_start_at_their_own_engine():
    """C = 2 clients, requests alternate between them; client i starts its scan at engine 2 x i // 2 = i and adds
    C = 2 to its local count: client 0 -> engine 0, client 1 -> engine 1, client 0 -> engine 1 (its engine 0 has
    8), client 1 -> engine 0."""
    w = _world("vllm_dp_v0.19", 1001, api_servers=2)
    assert _route(w, [(0.0, [(100, 10)] * 4)]) == [0, 1, 1, 0]


def test_rejected_requests_are_not_routed():
    """vLLM's frontend refuses a too-long request before the DP client sees it: the rotation does not move."""
    w = _world("vllm_dp_v0.19", 1001)
    assert _route(w, [(0.0, [(100, 10), (1600, 10), (100, 10)])]) == [0, 0, 1]


def test_release_names():
    assert dp_router_name("0.19.0") == "vllm_dp_v0.19" and dp_router_name("0.24.1") == "vllm_dp_v0.19"
    assert dp_router_name("0.25.0") == "vllm_dp_v0.25" and dp_router_name("0.26.0", moe=True) == "vllm_dp_v0.25_moe"
    assert dp_router_name("0.27.0") == dp_router_name("v0.32.0rc1") == dp_router_name(None) == "vllm_dp"
    assert dp_router_name("0.19.0", moe=True) == "vllm_dp_v0.19_moe"
    assert set(DP_RULES) <= set(sim.ROUTERS)
    with pytest.raises(ValueError, match="cannot read a vLLM release"):
        dp_router_name("latest")
    with pytest.raises(ValueError, match="does not take the options"):
        sim.PoolSpec(name="p", profile=sim.load_profile("h100-llama-3.1-8b"), router="round_robin",
                     router_options=(("api_servers", 2),))
    with pytest.raises(ValueError, match="api_servers must be"):
        VllmDPRouter(DP_RULES["vllm_dp"], api_servers=0)


def test_per_replica_capacity():
    base = sim.load_profile("h100-llama-3.1-8b")
    pool = sim.PoolSpec(name="p", profile=base, replicas=2, router="vllm_dp", num_gpu_blocks_per_replica=(9000, 9500))
    w = sim.make_world(pool)
    assert [r.core.cfg.num_gpu_blocks for r in w.replicas] == [9000, 9500]
    with pytest.raises(ValueError, match="give one per replica"):
        sim.PoolSpec(name="p", profile=base, replicas=2, num_gpu_blocks_per_replica=(9000,))


@pytest.mark.parametrize("offset_s, publishes", [(0.0, 1), (0.05, 0)])
def test_poll_offset_moves_the_coordinators_first_poll(offset_s, publishes):
    """``poll_offset_s`` delays the coordinator's first poll after a quiet spell (the timer phase no run records,
    which ``traces.dpsplit.routing_envelope`` varies): with a request at t=0, the first snapshot is published at
    0.1 s, or at 0.15 s with a 50 ms offset."""
    w = _world("vllm_dp", 1001, poll_offset_s=offset_s)
    w.env.call_at(0.0, lambda _e: w.open_request("p", 100, 50))
    w.run(until=0.12)
    assert w.cluster.routers["p"].num_publishes == publishes
    with pytest.raises(ValueError, match="poll_offset_s must be in"):
        VllmDPRouter(DP_RULES["vllm_dp"], poll_offset_s=0.1)
