"""Validate a policy trained in simulation against live servers: ``maslat validate-policy``.

1. **Live.** ``MASLatencyEnv`` with a ``maslat.livebackend.LiveBackend`` runs the policy on the first queries of
   a split, ``concurrency`` at a time, every LLM call a streamed request to the live endpoint. The policy's
   actions are recorded per (query, attempt, layer).
2. **Simulated prediction, same queries.** The same queries at the same concurrency in the simulator, with the
   same environment seed and the *same actions* (replayed): a stochastic policy samples in the order its
   decisions come, which timing changes, so replaying is what makes the two runs the same architectures.
   Task outcomes and token counts depend only on the seed, the query and the actions, so score, CP tokens,
   calls, tokens and cost are identical by construction (the report checks it, query by query); the
   simulator predicts the *seconds*.
3. **The table** (``agents.lamas.summarize``, as ``maslat evaluate`` prints it): live, simulated and the
   prediction's error ``100 x (simulated - live) / live``; per query, the error of the critical-path seconds.
   The bar: ``|error| <= 5 %`` on the mean and p90 of the critical-path seconds, identical counts, and no
   failed call.
4. **Where the call seconds went** (``call_clock``, ``maslat.callclock``): summed over the calls, the client's
   seconds and the engine core's queue, prefill and decode (live: the server's own latency histograms over the
   run), simulated against live, so a critical-path miss reads as the engine's speed or as the serving path.

``MASLatency-CMDP-v0`` policies (PPO-Lagrangian, MasRouter, the baselines: ``validate_cmdp_policy``) go the same
way with one endpoint per model pool (the small and the large model), the Planner and the Executor live and the
``system`` observations from each pool's ``/metrics``: decisions are keyed by (query, node), quality, calls,
tokens and $ are identical by construction, and the simulator predicts the end-to-end seconds of each query
(``latency_s``; the bar is on their mean and p90) and what follows from them (SLO attainment, goodput). The live
seconds include the decisions' own compute (observation, estimator, policy: ``decision_s_per_query``, server
seconds), which the simulator's clock does not count: with short queries and a slow estimator it is what the
prediction misses.

A live call that failed (an HTTP error, a cut stream, no answer within ``request_timeout_s``) makes its query a
failure: score 0 in the live column, whatever the task model would have scored (the environment scores the
actions; only this layer knows the call never produced an answer). Such queries are counted
(``queries_with_failed_calls``) and left out of the per-query identity checks; ``maslat validate-policy`` exits 1.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["BAR_PCT", "CMDP_TIMING", "RecordingPolicy", "ReplayPolicy", "TIMING", "compare", "compare_cmdp",
           "validate_cmdp_policy", "validate_policy"]

BAR_PCT = 5.0
#: the quantities the simulator predicts (the rest of the table is identical by construction)
TIMING = ("cp_seconds_mean", "cp_seconds_p90")
_PER_QUERY_SAME = ("score", "cp_tokens", "llm_calls", "prompt_tokens", "completion_tokens", "retries", "num_layers")


def _key(obs: dict) -> tuple:
    """A decision's identity: the query (its frozen embedding, unique per query), the attempt and the layer."""
    return np.asarray(obs["query"], np.float32).tobytes(), int(obs["attempt"]), int(obs["layer"])


class RecordingPolicy:
    """Wraps a policy and records every action it takes (by query, attempt and layer)."""

    def __init__(self, policy):
        self.policy = policy
        self.actions: dict[tuple, np.ndarray] = {}

    def act(self, obs: dict, episode: int = 0) -> np.ndarray:
        a = self.policy.act(obs, episode=episode)
        self.actions[_key(obs)] = np.array(a)
        return a


