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

A live call that failed (an HTTP error, a cut stream, no answer within ``request_timeout_s``) makes its query a
failure: score 0 in the live column, whatever the task model would have scored (the environment scores the
actions; only this layer knows the call never produced an answer). Such queries are counted
(``queries_with_failed_calls``) and left out of the per-query identity checks; ``maslat validate-policy`` exits 1.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["BAR_PCT", "RecordingPolicy", "ReplayPolicy", "TIMING", "compare", "validate_policy"]

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

    from .livebackend import LiveBackend

    method = METHODS[args.method]

    def make_env(**kw) -> MASLatencyEnv:
        return MASLatencyEnv(args.task, split, execution=method.execution, variant=method.variant,
                             num_layers=args.num_layers, **kw)

    backend = LiveBackend(endpoints, request_timeout_s=request_timeout_s)

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
        t0 = time.perf_counter()
        live = live_env.rollout(recorder, queries, concurrency=concurrency, on_done=done)
        live_wall_s = time.perf_counter() - t0
        engines, stats, time_scale = backend.engines(BACKEND_POOL), backend.stats(), backend.time_scale
    finally:
        live_env.close()
    cluster = ClusterConfig(profile=profile, replicas=replicas or engines, router=router,
                            background_rate_per_s=background_rate_per_s)
    sim_env = make_env(cluster=cluster)
    sim_env.reset(seed=args.seed)
    t0 = time.perf_counter()
    simulated = sim_env.rollout(ReplayPolicy(recorder.actions), queries, concurrency=concurrency)
    return {"method": args.method, "task": args.task, "split": split, "queries": n, "concurrency": concurrency,
            "seed": args.seed, **compare(live, simulated),
            "live": {"endpoints": stats, "time_scale": time_scale, "wall_s": live_wall_s},
            "simulated": {"profile": cluster.profile, "replicas": cluster.replicas, "router": cluster.router,
                          "background_rate_per_s": cluster.background_rate_per_s,
                          "wall_s": time.perf_counter() - t0},
            "policy_args": {f: getattr(args, f) for f in args.__dataclass_fields__ if f != "cluster"}}
