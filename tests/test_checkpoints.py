"""Checkpoints are read with weights_only=True: our trainers' files (old and new) load, a crafted one is refused
without running, and --trust-checkpoint is the explicit way past the refusal."""

import json
import os
import pickle
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from maslat.checkpoints import UnsafeCheckpointError, load_checkpoint_file, read_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def _maslat(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "maslat", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


class _Payload:
    """Unpickling this runs ``touch <marker>`` (what a crafted checkpoint does)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _old_lamas_checkpoint(path: Path) -> None:
    """What `maslat train maas` wrote before (plain torch.save of args + the controller's state_dict)."""
    from agents.lamas import Args, new_controller

    a = Args(method="maas", task="humaneval", seed=0)
    meta = {"method": a.method, "task": a.task, "seed": a.seed, "epochs": 1, "batch_size": a.batch_size, "lr": a.lr,
            "token_weight": a.token_weight, "threshold": a.threshold, "num_layers": a.num_layers}
    torch.save({"args": meta, "state_dict": new_controller(a).state_dict()}, path)


def _old_cmdp_checkpoints(d: Path) -> tuple[Path, Path]:
    """What `maslat train ppo_lagrangian|masrouter` wrote before: numpy arrays and scalars inside."""
    from agents.masrouter import MasRouterArgs, MasRouterPolicy, make_router
    from agents.ppo_lagrangian import PPOLagArgs, train_ppo_lagrangian
    from envs.cmdp import MASLatencyCMDPEnv

    env = MASLatencyCMDPEnv("gsm8k", "train", load="idle")
    pol, _ = train_ppo_lagrangian(env, PPOLagArgs(total_steps=64, steps_per_epoch=64, seed=0))
    ppo = d / "ppo.pt"
    torch.save({"kind": "ppo_lagrangian", "task": "gsm8k", "load": "idle", "args": pol.args, "slo_factor": [1.0, 2.0],
                "state": pol.state_dict(), "estimator": None}, ppo)
    env = MASLatencyCMDPEnv("humaneval", "train", load="idle")
    mr = MasRouterPolicy(make_router(env, MasRouterArgs(seed=0)))  # untrained: the same types as trained
    mr.args = {**asdict(MasRouterArgs(seed=0)), "cost_rate": 0.1}
    router = d / "mr.pt"
    torch.save({"kind": "masrouter", "task": "humaneval", "load": "idle", "args": mr.args, "state": mr.state_dict(),
                "estimator": None}, router)
    return ppo, router


def test_old_trainer_checkpoints_load_weights_only(tmp_path):
    from maslat.commands._cmdp import is_cmdp_checkpoint, load_policy
    from maslat.commands._mas import load_checkpoint

    _old_lamas_checkpoint(tmp_path / "controller.pt")
    a, ctrl = load_checkpoint(str(tmp_path / "controller.pt"), task=None, seed=0, concurrency=1, cluster=None)
    assert a.method == "maas" and ctrl is not None
    ppo, router = _old_cmdp_checkpoints(tmp_path)
    assert "numpy.ndarray" in torch.serialization.get_unsafe_globals_in_checkpoint(ppo), "numpy arrays inside"
    for path, kind in ((ppo, "ppo_lagrangian"), (router, "masrouter")):
        assert is_cmdp_checkpoint(str(path))
        pol, ck = load_policy(str(path))
        assert ck["kind"] == kind and pol is not None


def test_save_checkpoint_is_plain_and_atomic(tmp_path):
    import numpy as np

    from agents.ppo_lagrangian import PPOLagArgs

    obj = {"args": PPOLagArgs(), "count": np.float64(3.0), "arr": np.arange(3.0), "t": torch.ones(2), "p": tmp_path}
    path = save_checkpoint(obj, tmp_path / "c.pt")
    back = load_checkpoint_file(path)
    assert back["args"] == asdict(PPOLagArgs()) and back["count"] == 3.0 and type(back["count"]) is float
    assert back["arr"].tolist() == [0.0, 1.0, 2.0] and back["p"] == str(tmp_path)
    (tmp_path / "keep.pt").write_bytes(b"old")
    with pytest.raises(ValueError, match="safe reader refuses"):
        save_checkpoint({"bad": _Payload(tmp_path / "never")}, tmp_path / "keep.pt")
    assert (tmp_path / "keep.pt").read_bytes() == b"old" and not list(tmp_path.glob(".keep.pt.*"))


@pytest.mark.parametrize("fmt", ["zip", "raw-pickle"])
def test_a_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path, fmt):
    marker = tmp_path / "pwned"
    evil = tmp_path / "controller.pt"
    payload = {"args": {"method": "maas", "task": "humaneval"}, "state_dict": _Payload(marker)}
    if fmt == "zip":
        torch.save(payload, evil)
    else:
        evil.write_bytes(pickle.dumps(payload))
    with pytest.raises(UnsafeCheckpointError, match="--trust-checkpoint"):
        load_checkpoint_file(evil)
    assert not marker.exists()
    p = _maslat("evaluate", str(evil), "--json")
    assert p.returncode == 2 and "refused" in p.stderr and "--trust-checkpoint" in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and not marker.exists(), "evaluate ran the checkpoint's code"
    p = _maslat("validate-policy", str(evil), "--endpoints", "http://127.0.0.1:9", "--num-queries", "1")
    assert p.returncode == 2 and "--trust-checkpoint" in p.stderr and not marker.exists()
    if fmt == "zip":  # the explicit flag is the one way past the refusal (and then the code does run)
        _maslat("evaluate", str(evil), "--trust-checkpoint")
        assert marker.exists()


def test_new_checkpoints_from_train_load_weights_only_without_allowlist(tmp_path):
    """`maslat train` now writes tensors and plain values only: even bare weights_only=True reads them."""
    res = _maslat("train", "maas", "--task", "humaneval", "--epochs", "1", "--out", str(tmp_path / "r"), "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    path = json.loads(res.stdout.strip().splitlines()[-1])["checkpoint"]
    ck = torch.load(path, weights_only=True)
    assert set(ck) == {"maslat_checkpoint", "args", "state_dict"}
    assert ck["maslat_checkpoint"]["format"] == "maslat-checkpoint" and ck["maslat_checkpoint"]["version"] == 1
    head = read_checkpoint(path).header
    assert head.method == "maas" and head.args["task"] == "humaneval" and head.args["epochs"] == 1


def test_header_is_read_once_and_old_files_get_theirs(tmp_path):
    """New files carry the versioned header; files from before it get the header they would have had; a newer
    version or another format is refused with what to do."""
    from agents.ppo_lagrangian import PPOLagArgs

    path = save_checkpoint({"state": {"w": torch.ones(1)}}, tmp_path / "new.pt", method="ppo_lagrangian",
                           args=PPOLagArgs(total_steps=640))
    ck = read_checkpoint(path)
    assert not ck.legacy and ck.header.method == "ppo-lagrangian" and ck.header.args["total_steps"] == 640
    assert set(ck.payload) == {"state"}
    _old_lamas_checkpoint(tmp_path / "controller.pt")
    old = read_checkpoint(tmp_path / "controller.pt")
    assert old.legacy and old.header.method == "maas" and old.header.version == 1 and "state_dict" in old.payload
    ppo, router = _old_cmdp_checkpoints(tmp_path)
    assert [read_checkpoint(p).header.method for p in (ppo, router)] == ["ppo-lagrangian", "masrouter"]
    torch.save({"maslat_checkpoint": {"format": "maslat-checkpoint", "version": 99, "method": "maas", "args": {}}},
               tmp_path / "future.pt")
    with pytest.raises(ValueError, match="version 99.*upgrade maslatency"):
        read_checkpoint(tmp_path / "future.pt")
    torch.save({"weights": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a maslat checkpoint"):
        read_checkpoint(tmp_path / "other.pt")
    p = _maslat("evaluate", str(tmp_path / "future.pt"))
    assert p.returncode == 2 and "upgrade maslatency" in p.stderr and "Traceback" not in p.stderr