class ReplayPolicy:
    """Takes the recorded actions again; a decision that was not recorded is an error (never a guess)."""

    def __init__(self, actions: dict[tuple, np.ndarray]):
        self.actions = actions

    def act(self, obs: dict, episode: int = 0) -> np.ndarray:
        try:
            return self.actions[_key(obs)]
        except KeyError:
            raise RuntimeError(f"the simulated run reached a decision the live run did not take (attempt "
                               f"{int(obs['attempt'])}, layer {int(obs['layer'])}): the runs diverged") from None


def _pct(sim: float, live: float) -> float | None:
    return 100.0 * (sim - live) / live if live else (0.0 if sim == live else None)


def failed_as_failures(live: Sequence[dict]) -> list[dict]:
    """The live infos with every query that had a failed call scored 0 (see the module docstring)."""
    return [{**x, "score": 0.0, "failed": True} if x.get("rejected_calls") else x for x in live]


def compare(live: Sequence[dict], simulated: Sequence[dict]) -> dict:
    """The side-by-side table, per-query checks and the bar (see the module docstring)."""
    from agents.lamas import summarize

    live = failed_as_failures(live)
    a, b = summarize(list(live)), summarize(list(simulated))
    table = {k: {"live": a[k], "simulated": b[k], "error_pct": _pct(b[k], a[k]),
                 "predicted": k in TIMING} for k in a}
    served = [(x, y) for x, y in zip(live, simulated, strict=True) if not x.get("rejected_calls")]
    mismatched = {f: int(sum(x[f] != y[f] for x, y in served)) for f in _PER_QUERY_SAME}
    rel = np.array([_pct(y["cp_seconds"], x["cp_seconds"]) for x, y in zip(live, simulated, strict=True)])
    rel = rel[[r is not None for r in rel]].astype(float) if len(rel) else rel
    failed = int(sum(x["rejected_calls"] for x in live))
    worst = max(TIMING, key=lambda k: abs(table[k]["error_pct"] or 0.0))
    passed = (all(table[k]["error_pct"] is not None and abs(table[k]["error_pct"]) <= BAR_PCT for k in TIMING)
              and not any(mismatched.values()) and failed == 0)
    if len(rel):
        per_query = {"median_abs": float(np.median(np.abs(rel))), "p90_abs": float(np.percentile(np.abs(rel), 90)),
                     "max_abs": float(np.max(np.abs(rel))), "mean": float(np.mean(rel))}
    else:
        per_query = dict.fromkeys(("median_abs", "p90_abs", "max_abs", "mean"))
    return {"table": table, "per_query_cp_seconds_error_pct": per_query,
            "mismatched_queries": mismatched, "failed_live_calls": failed,
            "queries_with_failed_calls": int(sum(bool(x.get("rejected_calls")) for x in live)),
            "bar": {"threshold_pct": BAR_PCT, "on": list(TIMING), "worst": worst,
                    "worst_error_pct": table[worst]["error_pct"], "passed": bool(passed)}}


