"""Scheduler conformance on hypothesis-drawn request streams (``traces.conformance``'s case format).

``conformance_cases()`` is a hypothesis strategy of cases: engine limits (small, so that few requests exercise
chunking, slot limits, tight KV and preemption), arrivals in bursts and gaps, prompt and output lengths, shared
prompt prefixes at two levels and copies of earlier prompts, and aborts (before arrival, of a waiting, running or
finished request). It shrinks towards one request, no gaps, no abort. ``hypothesis_conformance`` runs a bounded,
derandomized number of examples, one case each, through one persistent vLLM scheduler process per release
(``traces.conformance.SchedulerDriver``: vLLM is imported once, a failing case shrinks cheaply) and through
``sim.EngineCore`` in each mode, step by step, and reports cases and steps identical per release and mode, what the
examples exercised, and the shrunk case of the first divergence.

hypothesis is a development dependency (``pip install -e .[dev]``); it is imported only when a function here runs.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from .conformance import MAX_STEPS, SchedulerDriver, first_divergence
from .conformance_sim import run_sim

__all__ = ["conformance_cases", "hypothesis_conformance"]


def _hypothesis():
    try:
        import hypothesis
        from hypothesis import strategies
    except ImportError as e:
        raise ImportError("hypothesis-drawn conformance cases need hypothesis: pip install -e '.[dev]'") from e
    return hypothesis, strategies


def _prompt(draw, st, i: int, room: int, prefixes: list[int], earlier: list[list]) -> list[list]:
    """Segments: a copy or truncation of an earlier prompt, or a shared system prompt, maybe a shared second
    level, and a private tail (content ids as ``traces.conformance.random_case``'s)."""
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


def _engine(draw, st) -> dict:
    """Tight KV (often one max_model_len sequence plus 0-2 blocks), few slots, a small token budget, the
    threshold and the full-ISL gate on or off; vLLM requires max_num_batched_tokens >= max_num_seqs."""
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


def conformance_cases():
    """A hypothesis strategy of conformance cases (see the module docstring)."""
    _, st = _hypothesis()

    @st.composite
    def cases(draw) -> dict:
        eng = _engine(draw, st)
        mml = eng["max_model_len"]
        prefixes = draw(st.lists(st.integers(1, mml - 1), min_size=1, max_size=3))
        step, requests, aborts, earlier = 0, [], [], []
        for i in range(draw(st.integers(1, 16))):
            step += draw(st.integers(0, 12))
            max_tokens = draw(st.integers(1, min(32, mml - 1)))
            segs = _prompt(draw, st, i, mml - max_tokens, prefixes, earlier)
            earlier.append(segs)
            requests.append({"id": f"r{i}", "arrival_step": step, "segments": segs, "max_tokens": max_tokens})
            abort = draw(st.one_of(st.none(), st.integers(-2, 40)))
            if abort is not None:
                aborts.append({"id": f"r{i}", "step": max(0, step + abort)})
        return {"id": "hypothesis", "seed": 0, "engine": eng, "requests": requests, "aborts": aborts,
                "max_steps": MAX_STEPS}

    return cases()


def features(case: dict, steps: list[dict]) -> Counter:
    """What one case exercised on vLLM's side: preemption, prefix hits, the threshold, and aborts that hit a
    waiting or a running request (an abort before arrival or after the finish does nothing)."""
    out = Counter(preempted=any(s["preempted"] for s in steps),
                  prefix_hits=any(h > 0 for s in steps for _, h in s["admitted"]),
                  threshold=case["engine"]["long_prefill_token_threshold"] > 0)
    arrival = {r["id"]: r["arrival_step"] for r in case["requests"]}
    for a in case["aborts"]:
        before = steps[: a["step"]]
        if a["step"] < arrival[a["id"]] or any(a["id"] in s["finished"] for s in before):
            continue
        ran = any(a["id"] == rid for s in before for rid, _ in s["scheduled"])
        out["aborted_running" if ran else "aborted_waiting"] += 1
    return out


def hypothesis_conformance(versions: Sequence[str], modes: Sequence[str], examples: int,
                           workdir: str | Path) -> dict:
    """``examples`` hypothesis-drawn cases (derandomized: the same cases every call) through every release's
    scheduler and every sim mode. Returns per ``versions[v][mode]`` the cases and steps (run, and identical),
    ``features`` (what the cases exercised, from the first release's records), and ``divergence``: ``None``, or
    the shrunk failing case with its first differing step (the counts then include hypothesis's shrinking
    attempts)."""
    hypothesis, _ = _hypothesis()
    per = {v: {m: Counter() for m in modes} for v in versions}
    seen: Counter = Counter()
    drivers = []
    try:
        for v in versions:
            drivers.append(SchedulerDriver(v, Path(workdir) / v))

        @hypothesis.settings(max_examples=examples, derandomize=True, database=None, deadline=None,
                             suppress_health_check=list(hypothesis.HealthCheck))
        @hypothesis.given(case=conformance_cases())
        def check(case):
            for d in drivers:
                d.send([case])
            steps = {d.version: d.receive()[case["id"]] for d in drivers}
            bad = []
            for v, want in steps.items():
                for m in modes:
                    div = first_divergence(want, run_sim(case, m, vllm_version=v))
                    if div is not None:
                        bad.append(f"vLLM {v} / sim {m}: step {div['step']} {div['field']}: vLLM {div['expected']} "
                                   f"sim {div['got']}")
                    else:
                        per[v][m].update(cases_identical=1, steps_identical=len(want))
                    per[v][m].update(cases=1, steps=len(want))
            seen.update(features(case, steps[versions[0]]))
            seen["cases"] += 1
            assert not bad, "\n".join(bad) + f"\ncase {json.dumps(case)}"

        divergence = None
        try:
            check()
        except AssertionError as e:  # hypothesis re-raises the shrunk example's failure
            divergence = str(e)
    finally:
        for d in drivers:
            d.close()
    return {"examples": examples, "versions": {v: {m: dict(c) for m, c in ms.items()} for v, ms in per.items()},
            "features": dict(seen), "divergence": divergence}
