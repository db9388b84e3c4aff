"""``MASLatency-APWA-v0``: choose how an APWA manager decomposes a query over N items, under live load."""

from __future__ import annotations

from dataclasses import dataclass

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from .apwa import WORKLOADS, APWAConfig, APWARun, Decomposition, RunResult, apwa_sim_backend, pool_states
from .backend import Backend
from .cmdp_catalog import ModelEntry
from .decision import DecisionEnv, Episode, observation_space
from .infos import APWAFinalInfo, APWAResetInfo

__all__ = ["FAN_INS", "GROUP_SIZES", "IN_FLIGHT", "MASLatencyAPWAEnv"]

GROUP_SIZES = (1, 2, 4, 8, 16, 32, 64)
FAN_INS = (2, 4, 8, 16, None)
IN_FLIGHT = (4, 16, 64, None)
_WORKLOAD_NAMES = tuple(WORKLOADS)


@dataclass(slots=True, kw_only=True, eq=False)
class _Episode(Episode):
    run: APWARun


class MASLatencyAPWAEnv(DecisionEnv):
    """The APWA manager's decomposition choice for one query over a table of N items.

    ## Description
    APWA (arXiv 2605.15132, docs/system_aware.md#10-apwa-architecture) on the simulated cluster of the CMDP env (one vLLM pool
    per model of ``envs.cmdp_catalog``, background load of ``envs.loads``). An episode is one query over a
    table of N rows (summarise, extract or redact; ``envs.apwa.workloads``). At the decision instant the
    world has served ``warmup_s`` of background; the policy sees the table's metadata and the pools' live
    gauges, and picks the decomposition: rows per subproblem (the fan-out width is ceil(N / rows)), the
    merge fan-in (hence the hierarchy depth), the concurrency bound, and which pools serve the workers and
    the aggregator. The manager's call, the workers, retries and merges then run to the end
    (``envs.apwa.executor``) and the episode ends.

    ## Action space
    ``MultiDiscrete([7, 5, 4, M + 1, M + 1])``: rows per subproblem ``GROUP_SIZES[a0]`` (capped at N); fan-in
    ``FAN_INS[a1]`` (``None``: one flat merge); calls in flight ``IN_FLIGHT[a2]`` (``None``: no bound);
    worker pool and aggregator pool (``0..M-1``: that model's pool, ``M``: all pools, spread by the registry).

    ## Observation space
    A single-level ``Dict`` (keys sorted; ``flatten_obs=True`` gives its flattening, a ``Box``):

    | Key | Type | Meaning | Unit |
    |---|---|---|---|
    | ``items`` | Box(1) | rows in the table, N | count |
    | ``row_tokens`` | Box(2) | mean input tokens per row (metadata), expected output tokens per row | tokens |
    | ``system`` | Box(4 M) | per pool: waiting and running requests, KV-cache usage, TTFT EMA | req, req, fraction, ms |
    | ``workload`` | Discrete(3) | the job (``envs.apwa.WORKLOADS`` order) | - |

    ## Rewards
    One step: ``semantic_utility - latency_weight * makespan_s / 60``. Utility is the mean over rows of the
    value that reached the final output (0 for a lost row; long contexts keep less, RULER); the makespan is
    from the query's arrival to its last call.

    ## Costs
    ``info["cost"]``: seconds beyond ``slo_s`` (0 without an SLO). Components under ``info["apwa"]``
    (``RunResult.summary()``) and flat keys ``makespan_s``, ``structural_completeness``,
    ``semantic_utility``, ``tokens``, ``lost_items``, ``width``, ``depth``, with ``workload``, ``items``,
    ``seed`` and ``preemptions``, ``kv_peak`` (simulator only, else ``None``; ``envs.infos.APWAFinalInfo``).

    ## Episode end
    Terminates after the one step. Never truncated.

    ## Arguments
    ``gym.make("MASLatency-APWA-v0", workload="mix", items=(10, 30, 100), load="idle", models=None,
    latency_weight=0.05, slo_s=None, warmup_s=30.0, fail_prob=0.02, flatten_obs=False, shuffle=True,
    backend=None)``. The queries are the cases (workload, N): every ``WORKLOADS`` name (``"mix"``) or the one
    given, times every N of ``items``, in that order (query ``i`` is workload ``i // len(items)``, N
    ``items[i % len(items)]``); they come in a seeded permutation per pass (``shuffle``) or in order.
    ``options={"query": i}`` picks one, ``options={"items": n, "workload": name}`` override the case's N and
    workload for one reset. ``reset(seed=s)`` builds a fresh world and runs ``warmup_s`` of background (a
    snapshot after the first time, exact); the same seed gives the same world, table and failures, bit for
    bit (the first query of a world meets the table of ``envs.apwa.run_method`` with that seed). ``reset()``
    keeps the world running: the next query arrives where the previous one left it, its table and failures
    drawn from ``(seed, episode_key)``.

    ``backend`` says where the calls run (``envs.backend``): ``None`` is the simulated pools above
    (``SimBackend`` from ``envs.apwa.apwa_sim_backend``); ``maslat.livebackend.LiveBackend`` with one endpoint
    per model (pool named after the model: ``env.pools``) sends them to live vLLM servers in wall-clock time:
    then ``load`` and ``warmup_s`` do not apply, ``system`` comes from the servers' ``/metrics`` and the
    makespan is measured. Tables and failures depend only on the seed and the query, never on the backend.

    ## Copies
    An environment cannot be copied or pickled (``TypeError``, ``envs.nocopy``): its world is live processes.

    ## Version History
    * v0: initial version. Since the decision skeleton (``envs.decision``): ``backend``, ``shuffle``,
      ``options={"query": i}``, the skeleton's info keys (``query``, ``visit``, ``episode_key``, ``start_s``,
      ``end_s``; ``envs.infos.APWAFinalInfo``), ``reset()`` continuing the world (before, it drew a fresh
      world per episode), queries as a seeded permutation of the cases (before, drawn independently) and
      unbounded (``np.inf``) observation bounds (before, 1e9);
      ``reset(seed=s)`` with ``options`` fixing the case runs the same episode as before.
    """

    metadata = {"render_modes": [], "autoreset_mode": gym.vector.AutoresetMode.NEXT_STEP}

    def __init__(self, workload: str = "mix", items: tuple[int, ...] = (10, 30, 100), *, load="idle",
                 models: tuple[ModelEntry, ...] | None = None, latency_weight: float = 0.05,
                 slo_s: float | None = None, warmup_s: float = 30.0, fail_prob: float = 0.02,
                 flatten_obs: bool = False, shuffle: bool = True, backend: Backend | None = None,
                 render_mode: str | None = None):
        if workload != "mix" and workload not in WORKLOADS:
            raise ValueError(f"workload must be 'mix' or one of {_WORKLOAD_NAMES}, got {workload!r}")
        items = tuple(int(n) for n in np.atleast_1d(items))
        if not items or min(items) < 1:
            raise ValueError(f"items must be one or more row counts >= 1, got {items!r}")
        if not latency_weight >= 0 or (slo_s is not None and not slo_s > 0):
            raise ValueError("latency_weight must be >= 0 and slo_s None or > 0 seconds")
        self.cfg = APWAConfig(models=models, load=load, warmup_s=warmup_s, fail_prob=fail_prob)
        self.workload, self.items, self.latency_weight, self.slo_s = workload, items, float(latency_weight), slo_s
        names = _WORKLOAD_NAMES if workload == "mix" else (workload,)
        self.cases = tuple((w, n) for w in names for n in items)
        self.pools = tuple(m.name for m in self.cfg.model_entries)
        m = len(self.pools)
        self.action_space = spaces.MultiDiscrete([len(GROUP_SIZES), len(FAN_INS), len(IN_FLIGHT), m + 1, m + 1])
        self.dict_space = spaces.Dict({
            "items": spaces.Box(0.0, np.inf, (1,), np.float32),
            "row_tokens": spaces.Box(0.0, np.inf, (2,), np.float32),
            "system": spaces.Box(0.0, np.inf, (4 * m,), np.float32),
            "workload": spaces.Discrete(len(_WORKLOAD_NAMES)),
        })
        self.flatten_obs = flatten_obs
        self.observation_space = observation_space(self.dict_space, flatten_obs)
        self.render_mode = render_mode
        self._init_decisions(backend if backend is not None else apwa_sim_backend(self.cfg),
                             num_queries=len(self.cases), shuffle=shuffle)

    # ================================================================== the decision skeleton's hooks
    def _new_episode(self, q: int, visit: int, key: int, options: dict) -> _Episode:
        name, n = self.cases[q]
        name = options.get("workload", name)
        if name not in WORKLOADS:
            raise ValueError(f"options['workload'] must be one of {_WORKLOAD_NAMES}, got {name!r}")
        n = int(options.get("items", n))
        if n < 1:
            raise ValueError(f"options['items'] must be a row count >= 1, got {n}")
        run = APWARun(self.cfg, name, n, self.run_seed, backend=self.backend, episode=key - 1, fresh_world=False)
        return _Episode(q=q, visit=visit, key=key, run=run, start_s=self.backend.now)

    def _episode(self, ep: _Episode):
        a = yield from self.decision(ep, lambda: self._obs(ep))
        res = yield from ep.run.execute("apwa", self._decomposition(a, ep.run.table.num_rows))
        ep.end_s = self.backend.now
        return self._final_info(ep, res)

    def _reset_info(self, ep: _Episode) -> APWAResetInfo:
        return {"query": ep.q, "visit": ep.visit, "items": ep.run.table.num_rows, "workload": ep.run.workload.name,
                "seed": self.run_seed, "start_s": ep.start_s}

    def _check_action(self, action) -> tuple[int, ...]:
        a = np.asarray(action).reshape(-1)
        if a.size != 5 or not np.all(a == np.round(a)) or not self.action_space.contains(a.astype(np.int64)):
            raise ValueError(f"action must be 5 integers within {self.action_space.nvec.tolist()}, got {action!r}")
        return tuple(int(x) for x in a)

    def _observe(self, obs: dict):
        return self._out(obs)

    def _policy_action(self, policy, obs, ep: _Episode):
        return policy.act(self._out(obs), episode=ep.key)

    def _step_result(self, ep: _Episode, action, done: bool) -> tuple[dict, float, APWAFinalInfo]:
        info = ep.info
        reward = info["semantic_utility"] - self.latency_weight * info["makespan_s"] / 60.0
        return self._out(ep.obs), float(reward), dict(info)

    # ================================================================== actions, observations, info
    def decode_action(self, action) -> Decomposition:
        """The decomposition ``action`` stands for, for the pending query (N: its rows; none pending: the
        largest of ``items``)."""
        ep = self._ep
        n = ep.run.table.num_rows if ep is not None else max(self.items)
        return self._decomposition(self._check_action(action), n)

    def _decomposition(self, a: tuple[int, ...], n: int) -> Decomposition:
        pools = [self.pools if i == len(self.pools) else (self.pools[i],) for i in a[3:]]
        return Decomposition(group_size=min(GROUP_SIZES[a[0]], n), fan_in=FAN_INS[a[1]],
                             max_in_flight=IN_FLIGHT[a[2]], worker_pools=pools[0], merge_pools=pools[1])

    def _obs(self, ep: _Episode) -> dict:
        run = ep.run
        meta, w = run.table.meta(), run.workload
        return {
            "items": np.array([run.table.num_rows], np.float32),
            "row_tokens": np.array([meta.mean_row_tokens, w.output_tokens], np.float32),
            "system": pool_states(self.backend, self.pools).reshape(-1).astype(np.float32),
            "workload": _WORKLOAD_NAMES.index(w.name),
        }

    def _out(self, obs: dict):
        """What the caller gets: a fresh copy (the terminal observation repeats the decision's)."""
        if self.flatten_obs:
            return spaces.flatten(self.dict_space, obs).astype(np.float32)
        return {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in obs.items()}

    def _final_info(self, ep: _Episode, res: RunResult) -> APWAFinalInfo:
        """The episode's keys of ``envs.infos.APWAFinalInfo`` (the skeleton adds its own)."""
        s = res.summary()
        sim_side = self.world is not None
        return {"cost": 0.0 if self.slo_s is None else max(0.0, res.makespan_s - self.slo_s), "apwa": s,
                **{k: s[k] for k in ("makespan_s", "structural_completeness", "semantic_utility", "tokens",
                                     "lost_items", "width", "depth")},
                "workload": res.workload, "items": res.num_items, "seed": self.run_seed,
                "preemptions": ep.run.preemptions if sim_side else None,
                "kv_peak": ep.run.kv_peak if sim_side else None}