def validate_policy(args, controller, endpoints: dict, *, split: str = "test", num_queries: int | None = None,
                    concurrency: int = 10, profile: str = "h100-llama-3.1-8b", replicas: int | None = None,
                    router: str = "least_outstanding", background_rate_per_s: float = 0.0,
                    on_done: Callable[[dict], None] | None = None, request_timeout_s: float = 120.0,
                    partial: list | None = None) -> dict:
    """Run a policy live and in simulation on the same queries and compare (the ``--json`` object).

    Args:
        args: the policy's ``agents.lamas.Args`` (method, task, seed, threshold, layers).
        controller: its controller, or ``None`` for a static baseline.
        endpoints: model pool -> ``maslat.livebackend.Endpoint`` (or URL); the environment uses pool ``"llm"``.
        split, num_queries: the first ``num_queries`` queries of this split (all by default).
        concurrency: queries in flight at once, live and simulated.
        profile, replicas, router, background_rate_per_s: the simulated side (``envs.ClusterConfig``); replicas
            default to the live endpoint's engines (its ``/metrics``).
        on_done: called with each live query's final info (for a progress bar).
        request_timeout_s: a live call without its answer after this many (server) seconds fails.
        partial: each live query's final info is appended here as it ends (what a caller saves when the run is
            interrupted or fails).
    """
    from agents.lamas import METHODS, make_policy
    from envs import ClusterConfig, MASLatencyEnv
    from envs.backend import BACKEND_POOL

    from .callclock import TalliedLiveBackend, TalliedSimBackend, call_clock, scrape_sums

    method = METHODS[args.method]

    def make_env(**kw) -> MASLatencyEnv:
        return MASLatencyEnv(args.task, split, execution=method.execution, variant=method.variant,
                             num_layers=args.num_layers, **kw)

    backend = TalliedLiveBackend(endpoints, request_timeout_s=request_timeout_s, prompt_salt=fresh_prompt_salt())

    def done(info: dict) -> None:
        if partial is not None:
            partial.append(info)
        if on_done is not None:
            on_done(info)

    live_env = make_env(backend=backend)
    try:
        live_env.reset(seed=args.seed)
        n = len(live_env.queries) if num_queries is None else min(num_queries, len(live_env.queries))
        queries = list(range(n))
        if len({_key({"query": e, "attempt": 0, "layer": 0}) for e in live_env.queries.embedding[:n]}) != n:
            raise ValueError("two of these queries have the same embedding: their decisions cannot be told apart")
        recorder = RecordingPolicy(make_policy(args, controller, record=False, stream=2))
        page = backend.pools[BACKEND_POOL].endpoint.metrics if BACKEND_POOL in backend.pools else None
        before = scrape_sums(page) if page else None
        t0 = time.perf_counter()
        live = live_env.rollout(recorder, queries, concurrency=concurrency, on_done=done)
        live_wall_s = time.perf_counter() - t0
        after = scrape_sums(page) if page else None
        engines, stats, time_scale = backend.engines(BACKEND_POOL), backend.stats(), backend.time_scale
    finally:
        live_env.close()
    cluster = ClusterConfig(profile=profile, replicas=replicas or engines, router=router,
                            background_rate_per_s=background_rate_per_s)
    sim_backend = TalliedSimBackend(cluster)
    sim_env = make_env(backend=sim_backend)
    sim_env.reset(seed=args.seed)
    t0 = time.perf_counter()
    simulated = sim_env.rollout(ReplayPolicy(recorder.actions), queries, concurrency=concurrency)
    return {"method": args.method, "task": args.task, "split": split, "queries": n, "concurrency": concurrency,
            "seed": args.seed, **compare(live, simulated),
            "call_clock": call_clock(backend.tally, before, after, sim_backend.tally),
            "live": {"endpoints": stats, "time_scale": time_scale, "wall_s": live_wall_s,
                     "prompt_salt": backend.prompt_salt},
            "simulated": {"profile": cluster.profile, "replicas": cluster.replicas, "router": cluster.router,
                          "background_rate_per_s": cluster.background_rate_per_s,
                          "wall_s": time.perf_counter() - t0},
            "policy_args": {f: getattr(args, f) for f in args.__dataclass_fields__ if f != "cluster"}}


# ------------------------------------------------------------------------------------------ MASLatency-CMDP-v0
#: the CMDP quantities the simulator predicts
CMDP_TIMING = ("latency_mean_s", "latency_p90_s")
_CMDP_SAME = ("quality", "num_calls", "prompt_tokens", "output_tokens", "cost_usd")


def _cmdp_key(obs: dict) -> tuple:
    return np.asarray(obs["query"], np.float32).tobytes(), int(obs["step"])


class _CMDPRecorder:
    def __init__(self, policy):
        self.policy, self.actions = policy, {}

    def act(self, obs: dict):
        a = self.policy.act(obs)
        self.actions[_cmdp_key(obs)] = a
        return a


