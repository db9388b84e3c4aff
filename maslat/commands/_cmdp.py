"""The MASLatency-CMDP-v0 side of ``maslat train`` and ``maslat evaluate``: one training path for every CMDP
trainer of ``agents.registry`` and one evaluation path (``agents.cmdp_experiment.evaluate``, the experiment's
protocol) for every policy: trained checkpoints, the fixed-rule baselines, the oracle and policies from
outside (``maslat.external``)."""

from __future__ import annotations

import csv
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from traces.atomic import atomic_open

from ..checkpoints import read_checkpoint, save_checkpoint
from ._cmdp_report import findings_text, results_table
from ._common import add_json_flag, add_trust_flag, emit_json, format_table, progress
from ._options import add_dataclass_options, dataclass_kwargs

__all__ = ["EvalSetting", "TrainSetting", "configure_evaluate", "configure_train", "evaluate_cmdp",
           "findings_text", "is_cmdp_checkpoint", "load_policy", "results_table", "train_cmdp"]

METRIC_COLUMNS = ("quality_pct", "slo_attainment", "goodput", "latency_p50_s", "latency_p95_s", "cost_usd_per_query",
                  "calls_per_query", "large_model_share", "deepthink_share")
SETTING, ARGS = "s_", "a_"


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainSetting:
    """The world a CMDP policy trains in (its algorithm's own arguments are its ``Args``)."""

    task: str = "gsm8k"
    """benchmark of the task model (envs.TASKS)"""
    load: str = "idle"
    """load regime of the training world (envs.loads.REGIMES)"""
    slo_factor: tuple[float, ...] | None = None
    """SLO factor LOW HIGH drawn per episode, a multiple of each query's reference latency (its topology with the
    strongest model and DeepThink on idle replicas); none: the task kind's"""
    estimator: str = "default"
    """estimator bundle (.npz from `maslat train estimators`), default (the shipped one) or none"""


@dataclass(frozen=True, slots=True, kw_only=True)
class EvalSetting:
    """How a CMDP policy is evaluated: ``agents.cmdp_experiment.evaluate`` on a seeded sample of queries."""

    task: str | None = None
    """benchmark (none: the checkpoint's; gsm8k for a policy without one)"""
    load: str | None = None
    """load regime (none: the regime the checkpoint was trained on; idle for a policy without one)"""
    split: Literal["train", "test"] = "test"
    """split the queries come from"""
    seed: int = 0
    """world and sampling seed of the evaluation"""
    num_queries: int = 60
    """queries evaluated (the first ones of a seeded permutation of the split)"""
    slo_factor: tuple[float, ...] | None = None
    """the SLO factors to test (multiples of each query's reference latency); none: the task kind's"""
    estimator: str | None = None
    """estimator bundle of the environment (none: the checkpoint's, else the shipped one)"""


def _slo_help(kind: int) -> dict[str, str]:
    from agents.cmdp_experiment import SLO_FACTORS, TRAIN_SLO_FACTOR

    table = (SLO_FACTORS, TRAIN_SLO_FACTOR)[kind]
    return {"slo_factor": "(" + "; ".join(f"{k}: {' '.join(map(str, v))}" for k, v in table.items()) + ")"}


def _choices() -> dict[str, tuple]:
    from envs import TASKS
    from envs.loads import REGIMES

    return {"task": tuple(TASKS), "load": tuple(REGIMES)}


def configure_train(p, spec) -> None:
    """``maslat train <cmdp method>``: the training world and the method's ``Args``."""
    g = p.add_argument_group("training world (MASLatency-CMDP-v0)")
    # MasRouter's utility has no latency in it: it trains on the idle regime, whatever the evaluation's
    exclude = ("load",) if spec.name == "masrouter" else ()
    add_dataclass_options(g, TrainSetting, prefix=SETTING, exclude=exclude, choices=_choices(),
                          help_extra=_slo_help(1))
    a = p.add_argument_group(f"{spec.name} ({spec.args_type.__module__}.{spec.args_type.__name__})")
    add_dataclass_options(a, spec.args_type, prefix=ARGS, choices=spec.choices, aliases=spec.aliases,
                          help_extra=spec.notes)
    p.add_argument("--out", type=Path, default=None,
                   help=f"output directory (default runs/{spec.legacy or spec.name}-<task>-<load>-<seed>)")
    add_json_flag(p)


