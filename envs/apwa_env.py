"""``MASLatency-APWA-v0``: choose how an APWA manager decomposes a query over N items, under live load."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from .apwa import WORKLOADS, APWAConfig, APWARun, Decomposition
from .cmdp_catalog import ModelEntry
from .nocopy import NotCopyable

__all__ = ["FAN_INS", "GROUP_SIZES", "IN_FLIGHT", "MASLatencyAPWAEnv"]

GROUP_SIZES = (1, 2, 4, 8, 16, 32, 64)
FAN_INS = (2, 4, 8, 16, None)
IN_FLIGHT = (4, 16, 64, None)
_WORKLOAD_NAMES = tuple(WORKLOADS)


class MASLatencyAPWAEnv(NotCopyable, gym.Env):
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
    ``semantic_utility``, ``tokens``, ``lost_items``, ``width``, ``depth``.

    ## Episode end
    Terminates after the one step. Never truncated.

    ## Arguments
    ``gym.make("MASLatency-APWA-v0", workload="mix", items=(10, 30, 100), load="idle", models=None,
    latency_weight=0.05, slo_s=None, warmup_s=30.0, fail_prob=0.02, flatten_obs=False)``. ``workload`` is a
    ``WORKLOADS`` name or ``"mix"`` (drawn per episode); N is drawn from ``items`` per episode;
    ``options={"items": n, "workload": name}`` fix them for one reset. ``reset(seed=s)`` gives the same
    world, table and failures for the same seed (bit for bit); ``reset()`` draws the next seed from
    ``np_random``.

    ## Version History
    * v0: initial version.
    """

    metadata = {"render_modes": [], "autoreset_mode": gym.vector.AutoresetMode.NEXT_STEP}

    def __init__(self, workload: str = "mix", items: tuple[int, ...] = (10, 30, 100), *, load="idle",
                 models: tuple[ModelEntry, ...] | None = None, latency_weight: float = 0.05,
                 slo_s: float | None = None, warmup_s: float = 30.0, fail_prob: float = 0.02,
                 flatten_obs: bool = False, render_mode: str | None = None):
        if workload != "mix" and workload not in WORKLOADS:
            raise ValueError(f"workload must be 'mix' or one of {_WORKLOAD_NAMES}, got {workload!r}")
        items = tuple(int(n) for n in np.atleast_1d(items))
        if not items or min(items) < 1:
            raise ValueError(f"items must be one or more row counts >= 1, got {items!r}")
        if not latency_weight >= 0 or (slo_s is not None and not slo_s > 0):
            raise ValueError("latency_weight must be >= 0 and slo_s None or > 0 seconds")
        self.cfg = APWAConfig(models=models, load=load, warmup_s=warmup_s, fail_prob=fail_prob)
        self.workload, self.items, self.latency_weight, self.slo_s = workload, items, float(latency_weight), slo_s
        self.pools = tuple(m.name for m in self.cfg.model_entries)
        m = len(self.pools)
        self.action_space = spaces.MultiDiscrete([len(GROUP_SIZES), len(FAN_INS), len(IN_FLIGHT), m + 1, m + 1])
        self.dict_space = spaces.Dict({
            "items": spaces.Box(0.0, 1e9, (1,), np.float32),
            "row_tokens": spaces.Box(0.0, 1e9, (2,), np.float32),
            "system": spaces.Box(0.0, 1e9, (4 * m,), np.float32),
            "workload": spaces.Discrete(len(_WORKLOAD_NAMES)),
        })
        self.flatten_obs = flatten_obs
        self.observation_space = (spaces.flatten_space(self.dict_space) if flatten_obs else self.dict_space)
        if flatten_obs:
            self.observation_space = spaces.Box(self.observation_space.low.astype(np.float32),
                                                self.observation_space.high.astype(np.float32), dtype=np.float32)
        self.render_mode = render_mode
        self._run: APWARun | None = None
        self._obs: dict | None = None

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        options = options or {}
        run_seed = seed if seed is not None else int(self.np_random.integers(2**31))
        self.action_space.seed(run_seed)
        name = options.get("workload", self.workload)
        if name == "mix":
            name = _WORKLOAD_NAMES[int(self.np_random.integers(len(_WORKLOAD_NAMES)))]
        n = int(options.get("items", self.items[int(self.np_random.integers(len(self.items)))]))
        self._run = APWARun(self.cfg, name, n, run_seed)
        meta, w = self._run.table.meta(), self._run.workload
        self._obs = {
            "items": np.array([n], np.float32),
            "row_tokens": np.array([meta.mean_row_tokens, w.output_tokens], np.float32),
            "system": self._run.backend.pool_states().reshape(-1).astype(np.float32),
            "workload": _WORKLOAD_NAMES.index(w.name),
        }
        return self._out(self._obs), {"items": n, "workload": w.name, "seed": run_seed, "start_s": self._run.backend.now}

    def decode_action(self, action) -> Decomposition:
        a = np.asarray(action, dtype=np.int64).reshape(-1)
        if a.size != 5 or not self.action_space.contains(a):
            raise ValueError(f"action must be 5 integers within {self.action_space.nvec.tolist()}, got {action!r}")
        n = self._run.table.num_rows if self._run is not None else max(self.items)
        pools = [self.pools if int(i) == len(self.pools) else (self.pools[int(i)],) for i in a[3:]]
        return Decomposition(group_size=min(GROUP_SIZES[a[0]], n), fan_in=FAN_INS[a[1]],
                             max_in_flight=IN_FLIGHT[a[2]], worker_pools=pools[0], merge_pools=pools[1])

    def step(self, action):
        if self._run is None:
            raise RuntimeError("call reset() before step(), and again after an episode ends")
        d = self.decode_action(action)
        run, self._run = self._run, None
        res = run.run("apwa", d)
        reward = res.semantic_utility - self.latency_weight * res.makespan_s / 60.0
        cost = 0.0 if self.slo_s is None else max(0.0, res.makespan_s - self.slo_s)
        s = res.summary()
        info = {"cost": cost, "apwa": s, **{k: s[k] for k in ("makespan_s", "structural_completeness",
                                                            "semantic_utility", "tokens", "lost_items", "width",
                                                            "depth")}}
        return self._out(self._obs), float(reward), True, False, info

    def _out(self, obs: dict):
        if self.flatten_obs:
            return spaces.flatten(self.dict_space, obs).astype(np.float32)
        return {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in obs.items()}

    def close(self) -> None:
        self._run = None