class _CMDPReplay:
    def __init__(self, actions: dict):
        self.actions = actions

    def act(self, obs: dict):
        try:
            return self.actions[_cmdp_key(obs)]
        except KeyError:
            raise RuntimeError(f"the simulated run reached a decision the live run did not take (node "
                               f"{int(obs['step'])}): the runs diverged") from None


def _cmdp_row(info: dict) -> dict:
    calls = info["calls"]
    failed = bool(info["rejected_calls"])
    return {"quality": 0.0 if failed else info["quality"], "num_calls": info["num_calls"],
            "prompt_tokens": sum(c["prompt_tokens"] for c in calls), "output_tokens": sum(c["output_tokens"] for c in calls),
            "cost_usd": info["cost_usd"], "latency_s": info["latency_s"], "slo_s": info["slo_s"], "failed": failed}


def _cmdp_summary(rows: list[dict]) -> dict:
    lat = np.array([r["latency_s"] for r in rows])
    ok = np.array([r["latency_s"] <= r["slo_s"] for r in rows])
    q = np.array([r["quality"] for r in rows])
    return {"quality_pct": 100 * float(q.mean()), "calls_per_query": float(np.mean([r["num_calls"] for r in rows])),
            "prompt_tokens_per_query": float(np.mean([r["prompt_tokens"] for r in rows])),
            "output_tokens_per_query": float(np.mean([r["output_tokens"] for r in rows])),
            "cost_usd_per_query": float(np.mean([r["cost_usd"] for r in rows])),
            "latency_mean_s": float(lat.mean()), "latency_p90_s": float(np.percentile(lat, 90)),
            "slo_attainment": float(ok.mean()), "goodput": float(np.mean((q > 0) & ok))}


def fresh_prompt_salt() -> int:
    """A salt no earlier run used (``LiveBackend(prompt_salt=...)``): the simulated replay starts with an empty
    prefix cache, so the live run must not find its prompts cached by an earlier validation on the same server.
    Drawn from the OS on purpose: it only renames synthetic token ids; every figure compared is unaffected."""
    return int.from_bytes(os.urandom(4), "little") | 1


def compare_cmdp(live: Sequence[dict], simulated: Sequence[dict]) -> dict:
    """The CMDP side-by-side table and bar (the module docstring), in ``compare``'s layout."""
    lr, sr = [_cmdp_row(x) for x in live], [_cmdp_row(x) for x in simulated]
    a, b = _cmdp_summary(lr), _cmdp_summary(sr)
    predicted = (*CMDP_TIMING, "slo_attainment", "goodput")
    table = {k: {"live": a[k], "simulated": b[k], "error_pct": _pct(b[k], a[k]), "predicted": k in predicted}
             for k in a}
    served = [(x, y) for x, y in zip(lr, sr, strict=True) if not x["failed"]]
    mismatched = {f: int(sum(x[f] != y[f] for x, y in served)) for f in _CMDP_SAME}
    rel = np.array([_pct(y["latency_s"], x["latency_s"]) for x, y in zip(lr, sr, strict=True)], dtype=float)
    failed = int(sum(x["rejected_calls"] for x in live))
    worst = max(CMDP_TIMING, key=lambda k: abs(table[k]["error_pct"] or 0.0))
    passed = (all(table[k]["error_pct"] is not None and abs(table[k]["error_pct"]) <= BAR_PCT for k in CMDP_TIMING)
              and not any(mismatched.values()) and failed == 0)
    return {"table": table, "per_query_latency_error_pct": {
                "median_abs": float(np.median(np.abs(rel))), "p90_abs": float(np.percentile(np.abs(rel), 90)),
                "max_abs": float(np.max(np.abs(rel))), "mean": float(np.mean(rel))},
            "mismatched_queries": mismatched, "failed_live_calls": failed,
            "queries_with_failed_calls": int(sum(x["failed"] for x in lr)),
            "bar": {"threshold_pct": BAR_PCT, "on": list(CMDP_TIMING), "worst": worst,
                    "worst_error_pct": table[worst]["error_pct"], "passed": bool(passed)}}


