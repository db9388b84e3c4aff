"""``maslat experiment apwa --live-endpoint POOL=URL [--ray [ADDRESS]]``: the APWA plan on live servers.

Each method's plan (same table, same plan as the simulated run for the seed and N) runs against the given
OpenAI-compatible endpoints (vLLM or ``maslat serve``), one per model pool of the catalogue
(``envs.cmdp_catalog.default_models``: ``llama-3.1-8b``, ``llama-3.1-70b``). With ``--ray`` the workers are
Ray actors and the capability registry a named actor (``maslat.apwa_ray``); without it the calls go from this
process (``maslat.livebackend.LiveBackend``). The simulated run of the same plan, with as many replicas per
pool as the endpoint reports engines and no background load, is printed beside it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time

from traces.atomic import write_text

from ._common import emit_json, format_table

FIELDS = ("makespan_s", "tokens", "num_calls", "structural_completeness", "semantic_utility", "rejected_calls",
          "malformed_calls", "lost_items", "failure_reason")


def _live_config(endpoints: dict):
    from envs.apwa import APWAConfig
    from envs.cmdp_catalog import default_models
    from envs.loads import LoadRegime

    known = {m.name: m for m in default_models()}
    unknown = sorted(set(endpoints) - set(known))
    if unknown:
        raise ValueError(f"--live-endpoint: unknown model pools {unknown}; name one of {sorted(known)} "
                         "(POOL=URL; a bare URL serves the first)")
    models = tuple(m for name, m in known.items() if name in endpoints)
    return APWAConfig(models=models, warmup_s=0.0, load=LoadRegime(name="none", phases=((0.0,) * len(models),)))


@contextlib.contextmanager
def _runner(args, endpoints: dict):
    """Yields ``run(cfg, workload, n, seed, method) -> (RunResult, {pool: engines})``."""
    if args.ray is not None:
        from maslat.apwa_ray import APWAOnRay

        address = None if args.ray == "local" else args.ray
        with APWAOnRay(endpoints, address=address, num_cpus=args.ray_cpus) as live:
            def run(cfg, workload, n, seed, method):
                res = live.run(cfg, workload, n, seed, method=method)
                return res, {p: s["engines"] for p, s in live.last_backend_stats["pools"].items()}
            yield run
        return
    from envs.apwa import APWARun
    from maslat.livebackend import LiveBackend

    def run(cfg, workload, n, seed, method):
        be = LiveBackend(endpoints)
        try:
            res = APWARun(cfg, workload, n, seed, backend=be).run(method)
            return res, {p: s["engines"] for p, s in be.stats().items()}
        finally:
            be.close()
    yield run


def experiment_apwa_live(args, items: list[int]) -> int:
    from envs.apwa import APWARun
    from maslat.livebackend import parse_endpoints

    endpoints = parse_endpoints(args.live_endpoint, "llama-3.1-8b")
    cfg = _live_config(endpoints)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    runs, rows, t0 = [], [], time.perf_counter()
    with _runner(args, endpoints) as run:
        for seed in seeds:
            for n in items:
                for method in args.methods or ["apwa"]:
                    live, engines = run(cfg, args.workload, n, seed, method)
                    sim_cfg = dataclasses.replace(cfg, models=tuple(dataclasses.replace(m, replicas=engines[m.name] or 1)
                                                                    for m in cfg.model_entries))
                    sim = APWARun(sim_cfg, args.workload, n, seed).run(method)
                    a, b = live.summary(), sim.summary()
                    runs.append({"seed": seed, "items": n, "method": method, "engines": engines,
                                 "live": {k: a[k] for k in FIELDS}, "simulated": {k: b[k] for k in FIELDS}})
                    rows.append([method, n, seed, a["makespan_s"], b["makespan_s"], a["tokens"], b["tokens"],
                                 a["structural_completeness"], a["semantic_utility"],
                                 a["rejected_calls"] + a["malformed_calls"], a["lost_items"]])
    print(format_table(rows, ["method", "N", "seed", "makespan_live_s", "makespan_sim_s", "tokens_live", "tokens_sim",
                              "complete", "utility", "failed_calls", "lost_items"]))
    s = {"experiment": "apwa", "mode": "live", "ray": args.ray, "workload": args.workload, "items": items,
         "seeds": seeds, "endpoints": {p: e.base for p, e in endpoints.items()}, "runs": runs,
         "wall_s": time.perf_counter() - t0}
    print(f"wall time {s['wall_s']:.1f} s", file=sys.stderr)
    if args.out:
        write_text(args.out, json.dumps(s, indent=1))
    if args.json:
        emit_json(s)
    return 0
