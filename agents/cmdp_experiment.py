"""``maslat experiment cmdp``: every policy, every load regime, a range of SLOs, paired and seeded.

Protocol, per seed:

1. Train one PPO-Lagrangian policy per regime on the train split (SLO factor drawn per episode from
   ``train_slo_factor``, one continuous simulated world); train the MasRouter baseline once (its utility has
   no latency in it, so the regime does not matter to it).
2. Evaluate every policy on the same ``eval_queries`` test queries at every SLO factor of ``slo_factors``.
   Each evaluation episode starts from ``reset(seed=s, options={"query": q, "slo_factor": f})``: the same world
   for every policy (common random numbers), so differences between policies are differences between their
   choices, in the regime's **steady state** (below).

Background load (``train_background``, ``eval_background``): by default both phases replay background tapes
(``envs.bgtape``, an approximation: the agent's calls served in closed form against background simulated once
per regime and seed). Training runs on one tape per (regime, seed); evaluation on one tape per (regime, seed)
too (another stream), every episode starting at its own seeded offset on it (``MASLatencyCMDPEnv(tape_seed=)``).
``"exact"`` simulates every background request next to the agent's calls: in evaluation a fresh world per
episode seed, warmed up for ``warmup_s``. The summary's ``background`` says which each phase used and the
warm-up.

**Protocol change (steady state, ``warmup_s`` 60 s, was 20 s).** Until this change the exact evaluation started
every episode 20 s after a cold start, while ``busy`` was still ramping up (measured over 6 seeds: ~280 requests
running at 20 s, 328 at 30 s, ~370 from 60 s on, where it stays), so it measured a transient that training (a
continuous world) never sees and that the tapes (recorded after the warm-up, replayed from offsets spread over
600 s) do not hold. From 60 s on every regime is in its steady state, so the exact and the tape evaluations
measure the same thing and agree within seed noise (paired, every policy on GSM8K and HumanEval busy: 71 of
72 figures within 2 seed sd, HumanEval p50 latency still 7-12 % higher on the tape; README and
``tests/test_cmdp_experiment.py``). Figures measured
under the old protocol (20 s) are not comparable under ``busy``: p50 latency is 13-30 % higher at steady state.
``--warmup-s 20 --eval-background exact`` reproduces the old protocol.

Per (regime, policy): quality (%), SLO attainment, goodput (the fraction of queries both correct and within
the SLO), p50/p95 latency, $ per query, calls per query; pooled over the SLO factors and per factor, then
mean +- std over seeds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Literal

import numpy as np
import pandas as pd

from envs.cmdp import MASLatencyCMDPEnv

from .cmdp_oracle import LookaheadOracle
from .cmdp_policies import BASELINES, make_baseline
from .masrouter import MasRouterArgs, train_masrouter
from .ppo_lagrangian import ENV_COST, PPOLagArgs, train_ppo_lagrangian

__all__ = ["CMDPExperimentConfig", "POLICIES", "PROTOCOL", "SLO_FACTORS", "STEADY_WARMUP_S", "TRAIN_SLO_FACTOR", "cmdp_trial", "default_slo", "evaluate", "evaluate_all", "findings",
           "masrouter_trial", "run_cmdp_experiment", "summarise", "summarise_per_seed"]

POLICIES = ("ppo_lagrangian", "masrouter", *BASELINES, "oracle")

#: SLO factors (x the query's idle reference latency) evaluated, and the range trained on, per task kind.
#: Code answers hardly compress (the program is the answer: Flash keeps ~60 % of a DeepThink completion,
#: Concise ~68 %), so under the busy regime's 3-5x slower decoding no plan meets a code SLO below ~2x the
#: idle reference (the fastest plan meets 1x on 50 % of HumanEval queries, 2x on 95 %); math answers shrink
#: 5-40x with Concise/Flash, and 0.75x is feasible. An SLO no plan can meet tests only the load.
SLO_FACTORS = {"math": (0.75, 1.0, 1.5, 2.0), "code": (2.0, 2.5, 3.0, 4.0)}
TRAIN_SLO_FACTOR = {"math": (0.6, 2.2), "code": (1.8, 4.5)}
_EVAL_TAPE_STREAM = 31
#: warm-up after which every regime is in its steady state (``busy``: ~370 requests running from ~50 s on)
STEADY_WARMUP_S = 60.0
PROTOCOL = "steady-state: episodes meet each regime's steady state (warm-up >= 60 s); since issue 18"
OLD_PROTOCOL = "ramp: episodes start before busy load reaches its steady state (warm-up < 60 s, the old 20 s)"


def default_slo(task: str) -> tuple[tuple[float, ...], tuple[float, float]]:
    """(evaluated SLO factors, training range) for ``task``."""
    from envs.tasks import make_task

    kind = make_task(task).kind
    return SLO_FACTORS[kind], TRAIN_SLO_FACTOR[kind]


@dataclass(frozen=True, slots=True, kw_only=True)
class CMDPExperimentConfig:
    """Attributes:
        task: benchmark of the task models.
        seeds: training and evaluation seeds.
        regimes: load regimes (``envs.loads.REGIMES``).
        slo_factors: evaluation SLOs, as multiples of each query's reference latency (``None``: the task
            kind's ``SLO_FACTORS``).
        train_slo_factor: range the training SLO factor is drawn from, wider than the evaluated one
            (``None``: the task kind's ``TRAIN_SLO_FACTOR``).
        eval_queries: test queries evaluated (the first ones of a seeded permutation of the test split).
        policies: which of ``POLICIES`` to run.
        warmup_s: background seconds simulated before the first query of a world (an exact evaluation: before
            every query; a tape: before the tape starts). 60 s: the regimes' steady state (``busy`` ramps up
            until ~50 s after a cold start); the protocol before this default was 20 s (module docstring).
        ppo: PPO-Lagrangian arguments (its seed is replaced by each experiment seed).
        masrouter: MasRouter arguments.
        estimator: the environments' estimator (``"default"``: the shipped bundle).
        train_background: the training worlds' background: ``"tape"`` (``envs.bgtape``: replayed from one
            tape per regime and seed, an approximation several times faster) or ``"exact"`` (every background
            request simulated next to the agent's calls).
        eval_background: the evaluation worlds' background: ``"tape"`` (one tape per regime and seed, every
            episode starting at its own seeded offset on it: ``MASLatencyCMDPEnv(tape_seed=...)``, ~8x cheaper
            than exact) or ``"exact"`` (a fresh world per episode seed, warmed up for ``warmup_s``). Both meet
            the regime's steady state (``warmup_s`` >= 60 s) and agree within seed noise (module docstring).
    """

    task: str = "gsm8k"
    seeds: tuple[int, ...] = (0, 1, 2)
    regimes: tuple[str, ...] = ("idle", "busy", "bursty", "shift")
    slo_factors: tuple[float, ...] | None = None
    train_slo_factor: tuple[float, float] | None = None
    eval_queries: int = 60
    policies: tuple[str, ...] = POLICIES
    warmup_s: float = 60.0
    ppo: PPOLagArgs = field(default_factory=PPOLagArgs)
    masrouter: MasRouterArgs = field(default_factory=MasRouterArgs)
    estimator: object = "default"
    train_background: Literal["exact", "tape"] = "tape"
    eval_background: Literal["exact", "tape"] = "tape"

    def __post_init__(self) -> None:
        for name in ("train_background", "eval_background"):
            if getattr(self, name) not in ("exact", "tape"):
                raise ValueError(f"{name} must be 'exact' or 'tape' (envs.bgtape's approximation), got "
                                 f"{getattr(self, name)!r}")
        bad = [p for p in self.policies if p not in POLICIES]
        if bad:
            raise ValueError(f"unknown policies {bad}; choose from {POLICIES}")
        if not self.seeds or self.eval_queries < 1 or (self.slo_factors is not None and not self.slo_factors):
            raise ValueError("need at least one seed, one evaluation query and one SLO factor")
        ev, tr = default_slo(self.task)
        if self.slo_factors is None:
            object.__setattr__(self, "slo_factors", ev)
        if self.train_slo_factor is None:
            object.__setattr__(self, "train_slo_factor", tr)


def _env(cfg: CMDPExperimentConfig, regime: str, split: str, estimator, **kw) -> MASLatencyCMDPEnv:
    return MASLatencyCMDPEnv(cfg.task, split, load=regime, estimator=estimator, warmup_s=cfg.warmup_s, **kw)


def _eval_env(cfg: CMDPExperimentConfig, regime: str, seed: int, estimator) -> MASLatencyCMDPEnv:
    """The test-split world of one (seed, regime) evaluation: exact, or every episode on one shared tape of its
    own seed (not the training tape's, nor any episode's: ``SeedSequence([seed, regime, 31])``)."""
    if cfg.eval_background == "exact":
        return _env(cfg, regime, "test", estimator)
    return _env(cfg, regime, "test", estimator, background="tape", tape_seed=_eval_tape_seed(seed, regime))


def _eval_tape_seed(seed: int, regime: str) -> int:
    return int(np.random.SeedSequence([seed, sum(regime.encode()), _EVAL_TAPE_STREAM]).generate_state(1)[0]
               & 0x7FFFFFFF)


def _episode_seed(seed: int, regime: str, i: int, j: int) -> int:
    return int(np.random.SeedSequence([seed, sum(regime.encode()), i, j]).generate_state(1)[0] & 0x7FFFFFFF)


def evaluate(policy, env: MASLatencyCMDPEnv, queries: Sequence[int], slo_factors: Sequence[float], seed: int,
             regime: str, progress: Callable[[int], None] | None = None) -> list[dict]:
    """One row per (query, SLO factor): the episode's outcome under ``policy``."""
    return evaluate_all([policy], env, queries, slo_factors, seed, regime, progress)


