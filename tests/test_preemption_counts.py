"""Preemption counts end to end: the collector records ``vllm:num_preemptions_total`` gained during a run
(meta.json ``collector.preemptions``), and ``maslat replay`` reports it next to the simulated count."""

import json
import os
import subprocess
import sys
import urllib.request

from traces.replay import measured_preemptions, preemption_agreement
from traces.runs import read_run

from .standin import ROOT, last_json_line, metric_sum, parse_metrics, serving, small_profile


def _maslat(*args, timeout=300):
    p = subprocess.run([sys.executable, "-m", "maslat", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def test_collected_preemptions_match_the_server_counter_and_the_replay(tmp_path):
    """A stand-in with a tight KV cache preempts; the run records exactly the server's counter, and the replay of
    the run with the server's own profile comes close to the count (the stand-in is the simulator, but the replay
    injects the client's send times, which carry HTTP and timer jitter on a busy machine: once 16 against 20 at
    time scale 0.5; the 10 %-or-3 agreement is asserted against the real engine, tests/test_real_vllm.py)."""
    prof = small_profile(tmp_path, "tight", num_gpu_blocks=80, max_model_len=1024)
    run = tmp_path / "run"
    with serving("--profile", str(prof), "--time-scale", "2") as srv:
        p = _maslat("collect", "--endpoint", srv.url, "--rate", "40", "--num-requests", "60", "--workload",
                    "fixed:300,120", "--out", run, "--engine-kwarg", "max_num_seqs=1024", "--json")
        text = urllib.request.urlopen(srv.url + "/metrics").read().decode()
    server_count = metric_sum(parse_metrics(text), "vllm:num_preemptions_total")
    summary = last_json_line(p.stdout)
    meta = json.loads((run / "meta.json").read_text())
    assert server_count > 0, "the tight profile should preempt"
    assert meta["collector"]["preemptions"] == summary["preemptions"] == server_count
    assert measured_preemptions(read_run(run)) == server_count
    out = last_json_line(_maslat("replay", run, "--profile", prof, "--json").stdout)
    pre = out["preemptions"]
    assert pre["measured"] == server_count and pre["simulated"] > 0, pre
    assert abs(pre["simulated"] - pre["measured"]) <= max(3, 0.25 * pre["measured"]), pre


def test_runs_without_a_preemption_record_stay_readable(traces_dir):
    """Runs collected before the counter was recorded (and vLLM's own runs) read as 'not recorded'."""
    runs = sorted(p for p in (traces_dir / "vllm").iterdir() if (p / "meta.json").is_file())
    assert runs, f"no measured runs under {traces_dir / 'vllm'}"
    assert measured_preemptions(read_run(runs[0])) is None
    assert preemption_agreement(None, 7) == {"measured": None, "simulated": 7, "error_pct": None, "agree": None}
    assert preemption_agreement(25, 27)["agree"] and preemption_agreement(40, 44)["agree"]
    assert not preemption_agreement(40, 45)["agree"] and not preemption_agreement(2, 6)["agree"]
