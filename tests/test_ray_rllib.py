"""The README's RLlib example, run as written: PPO on MASLatency-v0, MASLatency-CMDP-v0 and MASLatency-APWA-v0 with a remote
env runner (the ``envs:`` id imported there) and the Dict observation flattened. Needs the ``ray`` extra."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    at = text.index("<!-- rllib-example")
    m = re.compile(r"```python\n(.*?)```", re.S).search(text, at)
    assert m, "README: no ```python block after the rllib-example marker"
    return m.group(1)


@pytest.mark.ray
@pytest.mark.slow
def test_readme_rllib_example_trains_every_env(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", readme_example()], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    lines = re.findall(r"^(MASLatency-(?:CMDP-|APWA-)?v0) iteration (\d): (\d+) episodes, mean return (\S+)$", r.stdout, re.M)
    assert [(e, int(i)) for e, i, _, _ in lines] == [("MASLatency-v0", 0), ("MASLatency-v0", 1),
                                                     ("MASLatency-CMDP-v0", 0), ("MASLatency-CMDP-v0", 1),
                                                     ("MASLatency-APWA-v0", 0), ("MASLatency-APWA-v0", 1)], r.stdout
    for _, _, n, ret in lines:
        assert int(n) > 0 and math.isfinite(float(ret)), r.stdout