def configure_evaluate(p, spec=None, *, positional: tuple[str, str] | None = None) -> None:
    """``maslat evaluate <cmdp policy>``: the policy's source (``positional``) and the evaluation setting."""
    if positional is not None:
        p.add_argument(positional[0], metavar=positional[0].upper(), help=positional[1])
    add_dataclass_options(p.add_argument_group("evaluation (agents.cmdp_experiment.evaluate)"), EvalSetting,
                          prefix=SETTING, choices=_choices(), help_extra=_slo_help(0))
    add_trust_flag(p)
    add_json_flag(p)


def _slo_range(st: TrainSetting) -> tuple[float, float]:
    from agents.cmdp_experiment import default_slo

    f = st.slo_factor or default_slo(st.task)[1]
    if len(f) not in (1, 2):
        raise ValueError("--slo-factor takes LOW HIGH for training")
    return (f[0], f[-1])


# ------------------------------------------------------------------------------------------ training
def train_cmdp(args, spec) -> int:
    """Train ``spec`` (``agents.registry``) in the ``TrainSetting`` world; write policy.pt and metrics.csv."""
    from agents.ppo_lagrangian import ENV_COST
    from envs.cmdp import MASLatencyCMDPEnv

    st = TrainSetting(**dataclass_kwargs(args, TrainSetting, prefix=SETTING))
    a = spec.make_args(**dataclass_kwargs(args, spec.args_type, prefix=ARGS))
    env = MASLatencyCMDPEnv(st.task, "train", load=st.load, slo_factor=_slo_range(st), estimator=st.estimator,
                            cost=ENV_COST[a.cost] if hasattr(a, "cost") else "violation")
    out = args.out or Path("runs") / f"{spec.legacy or spec.name}-{st.task}-{st.load}-{a.seed}"
    if hasattr(a, "total_steps"):
        total, unit = a.total_steps // a.steps_per_epoch * a.steps_per_epoch, "step"
    else:
        total, unit = len(env.queries) * a.epochs, "query"
    t0 = time.perf_counter()
    with progress(total, f"{spec.name} on {st.task}/{st.load}", unit=unit) as bar:
        pol, hist = spec.train(env, a, progress=bar.update)
    wall = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    meta = {"kind": spec.legacy or spec.name, "task": st.task, "load": st.load, "args": pol.args,
            "slo_factor": list(_slo_range(st))}
    save_checkpoint({**meta, "state": pol.state_dict(), "estimator": st.estimator}, out / "policy.pt",
                    method=spec.name, args=pol.args)
    with atomic_open(out / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(hist[0]))
        w.writeheader()
        w.writerows(hist)
    last = hist[-1]
    print(f"trained {spec.name} on {st.task}/{st.load} (seed {a.seed}) in {wall:.1f} s")
    print(format_table([[k, v] for k, v in last.items()], ["last epoch", "value"]))
    if "time/simulate_s" in last:
        print(f"time: simulation {last['time/simulate_s']:.1f} s, learning {last['time/learn_s']:.1f} s")
    print(f"checkpoint: {out / 'policy.pt'}   metrics: {out / 'metrics.csv'}")
    if args.json:
        emit_json({"checkpoint": str(out / "policy.pt"), "metrics_csv": str(out / "metrics.csv"), "wall_s": wall,
                   "method": spec.legacy or spec.name, "task": st.task, "load": st.load,
                   **{k.replace("/", "_"): v for k, v in last.items()}})
    return 0


# ------------------------------------------------------------------------------------------ policies
def is_cmdp_checkpoint(path: str, *, trust: bool = False) -> bool:
    """Whether ``path`` is a readable checkpoint of a CMDP method (header, or the old ``kind`` key)."""
    from agents.registry import get_method

    try:
        return get_method(read_checkpoint(path, trust=trust).header.method).family == "cmdp"
    except Exception:  # noqa: BLE001 - not a torch file, refused, unknown method: not one of ours
        return False