def evaluate_all(policies: Sequence, env: MASLatencyCMDPEnv, queries: Sequence[int], slo_factors: Sequence[float],
                 seed: int, regime: str, progress: Callable[[int], None] | None = None,
                 policy_s: dict[str, float] | None = None) -> list[dict]:
    """``evaluate`` for several policies, episode by episode: every policy runs episode (i, j) before any
    runs the next, so the episode's warmed-up world is simulated once and copied for the others
    (``envs.background``). Each policy still sees its episodes in the same order, so the rows (returned
    policy by policy, as ``evaluate`` one policy after another would) are the same bit for bit.

    ``policy_s`` (if given) accumulates each policy's CPU seconds by name (``time.process_time``: on a shared
    machine wall time measures the neighbours): the first policy of an episode pays for its warm-up."""
    rows: list[list[dict]] = [[] for _ in policies]
    clock = time.process_time
    for i, q in enumerate(queries):
        for j, f in enumerate(slo_factors):
            s = _episode_seed(seed, regime, i, j)
            for k, policy in enumerate(policies):
                t0 = clock()
                rows[k].append(_episode(policy, env, s, int(q), float(f), seed, regime))
                if policy_s is not None:
                    policy_s[policy.name] = policy_s.get(policy.name, 0.0) + clock() - t0
                if progress is not None:
                    progress(1)
    return [r for per in rows for r in per]


