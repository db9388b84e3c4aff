"""The method registry and the commands built from it: one sub-command per method with that method's options
(generated from its Args dataclass), old spellings still accepted, policies from outside scored like ours."""

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from maslat.cli import build_parser, main
from maslat.commands._options import add_dataclass_options, dataclass_kwargs, field_docs

ROOT = Path(__file__).resolve().parent.parent


def _maslat(*argv, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "maslat", *argv], capture_output=True, text=True, cwd=cwd or ROOT,
                          timeout=600, env=env)


def _help(*argv) -> str:
    out = _maslat(*argv, "--help")
    assert out.returncode == 0, out.stderr[-2000:]
    return " ".join(out.stdout.split())  # argparse wraps at the terminal's width


def test_registry_covers_every_method_and_policy():
    from agents.cmdp_experiment import POLICIES
    from agents.lamas import METHODS
    from agents.registry import METHODS as REGISTRY
    from agents.registry import get_method, method_names

    for key in [*METHODS, *POLICIES, "estimators"]:
        spec = get_method(key)  # the underscored names of earlier releases resolve too
        assert spec.name == key.replace("_", "-") and "_" not in spec.name
    assert set(REGISTRY) == {k.replace("_", "-") for k in [*METHODS, *POLICIES, "estimators"]}
    assert method_names(trainable=True) == ["lamas", "maas", "lamas-lambda0", "lamas-no-cp", "lamas-sequential",
                                            "ppo-lagrangian", "masrouter", "estimators"]
    with pytest.raises(ValueError, match="unknown method 'ppo'"):
        get_method("ppo")


def test_each_method_help_lists_its_own_options_with_the_algorithms_defaults():
    from agents.lamas import Args
    from agents.ppo_lagrangian import PPOLagArgs

    ppo = _help("train", "ppo-lagrangian")
    assert "--cost-limit" in ppo and "--lambda-lr" in ppo and "--load {idle,busy,bursty,shift}" in ppo
    assert "--token-weight" not in ppo and "--batch-size" not in ppo, "LAMaS options leak into PPO-Lagrangian"
    assert f"(default: {PPOLagArgs().total_steps:,})" in ppo  # read from PPOLagArgs, not repeated in the CLI
    assert "--cost {violation,overrun_frac,overrun_s}" in ppo and "--lagrangian {gradient,pid}" in ppo
    lamas = _help("train", "lamas")
    assert "--token-weight" in lamas and f"(default: {Args().batch_size})" in lamas
    assert "--cost-limit" not in lamas and "--load" not in lamas
    assert "--learning-rate" not in _help("train", "masrouter") and "--temperature" in _help("train", "masrouter")
    ev = _help("evaluate", "ppo-lagrangian")
    assert "CHECKPOINT" in ev and "--num-queries" in ev and "--token-weight" not in ev
    assert "CHECKPOINT" not in _help("evaluate", "greedy-fastest")


def test_old_spellings_map_onto_the_sub_commands():
    p = build_parser("train")
    a = p.parse_args(["train", "ppo_lagrangian", "--steps", "1000", "--cost", "overrun_s"])
    assert a._method == "ppo-lagrangian" and a.a_total_steps == 1000 and a.a_cost == "overrun_s"
    from maslat.commands.train import normalize_argv

    assert normalize_argv(["--method", "maas", "--epochs", "1"]) == ["maas", "--epochs", "1"]
    assert normalize_argv(["--task", "mbpp", "--method=lamas_no_cp"]) == ["lamas_no_cp", "--task", "mbpp"]
    from maslat.commands.evaluate import normalize_argv as ev

    assert ev(["single_cot", "--task", "gsm8k"]) == ["single_cot", "--task", "gsm8k"]
    assert ev(["model.zip", "--load", "busy"]) == ["sb3", "model.zip", "--load", "busy"]
    assert ev(["--policy", "m:a"]) == ["policy", "--policy", "m:a"]


def test_cost_limit_default_follows_the_cost_kind():
    from agents.ppo_lagrangian import COST_LIMIT_BY_COST
    from agents.registry import get_method

    spec = get_method("ppo-lagrangian")
    assert spec.make_args().cost_limit == COST_LIMIT_BY_COST["violation"]
    assert spec.make_args(cost="overrun_s").cost_limit == COST_LIMIT_BY_COST["overrun_s"]
    assert spec.make_args(cost="overrun_s", cost_limit=0.5).cost_limit == 0.5


