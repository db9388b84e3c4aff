"""Differential tests: sim's engine (reference, fast and jump modes) against vLLM's own v1 ``Scheduler``.

Random request streams (``traces.conformance.random_case``: arrivals in bursts, lengths, shared prompt prefixes
at two levels and exact duplicates, tight KV that forces preemption, small ``max_num_seqs``,
``long_prefill_token_threshold``, aborts, prefix caching on and off) go through vLLM 0.19.0 (the measured
runs' release) and the current release, step by step, in one subprocess per version, and through
``sim.EngineCore`` with ``EngineConfig.vllm_version`` set to the same release. Every step must agree: scheduled
tokens per request, preempted, admitted (with the tokens their prefix-cache lookup hit) and finished requests,
used KV blocks, queue lengths.

The vLLM side needs ``traces.vllm_cpu``'s cached environment: it is installed on first use (about 75 s) and the
tests fail, never skip, when it cannot be.
"""

from __future__ import annotations

import pytest

from traces.conformance import first_divergence, random_case, random_cases, run_vllm
from traces.conformance_sim import MODES, run_sim
from traces.vllm_cpu import DEFAULT_VERSION

VERSIONS = ("0.19.0", DEFAULT_VERSION)
NUM_CASES = 120
SEED = 20260


@pytest.fixture(scope="module")
def vllm_steps() -> tuple[list[dict], dict[str, dict[str, list]]]:
    cases = random_cases(NUM_CASES, SEED)
    return cases, run_vllm(cases, VERSIONS)


def _features(cases: list[dict], steps: dict[str, list]) -> dict[str, int]:
    """What the cases exercised on vLLM's side (so a generator change cannot silently drop a feature)."""
    out = {"preempted": 0, "prefix_hits": 0, "aborted": 0, "lone_request_capped": 0}
    for c in cases:
        st = steps[c["id"]]
        out["preempted"] += any(s["preempted"] for s in st)
        out["prefix_hits"] += any(h > 0 for s in st for _, h in s["admitted"])
        out["aborted"] += bool(c["aborts"])
        out["lone_request_capped"] += c["engine"]["long_prefill_token_threshold"] > 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("mode", list(MODES))
def test_sim_equals_vllm_step_by_step(vllm_steps, version, mode):
    cases, steps = vllm_steps
    bad = []
    for case in cases:
        d = first_divergence(steps[version][case["id"]], run_sim(case, mode, vllm_version=version))
        if d is not None:
            bad.append(f"{case['id']} step {d['step']} {d['field']}: vLLM {d['expected']} sim {d['got']}")
    assert not bad, f"{len(bad)}/{len(cases)} cases diverge from vLLM {version} ({mode}):\n" + "\n".join(bad[:10])


@pytest.mark.slow
def test_cases_exercise_the_features_and_the_versions_differ(vllm_steps):
    """The generated streams preempt, hit the prefix cache and abort; and the two releases really schedule
    differently on some of them (else the version switch would be tested by nothing)."""
    cases, steps = vllm_steps
    f = _features(cases, steps[VERSIONS[0]])
    assert f["preempted"] >= NUM_CASES // 10 and f["prefix_hits"] >= NUM_CASES // 4, f
    assert f["aborted"] >= 5 and f["lone_request_capped"] >= 10, f
    differ = sum(first_divergence(steps[VERSIONS[0]][c["id"]], steps[VERSIONS[1]][c["id"]]) is not None
                 for c in cases)
    assert differ >= NUM_CASES // 20, differ
    # and the simulator told about the wrong release misses some of them: the switch is what makes it agree
    wrong = sum(first_divergence(steps[VERSIONS[1]][c["id"]], run_sim(c, "reference", vllm_version=VERSIONS[0]))
                is not None for c in cases)
    assert wrong >= NUM_CASES // 20, wrong


def test_random_cases_are_reproducible_and_valid():
    """Same seed, same case; every request fits max_model_len and the KV cache holds one max_model_len
    sequence (what vLLM checks at start-up); the sim accepts every case in every mode."""
    assert random_case(7) == random_case(7) and random_case(7) != random_case(8)
    for case in random_cases(40, 3):
        e = case["engine"]
        assert (e["num_gpu_blocks"] - 1) * e["block_size"] >= e["max_model_len"]
        assert e["max_num_batched_tokens"] >= e["max_num_seqs"]
        for r in case["requests"]:
            assert 1 <= sum(n for _, n in r["segments"]) <= e["max_model_len"] - r["max_tokens"]
        ref = run_sim(case, "reference")
        assert run_sim(case, "jump") == ref and run_sim(case, "fast") == ref