def load_policy(path: str, *, trust: bool = False, method: str | None = None):
    """``(policy, payload)`` of a CMDP checkpoint; with ``method``, refused unless it holds that method."""
    from agents.registry import get_method

    ck = read_checkpoint(path, trust=trust)
    spec = get_method(ck.header.method)
    if spec.load_policy is None or spec.family != "cmdp":
        raise ValueError(f"{path}: holds a {spec.name} checkpoint, not a MASLatency-CMDP-v0 policy")
    if method is not None and get_method(method).name != spec.name:
        raise ValueError(f"{path}: holds a {spec.name} policy, not {get_method(method).name}: run "
                         f"`maslat evaluate {spec.name} {path}`")
    return spec.load_policy(ck.payload), ck.payload


def _policy(args, spec, env_of):
    """``(policy, checkpoint payload or {})`` for ``spec``: loaded, built from the environment, or external."""
    if spec is None:  # from outside: an SB3 model or an entry point
        from maslat.external import load_external

        return load_external(sb3=getattr(args, "model", None), entry=getattr(args, "policy", None),
                             algo=getattr(args, "algo", None)), {}
    if spec.load_policy is not None:
        return load_policy(args.checkpoint, trust=args.trust_checkpoint, method=spec.name)
    if spec.name == "oracle":
        from agents.cmdp_oracle import LookaheadOracle

        return LookaheadOracle(env_of), {}
    from agents.cmdp_policies import make_baseline

    return make_baseline(spec.legacy, env_of()), {}


def evaluate_cmdp(args, spec=None) -> int:
    """Score one policy by the experiment's protocol (``agents.cmdp_experiment.evaluate``)."""
    import numpy as np
    import pandas as pd

    from agents.cmdp_experiment import CMDPExperimentConfig, default_slo, evaluate, summarise
    from envs.cmdp import MASLatencyCMDPEnv

    st = EvalSetting(**dataclass_kwargs(args, EvalSetting, prefix=SETTING))
    ck: dict = {}
    if spec is not None and spec.load_policy is not None:  # the checkpoint names the defaults of the world
        pol, ck = _policy(args, spec, None)
    task, load = st.task or ck.get("task", "gsm8k"), st.load or ck.get("load", "idle")
    estimator = st.estimator if st.estimator is not None else ck.get("estimator", "default")
    warmup_s = _default(CMDPExperimentConfig, "warmup_s")

    def env_of():
        return MASLatencyCMDPEnv(task, st.split, load=load, estimator=estimator, warmup_s=warmup_s)

    env = env_of()
    if not ck:
        pol, _ = _policy(args, spec, env_of)
    name = getattr(pol, "name", None) or ((spec.legacy or spec.name) if spec else "external")
    factors = list(st.slo_factor or default_slo(task)[0])
    n = min(st.num_queries, len(env.queries))
    perm = np.random.Generator(np.random.PCG64(np.random.SeedSequence([st.seed, 11]))).permutation(len(env.queries))
    queries = [int(q) for q in perm[:n]]
    with progress(n * len(factors), f"evaluate {name} on {task}/{load}", unit="episode") as bar:
        rows = pd.DataFrame(evaluate(pol, env, queries, factors, st.seed, load, bar.update))
    s = summarise(rows)
    m = s["regimes"][load][name]
    print(format_table([[k, m[k]] for k in METRIC_COLUMNS], ["metric", f"{name} on {load}"]))
    per = s["by_slo"][load][name]
    print(format_table([[f, v["slo_attainment"], v["goodput"], v["quality_pct"], v["latency_p95_s"]]
                        for f, v in per.items()], ["SLO factor", "attainment", "goodput", "quality %", "p95 s"]))
    if args.json:
        emit_json({"policy": name, "task": task, "load": load, "split": st.split, **m, "by_slo": per})
    return 0


def _default(cls: type, name: str):
    """The default of field ``name`` of dataclass ``cls`` (read, never repeated)."""
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)