def validate_cmdp_policy(policy, endpoints: dict, *, task: str, name: str = "policy", split: str = "test",
                         num_queries: int | None = None, concurrency: int = 1, seed: int = 0,
                         slo_factor: float = 1.5, estimator="default", replicas: dict | None = None,
                         request_timeout_s: float = 120.0, on_done: Callable[[dict], None] | None = None,
                         partial: list | None = None) -> dict:
    """Run a ``MASLatency-CMDP-v0`` policy live and in simulation on the same queries and compare.

    Args:
        policy: ``act(obs) -> (model, strategy)`` (``agents.cmdp_policies``, a trained policy).
        endpoints: model name (``env.model_names``: the pools) -> ``Endpoint`` or URL, one per model.
        slo_factor: every query's SLO in reference latencies (the SLO does not change the calls; it is in the
            observations and in the attainment rows).
        replicas: the simulated replicas per model (default: each endpoint's engines, from its ``/metrics``).
        The rest as ``validate_policy``: the simulated pools carry no background load.
    """
    from dataclasses import replace

    from envs.cmdp import MASLatencyCMDPEnv
    from envs.cmdp_catalog import default_models
    from envs.loads import LoadRegime

    from .livebackend import LiveBackend

    models = default_models()
    names = [m.name for m in models]
    if sorted(endpoints) != sorted(names):
        raise ValueError(f"give one endpoint per model pool, named {names} (--endpoints "
                         f"{' '.join(n + '=URL' for n in names)}); got {sorted(endpoints)}")
    quiet = LoadRegime(name="none", phases=(tuple(0.0 for _ in models),))

    def make_env(**kw) -> MASLatencyCMDPEnv:
        return MASLatencyCMDPEnv(task, split, slo_factor=slo_factor, estimator=estimator, warmup_s=0.0, load=quiet,
                                 cost="violation", **kw)

    def done(info: dict) -> None:
        for f in (partial.append if partial is not None else None, on_done):
            if f is not None:
                f(info)

    backend = LiveBackend(endpoints, request_timeout_s=request_timeout_s, prompt_salt=fresh_prompt_salt())
    live_env = make_env(backend=backend)
    try:
        live_env.start_world(seed)
        n = len(live_env.queries) if num_queries is None else min(num_queries, len(live_env.queries))
        if len({e.astype(np.float32).tobytes() for e in live_env.queries.embedding[:n]}) != n:
            raise ValueError("two of these queries have the same embedding: their decisions cannot be told apart")
        recorder = _CMDPRecorder(policy)
        t0 = time.perf_counter()
        live = live_env.rollout(recorder, list(range(n)), concurrency=concurrency, on_done=done)
        live_wall_s = time.perf_counter() - t0
        decision_s = live_env.decision_wall_s / (backend.time_scale or 1.0)
        engines = {m: backend.engines(m) for m in names}
        stats, time_scale = backend.stats(), backend.time_scale
    finally:
        live_env.close()
    reps = {m: (replicas or {}).get(m) or engines[m] for m in names}
    sim_env = make_env(models=tuple(replace(m, replicas=reps[m.name]) for m in models))
    sim_env.start_world(seed)
    t0 = time.perf_counter()
    simulated = sim_env.rollout(_CMDPReplay(recorder.actions), list(range(n)), concurrency=concurrency)
    return {"method": name, "env": "MASLatency-CMDP-v0", "task": task, "split": split, "queries": n,
            "concurrency": concurrency, "seed": seed, "slo_factor": slo_factor, **compare_cmdp(live, simulated),
            "live": {"endpoints": stats, "time_scale": time_scale, "wall_s": live_wall_s, "prompt_salt": backend.prompt_salt,
                     "decision_s_per_query": decision_s / max(n, 1)},
            "simulated": {"profiles": {m.name: m.profile for m in models}, "replicas": reps,
                          "wall_s": time.perf_counter() - t0}}
