"""A grid over simulator settings: each point is one seeded ``maslat simulate`` run, a pure function.

``grid(params)`` expands ``{"max_num_seqs": [64, 128], "rate": [5, 10]}`` into points in a fixed order
(the first parameter varies slowest); ``simulate_point(base, point)`` runs one; ``tune_grid`` runs the grid
under Ray Tune (``tune.grid_search``), ``serial_grid`` in this process. Both return the rows in grid
order, so the table is the same whichever ran it and however the cluster scheduled it.

Sweepable: the engine fields of the profile (``sim.config.EngineConfig``, e.g. ``max_num_seqs``,
``max_num_batched_tokens``, ``num_gpu_blocks``, ``enable_prefix_caching``) and the pool and load
(``replicas``, ``router``, ``rate``, ``burst_cv``, ``duration``, ``seed``, ``prompt_tokens``, ``output_tokens``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import sys
import tempfile
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

__all__ = ["LOAD_PARAMS", "METRICS", "engine_params", "grid", "parse_param", "serial_grid", "simulate_point",
           "tune_grid"]

#: pool and load settings a point may set, with their parser
LOAD_PARAMS: dict[str, Callable[[str], Any]] = {
    "replicas": int, "router": str, "rate": float, "burst_cv": float, "duration": float, "seed": int,
    "prompt_tokens": int, "output_tokens": int}

#: summary figures of each point (``sim.summary.latency_summary``), in table order
METRICS = ("ttft_s_p50", "ttft_s_p90", "tpot_s_p50", "e2e_s_p50", "e2e_s_p90", "queue_s_p90",
           "throughput_req_per_s", "output_tokens_per_s", "preemptions", "finished", "rejected")


def engine_params() -> dict[str, Callable[[str], Any]]:
    """``EngineConfig`` fields with a scalar type, and their parser."""
    from sim.config import EngineConfig

    out = {}
    for f in dataclasses.fields(EngineConfig):
        t = str(f.type)
        if t.startswith("bool"):
            out[f.name] = _parse_bool
        elif t.startswith("int"):
            out[f.name] = (lambda s: None if s.lower() == "none" else int(s)) if "None" in t else int
        elif t.startswith("float"):
            out[f.name] = (lambda s: None if s.lower() == "none" else float(s)) if "None" in t else float
    return out


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{s!r} is not a boolean (true/false)")


def parse_param(text: str) -> tuple[str, list[Any]]:
    """``"max_num_seqs=64,128"`` -> ``("max_num_seqs", [64, 128])``, values parsed by the field's type."""
    name, sep, values = text.partition("=")
    name = name.strip().replace("-", "_")
    known = {**engine_params(), **LOAD_PARAMS}
    if not sep or not values.strip():
        raise ValueError(f"--param {text!r}: write NAME=V1,V2,... (e.g. max_num_seqs=64,128)")
    if name not in known:
        raise ValueError(f"--param {text!r}: unknown setting {name!r}; choose from {sorted(known)}")
    try:
        return name, [known[name](v.strip()) for v in values.split(",")]
    except ValueError as e:
        raise ValueError(f"--param {text!r}: {e}") from e


def grid(params: dict[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination, the first parameter varying slowest."""
    names = list(params)
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*(params[n] for n in names))]


def simulate_point(base: dict[str, Any], point: dict[str, Any]) -> dict[str, Any]:
    """One simulation of ``base`` (``profile`` and the ``LOAD_PARAMS``) with ``point`` applied: the summary
    figures ``METRICS``. Deterministic: the seed is ``point['seed']`` or ``base['seed']``."""
    from maslat.commands.simulate import _workload
    from sim import PoolSpec, load_profile, make_world
    from sim.summary import latency_summary

    cfg = {**base, **point}
    prof = load_profile(cfg["profile"])
    eng = {k: v for k, v in point.items() if k not in LOAD_PARAMS}
    if eng:
        prof = prof.replace(engine=dataclasses.replace(prof.engine, **eng))
    world = make_world(PoolSpec(name="pool", profile=prof, replicas=cfg["replicas"], router=cfg["router"]),
                       seed=cfg["seed"])
    ns = SimpleNamespace(trace=None, **{k: cfg.get(k) for k in LOAD_PARAMS})
    wl, _ = _workload(ns)
    wl.start(world)
    while world.active_sources or world.num_finished + sum(world.rejected.values()) < world.num_submitted:
        world.run(until=world.now + 10.0)
    s = latency_summary(world)
    out = {f"{m}_{q}": float(s[m][q]) for m in ("ttft_s", "tpot_s", "e2e_s", "queue_s") for q in ("p50", "p90")}
    out.update(throughput_req_per_s=float(s["throughput_req_per_s"]), output_tokens_per_s=float(s["output_tokens_per_s"]),
               preemptions=int(s["preemptions"]), finished=int(s["finished"]), rejected=int(sum(s["rejected"].values())))
    return {k: out[k] for k in METRICS}


def serial_grid(base: dict[str, Any], points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The reference: every point in this process, in grid order."""
    return [{**p, **simulate_point(base, p)} for p in points]


def tune_grid(base: dict[str, Any], params: dict[str, Sequence[Any]], *, max_failures: int = 2) -> list[dict]:
    """The grid under Ray Tune (one CPU per point; Ray must be initialised, ``maslat.ray_runner.RayMap``).

    Returns rows in ``grid(params)`` order. A point that still fails after ``max_failures`` retries raises
    ``RuntimeError`` naming it: a table with a silently missing row would look complete."""
    from maslat.ray_runner import import_ray

    import_ray()
    from ray import tune

    def trainable(config: dict) -> dict:
        import torch

        torch.set_num_threads(1)
        return simulate_point(base, {k: config[k] for k in params})

    space = {k: tune.grid_search(list(v)) for k, v in params.items()}
    with tempfile.TemporaryDirectory(prefix="maslat-sweep-") as tmp:
        tuner = tune.Tuner(tune.with_resources(trainable, {"cpu": 1}), param_space=space,
                           run_config=tune.RunConfig(storage_path=tmp, name="sweep", verbose=0,
                                                     failure_config=tune.FailureConfig(max_failures=max_failures)))
        with contextlib.redirect_stdout(sys.stderr):  # Tune's status boxes: stdout is the table and JSON
            results = tuner.fit()
        failed = [(r.config, r.error) for r in results if r.error is not None]
        if failed:
            lines = "\n".join(f"  {c}: {str(e).strip().splitlines()[-1] if str(e).strip() else e!r}"
                              for c, e in failed)
            raise RuntimeError(f"{len(failed)} sweep point(s) failed after {max_failures + 1} attempt(s):\n{lines}")
        by_key = {_key(r.config, params): {k: r.metrics[k] for k in METRICS} for r in results}
    return [{**p, **by_key[_key(p, params)]} for p in grid(params)]


def _key(config: dict, params) -> tuple:
    return tuple(repr(config[k]) for k in params)