def _episode(policy, env: MASLatencyCMDPEnv, s: int, q: int, f: float, seed: int, regime: str) -> dict:
    opts = {"query": q, "slo_factor": f}
    obs, _ = env.reset(seed=s, options=opts)
    if hasattr(policy, "begin"):
        policy.begin(env, s, opts)
    while True:
        obs, _, term, _, info = env.step(env.encode_action(*policy.act(obs)))
        if term:
            break
    return {"policy": policy.name, "regime": regime, "seed": seed, "query": q, "slo_factor": f,
            "topology": info["topology"], "quality": info["quality"], "latency_s": info["latency_s"],
            "slo_s": info["slo_s"], "attained": not info["slo_violated"], "goodput": info["goodput"],
            "cost_usd": info["cost_usd"], "calls": info["num_calls"],
            "large_share": float(np.mean([c["model"] == env.model_names[env.reference_model] for c in info["calls"]])),
            "deepthink_share": float(np.mean([c["strategy"] == "DeepThink" for c in info["calls"]]))}


def _metrics(d: pd.DataFrame) -> dict:
    return {"quality_pct": 100.0 * d.quality.mean(), "slo_attainment": float(d.attained.mean()),
            "goodput": float(d.goodput.mean()), "latency_p50_s": float(d.latency_s.quantile(0.5)),
            "latency_p90_s": float(d.latency_s.quantile(0.9)), "latency_p95_s": float(d.latency_s.quantile(0.95)),
            "cost_usd_per_query": float(d.cost_usd.mean()),
            "calls_per_query": float(d.calls.mean()), "large_model_share": float(d.large_share.mean()),
            "deepthink_share": float(d.deepthink_share.mean()), "episodes": int(len(d))}