@dataclass(frozen=True, slots=True, kw_only=True)
class _Demo:
    """Attributes:
        rate_per_s: arrivals per second,
            over the whole run.
        a, b: two of a kind.
    """

    rate_per_s: float = 2.0
    a: int = 1
    b: int | None = None
    mode: Literal["x", "y"] = "x"
    """how to do it"""
    sizes: tuple[int, ...] = (1, 2)
    flag: bool = False


def test_options_from_a_dataclass_roundtrip():
    import argparse

    docs = field_docs(_Demo)
    assert docs["rate_per_s"] == "arrivals per second, over the whole run." and docs["b"] == "two of a kind."
    assert docs["mode"] == "how to do it"
    p = argparse.ArgumentParser()
    add_dataclass_options(p, _Demo, prefix="d_")
    assert _Demo(**dataclass_kwargs(p.parse_args([]), _Demo, prefix="d_")) == _Demo()
    got = _Demo(**dataclass_kwargs(p.parse_args(["--rate-per-s", "3", "--b", "4", "--mode", "y", "--sizes", "5",
                                                 "6", "7", "--flag"]), _Demo, prefix="d_"))
    assert got == _Demo(rate_per_s=3.0, b=4, mode="y", sizes=(5, 6, 7), flag=True)
    with pytest.raises(SystemExit):
        p.parse_args(["--mode", "z"])


def test_an_entry_point_policy_scores_exactly_as_the_built_in_one(tmp_path):
    """`maslat evaluate policy --policy module:attr` runs the experiment's protocol: the built-in greedy rule
    through the entry point gives the same figures, bit for bit, as `maslat evaluate greedy-fastest`."""
    common = ["--task", "gsm8k", "--load", "busy", "--num-queries", "2", "--slo-factor", "1.0", "--json"]
    builtin = _maslat("evaluate", "greedy-fastest", *common)
    assert builtin.returncode == 0, builtin.stderr[-2000:]
    outside = _maslat("evaluate", "--policy", "agents.cmdp_policies:GreedyFastest", *common)
    assert outside.returncode == 0, outside.stderr[-2000:]
    a, b = (json.loads(o.stdout.strip().splitlines()[-1]) for o in (builtin, outside))
    assert a == b and a["episodes"] == 2
    (tmp_path / "mypol.py").write_text("def flash(obs):\n    return 0  # discrete: model 0, strategy 0\n")
    fn = _maslat("evaluate", "policy", "--policy", "mypol:flash", *common, cwd=tmp_path,
                 env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert fn.returncode == 0, fn.stderr[-2000:]
    assert json.loads(fn.stdout.strip().splitlines()[-1])["policy"] == "flash"
    bad = _maslat("evaluate", "policy", "--policy", "nowhere_module:x", *common)
    assert bad.returncode == 2 and "cannot import 'nowhere_module'" in bad.stderr


def test_a_stable_baselines3_model_is_evaluated_by_the_same_protocol(tmp_path):
    """A tiny SB3 PPO trained on MASLatency-CMDP-v0 (flat observations, one discrete action), saved as .zip,
    scored by `maslat evaluate sb3` (and by the old `maslat evaluate MODEL.zip`)."""
    sb3 = pytest.importorskip("stable_baselines3", reason="needs the rl extra: pip install 'maslatency[rl]'")
    from envs.cmdp import MASLatencyCMDPEnv

    env = MASLatencyCMDPEnv("gsm8k", "train", load="idle", flatten_obs=True, action_type="discrete")
    model = sb3.PPO("MlpPolicy", env, n_steps=16, batch_size=16, n_epochs=1, seed=0, device="cpu")
    model.learn(16)
    model.save(tmp_path / "tiny")
    common = ["--task", "gsm8k", "--num-queries", "2", "--slo-factor", "1.5", "--json"]
    runs = [_maslat("evaluate", "sb3", str(tmp_path / "tiny.zip"), *common),
            _maslat("evaluate", str(tmp_path / "tiny.zip"), *common)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-2000:]
    a, b = (json.loads(r.stdout.strip().splitlines()[-1]) for r in runs)
    assert a == b and a["policy"] == "tiny" and a["episodes"] == 2 and 0 <= a["goodput"] <= a["slo_attainment"] <= 1


def test_unknown_method_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "ppo", "--steps", "10"])
    assert e.value.code == 2 and "invalid choice: 'ppo'" in capsys.readouterr().err
