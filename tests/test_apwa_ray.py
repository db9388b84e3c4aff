"""APWA live on Ray: the simulated run's plan, with its workers as Ray actors calling the stand-in server over
HTTP and the capability registry as a named actor, on a local two-CPU Ray cluster (fails, never skips, when Ray
cannot start)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from envs.apwa import APWAConfig, APWARun, Decomposition, default_registry

from .standin import last_json_line, serving

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _world():
    from envs.cmdp_catalog import default_models
    from envs.loads import LoadRegime

    m8 = default_models()[0]
    return m8, APWAConfig(models=(m8,), warmup_s=0.0, fail_prob=0.0, load=LoadRegime(name="none", phases=((0.0,),)))


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.ray
def test_apwa_plan_runs_with_ray_actor_workers_on_a_live_server():
    import ray

    from maslat.apwa_ray import REGISTRY_NAME, APWAOnRay

    m8, cfg = _world()
    d = Decomposition(group_size=4, fan_in=2, max_in_flight=4)
    sim = APWARun(cfg, "extract", 24, seed=0, registry=default_registry((m8.name,))).run("apwa", d)
    with serving("--profile", m8.profile, "--replicas", "2", "--time-scale", "0.2") as srv:
        with APWAOnRay({m8.name: srv.url}, num_workers=2, num_cpus=2) as live:
            reg = ray.get_actor(REGISTRY_NAME)                      # the registry is reachable by name
            assert m8.name in ray.get(reg.get.remote("extract")).pools
            res = live.run(cfg, "extract", 24, seed=0, decomposition=d)
            assert ray.get(reg.in_flight.remote()) == {m8.name: 0}   # every bind released
            stats = live.worker_stats()
            backend = live.last_backend_stats
            ray.kill(live.workers[0], no_restart=True)               # a worker dies: the other takes its calls
            again = live.run(cfg, "extract", 8, seed=1, decomposition=d)
            assert live.last_backend_stats["dead_workers"] == [0]
    sim8 = APWARun(cfg, "extract", 8, seed=1, registry=default_registry((m8.name,))).run("apwa", d)
    assert again.complete and (again.num_calls, again.tokens) == (sim8.num_calls, sim8.tokens)
    a, b = res.summary(), sim.summary()
    for k in ("num_calls", "prompt_tokens", "completion_tokens", "tokens", "structural_completeness",
              "semantic_utility", "width", "depth", "lost_items", "rejected_calls"):
        assert a[k] == b[k], (k, a[k], b[k])
    assert res.complete and res.lost_items == 0 and res.failure_reason is None
    assert sum(s["calls"] for s in stats) == res.num_calls and all(s["calls"] > 0 for s in stats)   # both worked
    assert backend["transport_retries"] == 0 and backend["pools"][m8.name]["failed"] == 0
    assert 0.3 < res.makespan_s / sim.makespan_s < 3.0, (res.makespan_s, sim.makespan_s)
    print(f"makespan live {res.makespan_s:.3f} s, simulated {sim.makespan_s:.3f} s, wall {backend['wall_s']:.2f} s")


async def _served_model(url: str) -> str:
    import aiohttp

    from traces.client import served_model

    async with aiohttp.ClientSession() as s:
        return (await served_model(s, url))["id"]


@pytest.mark.ray
def test_worker_retries_a_dead_endpoint_then_uses_one_registered_at_run_time():
    """A worker sends a call to a closed port ``max_attempts`` times and reports the failure; once the pool is
    re-registered to the live server, the next call through the same actors is served."""
    import ray

    from maslat.apwa_ray import APWAOnRay

    m8, _ = _world()
    with serving("--profile", m8.profile, "--time-scale", "0.2") as srv:
        with APWAOnRay({m8.name: _closed_port_url()}, num_workers=1, max_attempts=3, num_cpus=2,
                       registry_name="maslat-apwa-registry-retry") as live:
            w = live.workers[0]
            bad = ray.get(w.call.remote(m8.name, "any", [1000] * 8, 4))
            assert bad["error"] and bad["attempts"] == 3 and bad["status"] is None
            ray.get(live.registry_actor.register_endpoint.remote(m8.name, srv.url))
            model = asyncio.run(_served_model(srv.url))
            good = ray.get(w.call.remote(m8.name, model, [1000] * 8, 4))
            assert good["error"] is None and good["attempts"] == 1 and good["output_tokens"] == 4
            assert ray.get(w.stats.remote()) == {"calls": 2, "attempts": 4, "failed": 1}


def _maslat(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "maslat", *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300)


def test_apwa_ray_module_does_not_import_ray_and_live_mode_names_bad_pools():
    r = subprocess.run([sys.executable, "-c", "import sys, maslat.apwa_ray; print('ray' in sys.modules)"], cwd=ROOT,
                       env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr
    bad = _maslat("experiment", "apwa", "--live-endpoint", "gpt-4=http://127.0.0.1:9", "--items", "4", "--seeds", "1")
    assert bad.returncode == 2 and "unknown model pools ['gpt-4']" in bad.stderr and "llama-3.1-8b" in bad.stderr


@pytest.mark.ray
def test_cli_live_mode_on_ray_reports_live_and_simulated_figures():
    """Two pools (8B workers, the 70B manager), each its own server: the live plan binds the pools the simulated
    one binds (the same modelled utility, which depends on each call's model), on Ray worker actors."""
    from envs.cmdp_catalog import default_models

    m8, m70 = default_models()
    with serving("--profile", m8.profile, "--replicas", "2", "--time-scale", "0.2") as s8, \
            serving("--profile", m70.profile, "--time-scale", "0.2") as s70:
        out = _maslat("experiment", "apwa", "--live-endpoint", f"{m8.name}={s8.url}", "--live-endpoint",
                      f"{m70.name}={s70.url}", "--items", "8", "--seeds", "1", "--workload", "summarise", "--ray",
                      "--ray-cpus", "2", "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    res = last_json_line(out.stdout)
    assert res["mode"] == "live" and res["ray"] == "local" and len(res["runs"]) == 1
    run = res["runs"][0]
    live, sim = run["live"], run["simulated"]
    assert run["engines"] == {m8.name: 2, m70.name: 1} and live["structural_completeness"] == 1.0
    assert live["num_calls"] == sim["num_calls"] > 0 and live["semantic_utility"] == sim["semantic_utility"]
    assert 0.3 < live["makespan_s"] / sim["makespan_s"] < 3.0, run
