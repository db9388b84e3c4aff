"""Policies from outside maslat, scored by the same protocol as the built-in ones (``maslat evaluate sb3|policy``).

``ExternalPolicy`` adapts a Stable-Baselines3 model (``model.predict(obs, deterministic=True)``) or any object
with ``act(obs)`` (or a plain function ``obs -> action``) to the interface of ``agents.cmdp_policies.CMDPPolicy``,
so ``agents.cmdp_experiment.evaluate`` runs it on the same seeded episodes as PPO-Lagrangian and the
baselines. Observations: the environment's dict, or ``gymnasium.spaces.flatten`` of it when the policy declares
a ``Box`` ``observation_space`` (an SB3 model trained on ``MASLatency-CMDP-v0(flatten_obs=True)``). Actions:
``(model, strategy)`` (``MultiDiscrete``) or one integer ``model * num_strategies + strategy``
(``action_type="discrete"``), as the environment documents them.

Entry points are ``module:attr`` (``maslat evaluate policy --policy mypkg.policies:fast``); the attribute is the
policy, or a class or factory called with no arguments that returns one. The module is imported: only name
code you trust, as for ``--trust-checkpoint``.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["SB3_ALGORITHMS", "ExternalPolicy", "load_entry_point", "load_external", "load_sb3"]

#: SB3 algorithms tried, in order, for a .zip whose algorithm is not given (those with discrete actions)
SB3_ALGORITHMS = ("PPO", "A2C", "DQN")


class ExternalPolicy:
    """An outside policy behind ``act(obs dict) -> (model, strategy)``; ``begin`` binds the episode's env."""

    def __init__(self, obj: Any, name: str):
        self.obj, self.name = obj, name
        self._predict = _predictor(obj)
        space = getattr(obj, "observation_space", None)
        self.flatten = space is not None and type(space).__name__ == "Box"
        self._env = None

    def begin(self, env, seed: int, options: dict) -> None:
        self._env = env

    def act(self, obs: dict) -> tuple[int, int]:
        env = self._env
        if env is None:
            raise RuntimeError("ExternalPolicy.act before begin(env, ...): run it through "
                               "agents.cmdp_experiment.evaluate")
        if self.flatten:
            from gymnasium import spaces

            obs = spaces.flatten(env.dict_space, obs).astype(np.float32)
        return _decode(self._predict(obs), int(env.action_space.nvec[1]) if hasattr(env.action_space, "nvec")
                       else int(env.action_space.n))


def _predictor(obj: Any):
    if hasattr(obj, "predict") and not hasattr(obj, "act"):  # Stable-Baselines3
        return lambda obs: obj.predict(obs, deterministic=True)[0]
    if hasattr(obj, "act"):
        return obj.act
    if callable(obj):
        return obj
    raise ValueError(f"{type(obj).__name__} is not a policy: it needs act(obs), predict(obs) or to be callable")


def _decode(action: Any, num_strategies: int) -> tuple[int, int]:
    a = np.asarray(action).reshape(-1)
    if a.size == 1:
        return divmod(int(a[0]), num_strategies)
    if a.size == 2:
        return int(a[0]), int(a[1])
    raise ValueError(f"an action is (model, strategy) or one integer model * {num_strategies} + strategy; "
                     f"the policy returned {action!r}")


def load_sb3(path: str | Path, algo: str | None = None):
    """A Stable-Baselines3 model from its ``.zip`` (``algo``: PPO, A2C, DQN, ...; ``None`` tries
    ``SB3_ALGORITHMS``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such Stable-Baselines3 model (.zip)")
    try:
        import stable_baselines3 as sb3
    except ImportError:
        raise ValueError("evaluating an SB3 model needs stable-baselines3: pip install 'maslatency[rl]'") from None
    names = (algo.upper(),) if algo else SB3_ALGORITHMS
    errors = []
    for n in names:
        cls = getattr(sb3, n, None)
        if cls is None:
            raise ValueError(f"--algo {algo}: stable_baselines3 has no {n}")
        try:
            return cls.load(str(path), device="cpu")
        except Exception as e:  # noqa: BLE001 - the next algorithm may fit; all failures are reported below
            errors.append(f"{n}: {type(e).__name__}: {e}")
    raise ValueError(f"{path}: not loadable as a Stable-Baselines3 model ({'; '.join(errors)}); pass --algo")


def load_entry_point(spec: str):
    """The object named by ``module:attr`` (``attr`` may be dotted); a class or zero-argument factory is called."""
    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise ValueError(f"--policy {spec!r}: expected module:attr (e.g. mypkg.policies:fast)")
    if "" not in sys.path and "." not in sys.path:  # a module in the working directory, as `python -m` finds it
        sys.path.insert(0, "")
    try:
        obj = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(f"--policy {spec!r}: cannot import {mod_name!r} ({e})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"--policy {spec!r}: {mod_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if isinstance(obj, type) or (callable(obj) and not hasattr(obj, "act") and _takes_no_args(obj)):
        obj = obj()
    return obj


def _takes_no_args(fn) -> bool:
    import inspect

    try:
        return not any(p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                       for p in inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False


def load_external(*, sb3: str | None = None, entry: str | None = None, algo: str | None = None) -> ExternalPolicy:
    """The outside policy of ``maslat evaluate sb3 MODEL.zip`` or ``maslat evaluate policy --policy M:A``."""
    if (sb3 is None) == (entry is None):
        raise ValueError("give one of an SB3 .zip or --policy module:attr")
    if sb3 is not None:
        return ExternalPolicy(load_sb3(sb3, algo), name=Path(sb3).stem)
    obj = load_entry_point(entry)
    return ExternalPolicy(obj, name=str(getattr(obj, "name", None) or entry.partition(":")[2]))
