"""``make figures``: the script behind the README's figures runs, and its measured-vs-simulated part is right.

Only the CDF figures run here (seconds); the Pareto and goodput figures come from the LAMaS and CMDP
experiments, which their own tests cover, through the same ``maslat.plots`` functions the notebooks test.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "figures.py"


def test_figures_script_writes_the_measured_vs_simulated_cdfs(tmp_path, traces_dir):
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)  # this checkout's code
    env = {**os.environ, "MASLAT_TRACES_DIR": str(traces_dir), "PYTHONPATH": path}
    cmd = [sys.executable, str(SCRIPT), "--only", "cdf", "--out", str(tmp_path), "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])["cdf"]
    assert set(report) == {"wall_s", "rtx4090-llama-3.1-8b", "rtxpro6000-llama-3.1-8b"}
    for name, r in report.items():
        if name == "wall_s":
            continue
        png = Path(r["path"])
        assert png.parent == tmp_path and png.stat().st_size > 20_000
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        # calibrated on its own trace: the replay reproduces the measured distributions within the 5 % bar
        worst = max(abs(st[k]) for st in r["error_pct"].values() for k in ("mean", "p50", "p90"))
        assert worst <= 5.0, (name, r["error_pct"])


def test_figures_script_rejects_an_unknown_figure(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--only", "cdf,pie", "--out", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and "unknown figures ['pie']" in out.stderr and not list(tmp_path.iterdir())
