"""Trials as Ray tasks: the same results as the serial run bit for bit, retries, failures named, a sweep.

Tests marked ``ray`` need the ``ray`` extra; they start a local two-CPU Ray cluster themselves and fail
(never skip) when it cannot start. The others check that Ray stays optional and lazily imported.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=120)


def test_core_never_imports_ray():
    r = _python("import sys, envs, agents.experiment, agents.cmdp_experiment, maslat.cli, maslat.ray_runner, "
                "maslat.sweep; maslat.cli.build_parser(); print('ray' in sys.modules)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_missing_ray_names_the_extra():
    block = "import sys; sys.modules['ray'] = None\n"  # as if Ray were not installed
    r = _python(block + "from maslat.ray_runner import RayMap\ntry:\n    RayMap().start()\nexcept ImportError as e:\n"
                "    print(e)")
    assert "pip install 'maslatency[ray]'" in r.stdout, r.stdout + r.stderr
    r = _python(block + "from maslat.cli import main; raise SystemExit(main(['experiment', 'lamas', '--seeds', '1', "
                "'--ray']))")
    assert r.returncode == 2 and "pip install 'maslatency[ray]'" in r.stderr, r.stderr[-2000:]


# ---------------------------------------------------------------- on a local Ray cluster
@pytest.fixture(scope="module")
def ray_map():
    from maslat.ray_runner import RayMap

    m = RayMap(num_cpus=2, max_retries=2, progress=False).start()  # raises (the test errors) if Ray cannot start
    yield m
    m.close()


def _fail_first_time(item: tuple[int, str]) -> int:
    """Raises on the first attempt at ``item[0] == 2`` (a marker file remembers it across workers)."""
    i, marker = item
    if i == 2 and not os.path.exists(marker):
        Path(marker).write_text("failed once")
        raise RuntimeError("injected failure")
    return i * i


def _always_fail_3(i: int) -> int:
    if i == 3:
        raise ValueError(f"trial {i} is broken")
    return i


@pytest.mark.ray
def test_failed_trial_is_retried_and_reported(ray_map, tmp_path):
    from maslat.ray_runner import serial_map

    marker = str(tmp_path / "failed")
    items = [(i, marker) for i in range(5)]
    ray_map.failures.clear()
    assert ray_map(_fail_first_time, items) == [0, 1, 4, 9, 16]
    assert [(f.index, f.attempt) for f in ray_map.failures] == [(2, 1)]
    assert "injected failure" in ray_map.failures[0].error
    assert serial_map(_fail_first_time, items) == [0, 1, 4, 9, 16]


@pytest.mark.ray
def test_trial_failing_every_retry_fails_the_run_naming_it(ray_map):
    from maslat.ray_runner import TrialsFailed

    ray_map.failures.clear()
    with pytest.raises(TrialsFailed) as e:
        ray_map(_always_fail_3, range(5))
    assert e.value.failed == [3]
    assert [f.attempt for f in e.value.failures] == [1, 2, 3]
    assert "trial 3" in str(e.value) and "ValueError: trial 3 is broken" in str(e.value)


@pytest.mark.ray
def test_cmdp_experiment_on_ray_is_bit_identical(ray_map):
    import torch

    from agents.cmdp_experiment import CMDPExperimentConfig, run_cmdp_experiment
    from agents.masrouter import MasRouterArgs
    from agents.ppo_lagrangian import PPOLagArgs

    torch.set_num_threads(1)
    cfg = CMDPExperimentConfig(task="humaneval", seeds=(0, 1), regimes=("idle", "busy"), eval_queries=2,
                               policies=("ppo_lagrangian", "masrouter", "greedy_fastest"), warmup_s=5.0,
                               ppo=PPOLagArgs(total_steps=96, steps_per_epoch=48, minibatch=16, update_iters=2),
                               masrouter=MasRouterArgs(epochs=1))
    serial = run_cmdp_experiment(cfg)
    remote = run_cmdp_experiment(cfg, map_fn=ray_map)
    assert serial["rows"].equals(remote["rows"])
    assert _untimed(serial["curves"]) == _untimed(remote["curves"])  # trained weights' traces, bit for bit
    a, b = ({k: v for k, v in r["summary"].items() if k not in ("timing", "wall_s")} for r in (serial, remote))
    assert json.dumps(a, sort_keys=True, default=float) == json.dumps(b, sort_keys=True, default=float)
    assert len(serial["rows"]) == 2 * 2 * 3 * 2 * 4  # seeds x regimes x policies x queries x SLO factors


def _untimed(curves: dict) -> str:
    """The training curves without their wall-clock entries (``time/...``)."""
    return json.dumps({k: [{m: v for m, v in row.items() if not m.startswith("time/")} for row in rows]
                       for k, rows in curves.items()}, sort_keys=True, default=float)


@pytest.mark.ray
def test_lamas_experiment_on_ray_is_bit_identical(ray_map):
    import torch

    from agents.experiment import run_experiment

    torch.set_num_threads(1)
    kw = {"methods": ["lamas", "single_cot"], "load_factors": (2.0,), "epochs": 1}
    serial = run_experiment("humaneval", [0, 1], **kw).to_json()
    remote = run_experiment("humaneval", [0, 1], map_fn=ray_map, **kw).to_json()
    assert json.dumps(serial, sort_keys=True) == json.dumps(remote, sort_keys=True)
    assert set(serial["methods"]) == {"lamas", "single_cot"} and "2.0" in serial["loads"]


@pytest.mark.ray
def test_sweep_under_tune_matches_serial_and_names_a_failed_point(ray_map):
    from maslat.sweep import grid, serial_grid, tune_grid

    base = {"profile": "h100-llama-3.1-8b", "replicas": 1, "router": "round_robin", "rate": 8.0, "burst_cv": None,
            "duration": 10.0, "seed": 3, "prompt_tokens": None, "output_tokens": None}
    params = {"max_num_seqs": [4, 64], "rate": [4.0, 16.0]}
    rows = tune_grid(base, params, max_failures=0)
    assert rows == serial_grid(base, grid(params))
    assert [(r["max_num_seqs"], r["rate"]) for r in rows] == [(4, 4.0), (4, 16.0), (64, 4.0), (64, 16.0)]
    assert rows[1]["ttft_s_p90"] > rows[3]["ttft_s_p90"] and all(math.isfinite(r["e2e_s_p90"]) for r in rows)
    with pytest.raises(RuntimeError, match=r"(?s)1 sweep point\(s\) failed.*max_num_seqs.: 0.*must be a positive integer"):
        tune_grid(base, {"max_num_seqs": [8, 0]}, max_failures=0)


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_sweep_cli_serial_json_and_bad_params(capsys):
    from maslat.cli import main

    argv = ["sweep", "--param", "max_num_seqs=4,32", "--param", "enable_prefix_caching=true,false", "--duration", "5",
            "--rate", "6", "--serial", "--json"]
    assert main(argv) == 0
    out = _last_json(capsys)
    assert [(r["max_num_seqs"], r["enable_prefix_caching"]) for r in out["rows"]] == [
        (4, True), (4, False), (32, True), (32, False)]
    assert main(argv) == 0 and _last_json(capsys)["rows"] == out["rows"]  # deterministic
    for bad, msg in ((["--param", "max_num_seq=4"], "unknown setting 'max_num_seq'"),
                     (["--param", "max_num_seqs"], "NAME=V1,V2"),
                     (["--param", "max_num_seqs=four"], "max_num_seqs=four"),
                     (["--param", "rate=1", "--param", "rate=2"], "given twice")):
        assert main(["sweep", *bad, "--serial"]) == 2
        assert msg in capsys.readouterr().err


@pytest.mark.ray
def test_experiment_cli_ray_flag_same_json(ray_map, capsys):
    from maslat.cli import main

    argv = ["experiment", "lamas", "--task", "humaneval", "--seeds", "2", "--methods", "single_cot", "--json"]
    assert main(argv) == 0
    serial = _last_json(capsys)
    assert main([*argv, "--ray"]) == 0  # reuses this process's cluster (and leaves it running)
    remote = _last_json(capsys)
    assert serial.pop("wall_s") > 0 and remote.pop("wall_s") > 0
    # CPU seconds are measurements, not results: present in both, summed over the trials wherever they ran
    assert set(serial.pop("cpu_s")) == set(remote.pop("cpu_s")) == {"train", "test"}
    assert serial == remote