def summarise(rows: pd.DataFrame) -> dict:
    """``{regime: {policy: metrics}}`` pooled over SLO factors (mean over seeds, with ``*_std``), and
    ``{regime: {policy: {factor: metrics}}}``."""
    pooled: dict = {}
    by_slo: dict = {}
    for (reg, pol), d in rows.groupby(["regime", "policy"], sort=False):
        per_seed = [_metrics(x) for _, x in d.groupby("seed")]
        m = {k: float(np.mean([p[k] for p in per_seed])) for k in per_seed[0]}
        m.update({f"{k}_std": float(np.std([p[k] for p in per_seed])) for k in ("quality_pct", "slo_attainment",
                                                                                "goodput")})
        pooled.setdefault(reg, {})[pol] = m
        by_slo.setdefault(reg, {})[pol] = {f"{f:g}": _metrics(x) for f, x in d.groupby("slo_factor")}
    return {"regimes": pooled, "by_slo": by_slo}


def summarise_per_seed(rows: pd.DataFrame) -> list[dict]:
    """One entry per seed with the same keys as the means (``regimes``, ``by_slo``, ``findings``), each over
    that seed's episodes alone: a pooled mean can hide one seed that misses the target."""
    out = []
    for seed, d in rows.groupby("seed", sort=True):
        one = summarise(d)
        one["findings"] = findings(one)
        out.append({"seed": int(seed), **one})
    return out


