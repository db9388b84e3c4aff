"""The engine's public per-step record (``sim.steps.StepRecord``) and vLLM's token-budget invariant.

Random workloads under random engine limits (tight KV caches that preempt, small token budgets, chunked
prefill caps, both prefix-caching settings, both scheduler releases) run in the three engine modes with the
invariant checks on (``EngineCore._check_budget`` asserts what vLLM's ``Scheduler.schedule`` asserts); the step
records must be identical in every mode, and every step stays within ``max_num_batched_tokens``.
"""

from dataclasses import replace

import numpy as np
import pytest

from sim import GammaArrivals, LognormalLengths, PoissonArrivals, PoolSpec, Workload, load_profile, make_world
from sim.engine import _SINGLE, EngineCore, _Plan
from sim.steps import StepRecord

from .helpers import ENGINE_MODES as MODES
from .helpers import Harness, constant_model


def _random_engine(rng: np.random.Generator):
    prof = load_profile("h100-llama-3.1-8b")
    eng = replace(prof.engine, num_gpu_blocks=int(rng.integers(150, 1500)), max_model_len=4096,
                  max_num_seqs=int(rng.choice([8, 32, 128])),
                  max_num_batched_tokens=int(rng.choice([256, 512, 2048, 8192])),
                  long_prefill_token_threshold=[None, 64, 500][int(rng.integers(3))],
                  enable_prefix_caching=bool(rng.integers(2)),
                  vllm_version=["0.19.0", "0.32.0"][int(rng.integers(2))])
    return prof.replace(engine=eng)


def _run(mode: str, prof, seed: int, n: int):
    rng = np.random.default_rng(seed)
    arrivals = GammaArrivals(float(rng.uniform(5, 40)), cv=2.5) if rng.integers(2) else PoissonArrivals(15.0)
    w = make_world(PoolSpec(name="m", profile=prof, replicas=2, router="round_robin"), seed=seed,
                   check_invariants=True, **MODES[mode])
    for rep in w.replicas:
        rep.core.step_records = []
    Workload(pool="m", arrivals=arrivals, lengths=LognormalLengths(600, 200, max_prompt=2048, max_output=1500),
             num_requests=n).start(w)
    w.run_until_idle()
    return w, [rep.core.step_records for rep in w.replicas]


@pytest.mark.parametrize("seed", range(6))
def test_step_records_identical_in_every_mode_and_within_budget(seed):
    prof = _random_engine(np.random.default_rng(1000 + seed))
    runs = {m: _run(m, prof, seed, 120) for m in MODES}
    ref_world, ref = runs["reference"]
    for mode, (w, recs) in runs.items():
        assert recs == ref, f"{mode} step records differ from the reference algorithm's (seed {seed})"
        for rep, rs in zip(w.replicas, recs, strict=True):
            assert len(rs) == rep.core.num_steps
            assert [r.step for r in rs] == list(range(len(rs)))
    budget = prof.engine.max_num_batched_tokens
    for rs in ref:
        assert all(r.total_num_scheduled_tokens <= budget for r in rs)
        assert all(r.start_s < r.end_s for r in rs)
        assert all(a.end_s <= b.start_s for a, b in zip(rs, rs[1:], strict=False))
        assert all(sum(n for _, n in r.num_scheduled_tokens) == r.total_num_scheduled_tokens for r in rs)
    finished = sorted(i for rs in ref for r in rs for i in r.finished_req_ids)
    assert len(finished) == ref_world.num_finished == len(set(finished))
    preempted = sum(len(r.preempted_req_ids) for rs in ref for r in rs)
    assert preempted == sum(rep.core.num_preemptions for rep in ref_world.replicas)


def test_records_account_for_every_token_and_jumped_runs_split():
    """Without caching and preemption a request is scheduled prompt + output - 1 tokens in all (the last token
    is sampled, never computed); a decode run of k steps is written as k records."""
    h = Harness(step_s=0.01, mode="jump", max_num_batched_tokens=64, num_gpu_blocks=200, block_size=16,
                max_model_len=1024, max_num_seqs=8, enable_prefix_caching=False)
    reqs = [h.request(f"r{i}", 40 + 7 * i, 30 + 11 * i) for i in range(4)]
    for r in reqs:
        h.add(r)
    h.run()
    recs = h.core.step_records
    assert h.core.num_jumped_steps > 0 and len(recs) == h.core.num_steps
    per_req: dict[str, int] = {}
    for rec in recs:
        assert isinstance(rec, StepRecord) and rec.total_num_scheduled_tokens <= 64
        for rid, n in rec.num_scheduled_tokens:
            per_req[rid] = per_req.get(rid, 0) + n
    assert per_req == {r.request_id: r.num_prompt_tokens + r.max_tokens - 1 for r in reqs}
    decode = sum(rec.num_decode_tokens for rec in recs)
    assert decode == sum(r.max_tokens - 1 for r in reqs)
    assert [rec.start_s for rec in recs] == pytest.approx([0.01 * i for i in range(len(recs))])


def test_budget_check_catches_an_overfull_step():
    from sim import EngineConfig, Request

    core = EngineCore(EngineConfig(max_num_batched_tokens=32, num_gpu_blocks=100, max_model_len=512), constant_model(), check_invariants=True)
    plan = _Plan(_SINGLE, 0, 0.0)
    plan.sched = [(Request("a", 40, 2), 33, 0)]
    with pytest.raises(AssertionError, match="max_num_batched_tokens=32"):
        core._check_budget(plan)
    plan.sched = [(Request("a", 40, 2), 0, 0)]
    with pytest.raises(AssertionError, match="non-positive"):
        core._check_budget(plan)
