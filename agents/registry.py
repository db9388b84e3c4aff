"""Every trainer and policy by name: one ``dict[str, factory]`` (``METHODS``), one entry interface (``Method``).

An entry says, for one method, what the command line and the checkpoint reader need and nothing else:

==================  ==========================================================================================
``name``            the hyphenated name (``maslat train ppo-lagrangian``); ``legacy`` the name old commands and
                    checkpoints used (``ppo_lagrangian``)
``family``          which protocol runs it: ``lamas`` (``MASLatency-v0``, LAMaS's train/test protocol),
                    ``cmdp`` (``MASLatency-CMDP-v0``, ``agents.cmdp_experiment.evaluate``) or ``estimators``
``args_type``       the algorithm's ``Args`` dataclass: its fields, types, defaults and docstrings *are* the
                    command's options (``maslat/commands/_options.py``), so a default lives once, next to the
                    algorithm; ``fixed`` fields are set by the method (LAMaS variants), ``hidden`` ones are
                    not offered (nested configs the command builds from its own options)
``choices``         the enumerable values of ``str`` fields, read from the algorithm's own tables
``train``           the training function (``None``: nothing to train: a static baseline)
``load_policy``     checkpoint payload -> policy (``None``: the policy is built, not loaded)
==================  ==========================================================================================

Adding a method is adding one factory to ``METHODS``. Importing this module imports no trainer: each factory
imports its algorithm when called.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

__all__ = ["METHODS", "Method", "MethodSpec", "get_method", "method_names"]

FAMILIES = ("lamas", "cmdp", "estimators")


class Method(Protocol):
    """What a registry entry offers (``MethodSpec`` is the one implementation)."""

    name: str
    family: str
    summary: str
    args_type: type | None

    def make_args(self, **kwargs: Any) -> Any: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class MethodSpec:
    """One method (see the module docstring for the fields)."""

    name: str
    family: str
    summary: str
    args_type: type | None = None
    legacy: str | None = None
    fixed: Mapping[str, Any] = field(default_factory=dict)
    hidden: frozenset[str] = frozenset()
    choices: Mapping[str, tuple] = field(default_factory=dict)
    aliases: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    train: Callable | None = None
    load_policy: Callable[[dict], Any] | None = None
    notes: Mapping[str, str] = field(default_factory=dict)
    """per field, what its help adds to the field's docstring (such a dependent default)"""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"MethodSpec.family must be one of {FAMILIES}, got {self.family!r}")
        if "_" in self.name:
            raise ValueError(f"method names are hyphenated: {self.name!r}")

    @property
    def trainable(self) -> bool:
        return self.train is not None

    def make_args(self, **kwargs: Any) -> Any:
        """The method's ``Args`` from the given fields (the rest: the dataclass defaults)."""
        if self.args_type is None:
            raise ValueError(f"{self.name} takes no arguments")
        return self.args_type(**{**kwargs, **self.fixed})


# ------------------------------------------------------------------------------------------ LAMaS family
def _lamas(key: str) -> MethodSpec:
    from envs import TASKS

    from .lamas import METHODS as LAMAS
    from .lamas import Args, train

    m = LAMAS[key]
    what = ("MaAS: sequential execution, score - 3 cost, no baseline" if key == "maas"
            else f"static architecture {m.static} (nothing to train)" if not m.learned
            else f"LAMaS {m.execution} execution, {m.objective} objective, lambda_t {m.token_weight}")
    return MethodSpec(name=key.replace("_", "-"), legacy=key if "_" in key else None, family="lamas", summary=what,
                      args_type=Args, fixed={"method": key}, hidden=frozenset({"method", "cluster", "restart"}),
                      choices={"task": tuple(TASKS)}, train=train if m.learned else None,
                      load_policy=_load_controller if m.learned else None)


def _load_controller(payload: dict, args: Any):
    """The LAMaS controller of a ``controller.pt`` payload for ``args`` (``agents.lamas.Args``)."""
    from .lamas import new_controller

    ctrl = new_controller(args)
    ctrl.load_state_dict(payload["state_dict"])
    ctrl.refresh()
    return ctrl


# ------------------------------------------------------------------------------------------ CMDP family
def _ppo_lagrangian() -> MethodSpec:
    from .lagrange import LAGRANGES
    from .ppo_lagrangian import COSTS, REWARDS, PPOLagArgs, PPOLagPolicy, train_ppo_lagrangian

    return MethodSpec(name="ppo-lagrangian", legacy="ppo_lagrangian", family="cmdp", args_type=PPOLagArgs,
                      summary="PPO-Lagrangian on one load regime (SLO-violation cost, Lagrange multiplier)",
                      choices={"cost": tuple(COSTS), "reward": tuple(REWARDS), "adv_norm": ("joint", "separate"),
                               "lagrangian": tuple(LAGRANGES)},
                      aliases={"total_steps": ("--steps",)}, train=train_ppo_lagrangian,
                      load_policy=lambda payload: PPOLagPolicy.from_state(payload["state"]))


def _masrouter() -> MethodSpec:
    from .masrouter import MasRouterArgs, MasRouterPolicy, train_masrouter

    return MethodSpec(name="masrouter", family="cmdp", args_type=MasRouterArgs, train=train_masrouter,
                      summary="the load-blind MasRouter-style router (quality - cost_rate x $, REINFORCE)",
                      load_policy=lambda payload: MasRouterPolicy.from_state(payload["state"]))


def _baseline(key: str) -> MethodSpec:
    return MethodSpec(name=key.replace("_", "-"), legacy=key, family="cmdp",
                      summary=f"the fixed rule {key} (agents.cmdp_policies; nothing to train)")


def _oracle() -> MethodSpec:
    return MethodSpec(name="oracle", family="cmdp",
                      summary="the lookahead oracle that knows the future load (an upper reference)")


def _estimators() -> MethodSpec:
    from .estimators import EstimatorArgs, train_estimators

    return MethodSpec(name="estimators", family="estimators", args_type=EstimatorArgs, train=train_estimators,
                      aliases={"steps": ("--estimator-steps",)},
                      summary="the latency and length estimators F_lat, F_len on the two-phase dataset")


METHODS: dict[str, Callable[[], MethodSpec]] = {
    "lamas": partial(_lamas, "lamas"),
    "maas": partial(_lamas, "maas"),
    "lamas-lambda0": partial(_lamas, "lamas_lambda0"),
    "lamas-no-cp": partial(_lamas, "lamas_no_cp"),
    "lamas-sequential": partial(_lamas, "lamas_sequential"),
    "single-cot": partial(_lamas, "single_cot"),
    "all-parallel": partial(_lamas, "all_parallel"),
    "ppo-lagrangian": _ppo_lagrangian,
    "masrouter": _masrouter,
    "always-large-deepthink": partial(_baseline, "always_large_deepthink"),
    "always-small-flash": partial(_baseline, "always_small_flash"),
    "greedy-fastest": partial(_baseline, "greedy_fastest"),
    "oracle": _oracle,
    "estimators": _estimators,
}


def method_names(family: str | None = None, *, trainable: bool | None = None) -> list[str]:
    """Registered names (of one family; only trainable ones, or only the others), in registry order."""
    out = []
    for name in METHODS:
        spec = get_method(name)
        if (family is None or spec.family == family) and (trainable is None or spec.trainable == trainable):
            out.append(name)
    return out


def get_method(name: str) -> MethodSpec:
    """The entry of ``name`` (hyphenated, or the underscored name of old commands and checkpoints)."""
    key = name.replace("_", "-")
    if key not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {list(METHODS)}")
    return METHODS[key]()