def run_cmdp_experiment(cfg: CMDPExperimentConfig, *, progress: Callable[[int], None] | None = None,
                        log: Callable[[str], None] | None = None, map_fn: Callable | None = None) -> dict:
    """Train and evaluate (module docstring); returns the summary, the per-episode rows and the curves.

    The work is two rounds of independent trials: MasRouter per seed, then (seed, regime) (``cmdp_trial``).
    ``map_fn(fn, trials) -> results`` runs each round (default: serially, in this process;
    ``maslat.ray_runner.RayMap``: as Ray tasks, without ``progress``/``log``). Same results either way."""
    from envs.estimators import load_estimator

    t_start, c_start = time.perf_counter(), time.process_time()
    probe = MASLatencyCMDPEnv(cfg.task, "test", estimator="none")
    est = load_estimator(cfg.estimator, probe.model_names)
    qrng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([cfg.seeds[0], 11])))
    queries = [int(q) for q in qrng.permutation(len(probe.queries))[:cfg.eval_queries]]
    run = map_fn or (lambda f, xs: [f(x) for x in xs])
    local = map_fn is None
    mas_outs = run(partial(masrouter_trial, cfg=cfg, est=est, progress=progress if local else None),
                   list(cfg.seeds)) if "masrouter" in cfg.policies else [None] * len(cfg.seeds)
    mas_of = dict(zip(cfg.seeds, mas_outs, strict=True))
    trials = [(seed, regime, mas_of[seed] and mas_of[seed]["router"]) for seed in cfg.seeds for regime in cfg.regimes]
    outs = run(partial(cmdp_trial, cfg=cfg, est=est, queries=tuple(queries), progress=progress if local else None,
                       log=log if local else None), trials)
    rows, curves = [], {}
    timing = {"train_ppo_s": {}, "train_masrouter_s": [], "evaluate_s": {}, "evaluate_policy_cpu_s": {},
              "cpu_s": {"train_ppo": {}, "train_masrouter": [], "evaluate": {}}}
    cpu = timing["cpu_s"]
    for (seed, regime, _), out in zip(trials, outs, strict=True):
        if mas_of[seed] is not None and regime == cfg.regimes[0]:
            timing["train_masrouter_s"].append(mas_of[seed]["train_s"])
            cpu["train_masrouter"].append(mas_of[seed]["train_cpu_s"])
            curves[f"masrouter/seed{seed}"] = mas_of[seed]["history"]
        if out["train_s"] is not None:
            timing["train_ppo_s"].setdefault(regime, []).append(out["train_s"])
            cpu["train_ppo"].setdefault(regime, []).append(out["train_cpu_s"])
            curves[f"ppo_lagrangian/{regime}/seed{seed}"] = out["history"]
        timing["evaluate_s"].setdefault(regime, []).append(out["evaluate_s"])
        cpu["evaluate"].setdefault(regime, []).append(out["evaluate_cpu_s"])
        per = timing["evaluate_policy_cpu_s"].setdefault(regime, {})
        for name, sec in out["evaluate_policy_s"].items():
            per[name] = per.get(name, 0.0) + sec
        rows += out["rows"]
    df = pd.DataFrame(rows)
    cpu["total"] = time.process_time() - c_start  # this process's (without map_fn: the whole run's)
    out = {"task": cfg.task, "seeds": len(cfg.seeds), **summarise(df), "slo_factors": list(cfg.slo_factors),
           "eval_queries": cfg.eval_queries, "timing": timing, "wall_s": time.perf_counter() - t_start,
           "background": {"train": cfg.train_background, "evaluate": cfg.eval_background, "warmup_s": cfg.warmup_s,
                          "protocol": PROTOCOL if cfg.warmup_s >= STEADY_WARMUP_S else OLD_PROTOCOL},
           "config": {k: (asdict(v) if hasattr(v, "__dataclass_fields__") else v) for k, v in
                      ((f, getattr(cfg, f)) for f in cfg.__dataclass_fields__) if k != "estimator"}}
    out["findings"] = findings(out)
    out["per_seed"] = summarise_per_seed(df)
    return {"summary": out, "rows": df, "curves": curves}


def masrouter_trial(seed: int, *, cfg: CMDPExperimentConfig, est, progress: Callable[[int], None] | None = None) -> dict:
    """Train the load-blind MasRouter for one seed (idle world; the regime does not enter its utility). Its
    observations (query, role) and utility (quality, $) do not depend on latency, so ``train_background`` only
    changes how fast it trains: tape and exact give the same router, bit for bit
    (``tests/test_cmdp_experiment.py``)."""
    t0, c0 = time.perf_counter(), time.process_time()
    menv = _env(cfg, "idle", "train", est, slo_factor=cfg.train_slo_factor, background=cfg.train_background)
    mas, mh = train_masrouter(menv, MasRouterArgs(**{**asdict(cfg.masrouter), "seed": seed}), progress=progress)
    return {"router": mas, "history": mh, "train_s": time.perf_counter() - t0,
            "train_cpu_s": time.process_time() - c0}


