"""The round trip, for real: stand-in server -> maslat collect at two load levels -> maslat calibrate -> replay.

Real processes on loopback, run as a user runs them. The stand-in serves a profile whose scheduler holds 16
sequences (so the heavy load queues); the collector measures client-side times; calibration recovers a profile
(step coefficients and the client-side constant) from the two runs; its replays must be within 5 % of the
measured mean/p50/p90 of TTFT, TPOT and E2E on both runs.
"""

import json
import os
import subprocess
import sys

import pytest

import sim
from traces.runs import read_run

from .standin import ROOT, last_json_line, serving, small_profile

#: wall seconds per simulated second: 2 halves the server's timer lag and the HTTP jitter in simulated time
#: (on a busy 2-core machine they reach tens of wall ms), at the price of a 2x longer collection
TIME_SCALE = "2"
#: prompts of ~3,000 tokens (a light load's TTFT ~0.18 s, large against that jitter); a narrow length spread,
#: so that no single long prefill that a few ms of jitter moves into or out of a step dominates a statistic
WORKLOAD = "lognormal:3000,80,0.4"
LIGHT = ("--rate", "4", "--num-requests", "60", "--seed", "1")
HEAVY = ("--rate", "20", "--num-requests", "60", "--seed", "2")  # queues: max_num_seqs 16


def maslat(*args, timeout=300):
    p = subprocess.run([sys.executable, "-m", "maslat", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    """Two client-side runs of one stand-in server (light, heavy) and the profile it served."""
    d = tmp_path_factory.mktemp("roundtrip")
    served = small_profile(d, "h100-8b-seqs16", max_num_seqs=16)
    with serving("--profile", str(served), "--time-scale", TIME_SCALE) as srv:
        for name, load in (("light", LIGHT), ("heavy", HEAVY)):
            maslat("collect", "--endpoint", srv.url, *load, "--workload", WORKLOAD, "--out", str(d / name), "--json")
    return d, sim.load_profile(served)


@pytest.mark.slow
def test_collect_calibrate_replay_round_trip(collected):
    d, served = collected
    light, heavy = read_run(d / "light"), read_run(d / "heavy")
    assert light.client_side and heavy.client_side and light.engine.max_num_seqs == 16
    assert light.num_gpu_blocks == served.engine.num_gpu_blocks  # from vllm:cache_config_info
    assert heavy.requests["ttft_s"].median() > 5 * light.requests["ttft_s"].median(), "the heavy load must queue"
    out = maslat("calibrate", str(d / "light"), str(d / "heavy"), "--gpu", "h100-sxm", "--out", str(d / "cal.json"),
                 "--json")
    rep = last_json_line(out)
    prof = sim.load_profile(d / "cal.json")
    # the client-side constant: the stand-in's frontend delay plus what HTTP and the machine's scheduling add on
    # loopback (a few ms on an idle machine, ~15 ms with every core busy)
    assert rep["overheads"]["frontend_fitted"] and prof.sources["overheads"].startswith("frontend_s: the client")
    assert served.overheads.frontend_s < prof.overheads.frontend_s < served.overheads.frontend_s + 0.03
    # the identified step-cost directions come back near the served profile's coefficients
    for k in ("weight", "pf_compute"):
        assert prof.latency_coefficients[k] == pytest.approx(served.latency_coefficients[k], rel=0.10)
    for run in ("light", "heavy"):
        rep = json.loads(maslat("replay", str(d / run), "--profile", str(d / "cal.json"), "--json").splitlines()[-1])
        errors = {f"{m}.{s}": rep["metrics"][m][s]["error_pct"] for m in rep["metrics"] for s in ("mean", "p50", "p90")}
        assert rep["bar"]["passed"] and rep["bar"]["threshold_pct"] == 5.0, (run, errors)
        assert max(map(abs, errors.values())) <= 5.0