def cmdp_trial(trial: tuple, *, cfg: CMDPExperimentConfig, est, queries: Sequence[int],
               progress: Callable[[int], None] | None = None, log: Callable[[str], None] | None = None) -> dict:
    """One (seed, regime, trained MasRouter or None): train PPO-Lagrangian, evaluate every policy."""
    seed, regime, mas = trial
    pols, hist, train_s, train_cpu_s = [], None, None, None
    if "ppo_lagrangian" in cfg.policies:
        t0, c0 = time.perf_counter(), time.process_time()
        tenv = _env(cfg, regime, "train", est, slo_factor=cfg.train_slo_factor, background=cfg.train_background,
                    cost=ENV_COST[cfg.ppo.cost])
        ppo, hist = train_ppo_lagrangian(tenv, PPOLagArgs(**{**asdict(cfg.ppo), "seed": seed}), progress=progress)
        train_s, train_cpu_s = time.perf_counter() - t0, time.process_time() - c0
        if log is not None:
            log(f"seed {seed} {regime}: PPO-Lagrangian trained in {train_s:.0f} s (lambda "
                f"{hist[-1]['constraint/lambda']:.2f}, train attainment {hist[-1]['latency/slo_attainment']:.3f})")
        pols.append(ppo)
    if mas is not None:
        pols.append(mas)
    t0, c0 = time.perf_counter(), time.process_time()
    eenv = _eval_env(cfg, regime, seed, est)
    pols += [make_baseline(b, eenv) for b in BASELINES if b in cfg.policies]
    if "oracle" in cfg.policies:
        pols.append(LookaheadOracle(lambda: _eval_env(cfg, regime, seed, est)))
    policy_s: dict[str, float] = {}
    rows = evaluate_all(pols, eenv, queries, cfg.slo_factors, seed, regime, progress, policy_s)
    return {"rows": rows, "history": hist, "train_s": train_s, "evaluate_s": time.perf_counter() - t0,
            "train_cpu_s": train_cpu_s, "evaluate_cpu_s": time.process_time() - c0, "evaluate_policy_s": policy_s}


def episodes_total(cfg: CMDPExperimentConfig) -> int:
    """Progress units: PPO steps, MasRouter training queries and evaluation episodes."""
    from envs.tasks import make_task

    task = make_task(cfg.task)
    per_seed = (cfg.ppo.total_steps // cfg.ppo.steps_per_epoch * cfg.ppo.steps_per_epoch * len(cfg.regimes)
                * ("ppo_lagrangian" in cfg.policies))
    if "masrouter" in cfg.policies:
        per_seed += task.num_train * cfg.masrouter.epochs
    n_eval = min(cfg.eval_queries, task.num_test)
    per_seed += len(cfg.regimes) * len(cfg.policies) * n_eval * len(cfg.slo_factors)
    return per_seed * len(cfg.seeds)


def findings(summary: dict, target: float = 0.95) -> dict:
    """Per regime: does PPO-Lagrangian attain the SLO on >= ``target`` of queries (pooled and at every SLO
    factor), is its goodput the highest of the non-oracle policies, and how MasRouter fares."""
    out = {}
    for reg, pols in summary["regimes"].items():
        if "ppo_lagrangian" not in pols:
            continue
        ppo = pols["ppo_lagrangian"]
        others = {p: m["goodput"] for p, m in pols.items() if p not in ("ppo_lagrangian", "oracle")}
        best = max(others, key=others.get) if others else None
        per = summary["by_slo"][reg]["ppo_lagrangian"]
        out[reg] = {"ppo_slo_attainment": ppo["slo_attainment"], "ppo_meets_target": ppo["slo_attainment"] >= target,
                    "ppo_min_attainment_over_slos": min(v["slo_attainment"] for v in per.values()),
                    "ppo_goodput": ppo["goodput"], "best_other": best,
                    "best_other_goodput": others.get(best) if best else None,
                    "ppo_highest_goodput": best is None or ppo["goodput"] >= others[best],
                    "oracle_goodput": pols.get("oracle", {}).get("goodput"),
                    "masrouter_slo_attainment": pols.get("masrouter", {}).get("slo_attainment")}
    return out
