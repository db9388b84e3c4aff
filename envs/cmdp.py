"""``MASLatency-CMDP-v0``: system-aware hierarchical orchestration of agent calls under a latency SLO."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from .backend import Backend, SimBackend
from .background import WARM_WORLDS
from .background_modes import check_background, cmdp_tape_world, tape_offset_s
from .cluster import BackgroundTrace
from .cmdp_catalog import ROLE_NAMES, STRATEGY_NAMES, ModelEntry, default_models, model_accuracy
from .cmdp_process import CMDPQueryProcess, _Episode
from .cmdp_query import QueryState
from .cmdp_world import build_cmdp_world, unloaded_latency_s
from .decision import DecisionEnv, observation_space
from .embeddings import EMBED_DIM
from .estimators import NUM_SYSTEM, load_estimator
from .loads import make_regime
from .operators import quality
from .tasks import make_queries, make_task, task_key
from .topologies import MAX_NODES, MODES, make_planner

__all__ = ["COST_KINDS", "MASLatencyCMDPEnv", "MASROUTER_COST_RATE"]

_SPLIT_ID = {"train": 1, "test": 2}

#: what ``info["cost"]`` measures (the class docstring's Costs)
COST_KINDS = ("violation", "overrun")
#: MasRouter's utility = is_solved - cost_rate x $ (docs/system_aware.md#5-masrouter-baseline)
MASROUTER_COST_RATE = {"gsm8k": 200.0, "humaneval": 200.0, "math": 100.0, "mbpp": 400.0}


class MASLatencyCMDPEnv(CMDPQueryProcess, DecisionEnv):
    """Executor of a planned multi-agent topology: one (model, prompt strategy) decision per agent call.

    ## Description
    The system-aware design (docs/system_aware.md). At the start of an episode (one benchmark
    query) the Planner fixes a topology and its roles (``envs.topologies``: MasRouter's collaboration modes
    and an APWA parallel map). Then every step is one agent call: the Executor picks the model it runs on
    and the prompt strategy injected into it (Flash, Concise, DeepThink). Calls run on simulated vLLM pools,
    one per model, shared with background traffic whose load changes (``envs.loads``); a node starts when
    its inputs are done, so the branches of a parallel topology run concurrently (``execution="dag"``) or,
    MasRouter-style, one after another (``"sequential"``). When several nodes become ready at once the
    environment asks for them one after another at the same simulated instant. The query's answer is the
    last node's; quality per model and strategy comes from the task models (``envs.cmdp_catalog``).

    ## Action space
    ``MultiDiscrete([M, 3])``: model index (``env.model_names``) and strategy index (``STRATEGY_NAMES``);
    with ``action_type="discrete"``, ``Discrete(3 M)`` with ``a = model * 3 + strategy``.

    ## Observation space
    A single-level ``Dict`` (keys sorted; ``flatten_obs=True`` gives ``spaces.flatten`` of it, a ``Box``):

    | Key | Type | Meaning | Unit |
    |---|---|---|---|
    | ``budget`` | Box(2) | remaining latency budget b_t = SLO - elapsed, and b_t / SLO | s, fraction |
    | ``estimates`` | Box(3 M) | F_lat/F_len prediction T_total = t_ttft + L_out t_tpot of this call, per (model, strategy), model-major | s |
    | ``nodes_left`` | Box(2) | calls not yet decided (this one included); calls on the longest path from this node to the answer | count |
    | ``prompt_tokens`` | Box(1) | this call's prompt without the strategy text (instructions, query, predecessors' outputs) | tokens |
    | ``query`` | Box(384) | frozen query embedding (unit norm) | - |
    | ``role`` | Discrete(9) | role of this call (``ROLE_NAMES``) | - |
    | ``step`` | Discrete(7) | index of this call in the topology | - |
    | ``system`` | Box(4 M) | per model: waiting and running requests (pool totals), KV-cache usage, EMA of TTFT | req, req, fraction, ms |
    | ``topology`` | Discrete(6) | the planned topology (``MODES``) | - |

    ## Rewards
    0 on every step but the last, which pays the query's quality: 1 if the final answer is right, else 0.
    The last step's ``info["quality_expected"]`` is the probability that the final answer is right given the
    calls made (``QueryState.expected_score``: the answer draws resampled 256 times) — the same reward in
    expectation with much less variance, for trainers that want it. With ``counterfactual_quality=True``
    (attribute or argument; ~2 ms per episode) ``info["quality_by_action"]`` (nodes x 3 M) holds the same
    had node ``i`` run action ``a`` instead, every other call unchanged (``QueryState.counterfactual_scores``,
    same Latin-hypercube resamples for every entry: the differences between a node's actions are sharp).

    ## Costs
    ``info["cost"]`` on every step, of the kind ``cost`` (attribute ``cost_kind``) says:

    * ``"violation"`` (default; the constraint of the published results): 1.0 on the last step of an episode
      whose latency exceeded its SLO, else 0, so the episode's cost is its SLO violation and a limit on the
      mean cost is a limit on the violation rate;
    * ``"overrun"``: the seconds the episode spent beyond its budget since the previous step, so the
      episode's costs sum to ``max(0, latency - SLO)``.

    Both are in every step's ``info`` whatever the kind: ``overrun_step_s`` (the overrun cost) and
    ``overrun_s`` (cumulative), with ``elapsed_s``, and at the end ``latency_s``, ``slo_s``, ``slo_violated``,
    ``cost_usd`` (list prices of the models), ``quality``. ``envs.wrappers.SafetyGymnasiumWrapper`` gives
    Safety-Gymnasium's ``(obs, reward, cost, terminated, truncated, info)``.

    ## Episode end
    Terminates when the last node's call has returned. Never truncated.

    ## Arguments
    ``gym.make("MASLatency-CMDP-v0", task="mbpp", split="train", slo_s=None, slo_factor=(0.75, 2.0),
    load="idle", models=None, planner="mix", execution="dag", estimator="default",
    action_type="multidiscrete", flatten_obs=False, warmup_s=30.0, dataset_seed=0, shuffle=True,
    counterfactual_quality=False, background_trace=None, router="least_outstanding", cost="violation",
    backend=None, background="exact", tape_seed=None)``.
    The SLO is ``slo_s`` seconds if given, else ``slo_factor`` times the query's *reference latency*: the
    critical path of its topology with the strongest model and DeepThink on idle replicas (simulated; an
    answer to the design's open question 1). A ``(low, high)`` factor is drawn uniformly per episode.
    ``options={"query": i, "slo_s": x, "slo_factor": f}`` override per reset. ``load`` is a regime name
    (``idle``, ``busy``, ``bursty``, ``shift``) or an ``envs.loads.LoadRegime``; ``background_trace``
    replays recorded arrivals instead. ``reset(seed=s)`` builds a fresh world and runs ``warmup_s`` of
    background before the query (same seed, same episode, bit for bit); ``reset()`` keeps the world running.
    ``reuse_warmup=True`` serves a seed's warm-up from a snapshot after its first simulation
    (``envs.background``: exact, ~5x cheaper than re-simulating it). ``background="tape"`` (default
    ``"exact"``) replays the background from a tape simulated once per regime and seed and serves the calls
    against it in closed form: an approximation, several times faster (``envs.bgtape``). With ``tape_seed=k``
    every ``reset(seed=s)`` replays the one tape of seed ``k`` from an offset drawn from ``s``
    (``envs.background_modes.tape_offset_s``): many seeded episodes (an evaluation) for the price of one tape.

    ## Copies
    An environment cannot be copied or pickled (``TypeError``, ``envs.nocopy``): its world is live SimPy
    processes. Build another with the same arguments and reset it with the same seed to get the same episode.

    ``backend`` says where the calls run (``envs.backend``): ``None`` is the simulated pools above
    (``SimBackend``); ``maslat.livebackend.LiveBackend`` with one endpoint per model (pool named after the
    model) sends them to live vLLM servers in wall-clock time: then ``load``, ``background_trace``,
    ``router`` and ``warmup_s`` do not apply (the servers carry whatever load they have), ``system`` comes from
    the servers' ``/metrics`` and latencies are measured. Task outcomes depend only on the seed, the query
    and the actions, never on the backend.

    ## Version History
    * v0: initial version. Since the decision skeleton (``envs.decision``): the ``cost`` argument, with
      ``"violation"`` as default (before, ``info["cost"]`` was always the overrun: pass ``cost="overrun"``
      for it), ``backend``, ``info["episode_key"]`` and unbounded (``np.inf``) observation bounds; the
      simulated dynamics did not change (same seed, same episode, bit for bit).
    """

    metadata = {"render_modes": [], "autoreset_mode": gym.vector.AutoresetMode.NEXT_STEP}

    def __init__(self, task: str = "mbpp", split: str = "train", *, slo_s: float | None = None,
                 slo_factor: float | tuple[float, float] = (0.75, 2.0), load="idle",
                 models: tuple[ModelEntry, ...] | None = None, planner: str = "mix", execution: str = "dag",
                 estimator="default", action_type: str = "multidiscrete", flatten_obs: bool = False,
                 warmup_s: float = 30.0, dataset_seed: int = 0, shuffle: bool = True,
                 counterfactual_quality: bool = False,
                 background_trace: BackgroundTrace | None = None, router: str = "least_outstanding",
                 render_mode: str | None = None, reuse_warmup: bool = True, backend: Backend | None = None,
                 cost: str = "violation", background: str = "exact", tape_seed: int | None = None):
        self.task = make_task(task)
        if split not in _SPLIT_ID:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        self.split = split
        self.models = tuple(models) if models is not None else default_models()
        if len(self.models) < 1 or len({m.name for m in self.models}) != len(self.models):
            raise ValueError("models must be one or more ModelEntry with distinct names")
        self.model_names = tuple(m.name for m in self.models)
        self.regime = make_regime(load, len(self.models))
        self.slo_s, self.slo_factor = self._check_slo(slo_s, slo_factor)
        if execution not in ("dag", "sequential"):
            raise ValueError(f"execution must be 'dag' or 'sequential', got {execution!r}")
        if cost not in COST_KINDS:
            raise ValueError(f"cost must be one of {COST_KINDS}, got {cost!r}")
        self.cost_kind = cost
        if action_type not in ("multidiscrete", "discrete"):
            raise ValueError(f"action_type must be 'multidiscrete' or 'discrete', got {action_type!r}")
        if not warmup_s >= 0:
            raise ValueError(f"warmup_s must be >= 0, got {warmup_s!r}")
        self.execution, self.action_type, self.flatten_obs = execution, action_type, flatten_obs
        self.warmup_s, self.dataset_seed, self.shuffle, self.router = float(warmup_s), dataset_seed, shuffle, router
        self.background_trace = background_trace
        self.reuse_warmup = bool(reuse_warmup)
        self.background = check_background(background)
        if background == "tape" and background_trace is not None:
            raise ValueError("background='tape' does not replay a background_trace; use background='exact'")
        if tape_seed is not None and (background != "tape" or not isinstance(tape_seed, int | np.integer)):
            raise ValueError(f"tape_seed (an integer) needs background='tape', got tape_seed={tape_seed!r} with "
                             f"background={background!r}")
        self.tape_seed = None if tape_seed is None else int(tape_seed)
        self.counterfactual_quality = bool(counterfactual_quality)
        self.planner = make_planner(planner, self.task.kind, dataset_seed)
        self.estimator = load_estimator(estimator, self.model_names)
        self.queries = make_queries(self.task, split, dataset_seed)
        self.quality = quality(self.task)
        # the reference action: the strongest model with DeepThink
        self.reference_model = int(np.argmax([model_accuracy(self.task, m.name) for m in self.models]))
        # the fastest model: smallest idle latency of a typical agent call (500-token prompt, 100 tokens out)
        self.fastest_model = int(np.argmin([unloaded_latency_s(m.profile, 500, 100) for m in self.models]))
        nm, ns = len(self.models), len(STRATEGY_NAMES)
        self.action_space = (spaces.MultiDiscrete([nm, ns]) if action_type == "multidiscrete"
                             else spaces.Discrete(nm * ns))
        self.dict_space = spaces.Dict({
            "budget": spaces.Box(-np.inf, np.inf, (2,), np.float32),
            "estimates": spaces.Box(0.0, 1e6, (nm * ns,), np.float32),
            "nodes_left": spaces.Box(0.0, float(MAX_NODES), (2,), np.float32),
            "prompt_tokens": spaces.Box(0.0, np.inf, (1,), np.float32),
            "query": spaces.Box(-1.0, 1.0, (EMBED_DIM,), np.float32),
            "role": spaces.Discrete(len(ROLE_NAMES)),
            "step": spaces.Discrete(MAX_NODES),
            "system": spaces.Box(0.0, np.inf, (nm * NUM_SYSTEM,), np.float32),
            "topology": spaces.Discrete(len(MODES)),
        })
        self.observation_space = observation_space(self.dict_space, flatten_obs)
        self.render_mode = render_mode
        self._sys = np.zeros((nm, NUM_SYSTEM))
        self._init_decisions(backend if backend is not None else SimBackend(build=self._build_world),
                             num_queries=len(self.queries), shuffle=shuffle)

    @staticmethod
    def _check_slo(slo_s, slo_factor):
        if slo_s is not None:
            if not slo_s > 0:
                raise ValueError(f"slo_s must be > 0 seconds, got {slo_s!r}")
            return float(slo_s), None
        f = (float(slo_factor), float(slo_factor)) if np.isscalar(slo_factor) else tuple(map(float, slo_factor))
        if len(f) != 2 or not 0 < f[0] <= f[1]:
            raise ValueError(f"slo_factor must be > 0 or a (low, high) range with 0 < low <= high, got {slo_factor!r}")
        return None, f

    # ================================================================== the decision skeleton's hooks
    def _reset_info(self, ep: _Episode) -> dict:
        return {"query": ep.q, "visit": ep.visit, "topology": ep.topology.mode, "slo_s": ep.slo_s,
                "slo_factor": ep.slo_factor, "reference_s": ep.reference_s, "start_s": ep.start_s}

    def _check_action(self, action) -> tuple[int, int]:
        return self.decode_action(action)

    def _observe(self, obs: dict):
        return self._out_obs(obs)

    def _policy_action(self, policy, obs, ep: _Episode):
        a = policy.act(self._out_obs(obs))
        return self.encode_action(*a) if isinstance(a, tuple) else a

    def _step_result(self, ep: _Episode, action, done: bool) -> tuple[dict, float, dict]:
        now = ep.end_s if done else self.backend.now
        over = max(0.0, (now - ep.start_s) - ep.slo_s)
        step_s, ep.overrun_s = over - ep.overrun_s, over
        if self.cost_kind == "overrun":
            cost = step_s
        else:
            cost = float(done and (ep.end_s - ep.start_s) > ep.slo_s)
        info = {"cost": cost, "overrun_step_s": step_s, "overrun_s": over, "elapsed_s": now - ep.start_s,
                "slo_s": ep.slo_s, "action": action}
        if not done:
            return self._out_obs(ep.obs), 0.0, info
        info.update(ep.info)
        return self._out_obs(ep.obs), float(info["quality"]), info

    def decode_action(self, action) -> tuple[int, int]:
        ns = len(STRATEGY_NAMES)
        a = np.asarray(action).reshape(-1)
        if self.action_type == "discrete":
            if a.size != 1 or not 0 <= int(a[0]) < len(self.models) * ns:
                raise ValueError(f"action must be an integer in [0, {len(self.models) * ns}), got {action!r}")
            return divmod(int(a[0]), ns)
        if a.size != 2 or not (0 <= int(a[0]) < len(self.models) and 0 <= int(a[1]) < ns):
            raise ValueError(f"action must be [model in 0..{len(self.models) - 1}, strategy in 0..{ns - 1}], got {action!r}")
        return int(a[0]), int(a[1])

    def encode_action(self, model: int, strategy: int):
        ns = len(STRATEGY_NAMES)
        if self.action_type == "discrete":
            return model * ns + strategy
        return np.array([model, strategy], dtype=np.int64)

    # ================================================================== world and queries
    def _build_world(self, seed: int):
        """A fresh simulated world for ``seed``, its background warmed up for ``warmup_s`` (``SimBackend``)."""
        def build():
            return build_cmdp_world(self.models, self.regime, seed, router=self.router, trace=self.background_trace)

        if self.background == "tape":  # an approximation (envs.bgtape): the background replayed from a tape
            if self.tape_seed is not None:  # one tape for every seed, each starting at its own offset
                return cmdp_tape_world(self.models, self.regime, self.tape_seed, router=self.router,
                                       warmup_s=self.warmup_s, offset_s=tape_offset_s(seed))
            return cmdp_tape_world(self.models, self.regime, seed, router=self.router, warmup_s=self.warmup_s)
        if self.reuse_warmup and self.background_trace is None:   # a trace's arrays are not a cache key
            key = (tuple((m.name, m.profile, m.replicas) for m in self.models), self.regime, seed, self.router,
                   self.warmup_s)
            return WARM_WORLDS.get(key, build, self.warmup_s)
        world = build()
        if self.warmup_s > 0:
            world.run(until=self.warmup_s)
        return world

    def _new_episode(self, q: int, visit: int, key: int, options: dict) -> _Episode:
        topo = self.planner(q, _SPLIT_ID[self.split], self.queries.embedding[q])
        qid = (task_key(self.task.name) << 28) | (_SPLIT_ID[self.split] << 24) | q
        words = [self.run_seed, self.dataset_seed, task_key(self.task.name), _SPLIT_ID[self.split], q, visit]
        st = QueryState(task=self.task, quality=self.quality, models=self.model_names, topology=topo,
                        difficulty=float(self.queries.difficulty[q]), query_tokens=int(self.queries.prompt_tokens[q]),
                        query_content_id=qid, seed_words=words)
        ref = self.reference_latency_s(st)
        slo_s, factor = self._episode_slo(options, ref)
        return _Episode(q=q, visit=visit, key=key, topology=topo, state=st, slo_s=slo_s, slo_factor=factor,
                        reference_s=ref, start_s=self.backend.now)

    def _episode_slo(self, options: dict, ref: float) -> tuple[float, float | None]:
        if "slo_s" in options:
            s = float(options["slo_s"])
            if not s > 0:
                raise ValueError(f"options['slo_s'] must be > 0, got {s}")
            return s, None
        if "slo_factor" in options:
            f = float(options["slo_factor"])
            if not f > 0:
                raise ValueError(f"options['slo_factor'] must be > 0, got {f}")
            return f * ref, f
        if self.slo_s is not None:
            return self.slo_s, None
        lo, hi = self.slo_factor
        f = lo if lo == hi else float(self.np_random.uniform(lo, hi))
        return f * ref, f

    def reference_latency_s(self, st: QueryState) -> float:
        """Critical path of the query's topology with the strongest model and DeepThink, mean lengths, each
        call alone on an idle replica."""
        prof = self.models[self.reference_model].profile
        deep = STRATEGY_NAMES.index("DeepThink")
        saved = list(st.out_tokens)
        finish = []
        for node in st.topology.nodes:
            out = max(1, int(round(st.mean_completion(node, deep))))
            lat = unloaded_latency_s(prof, st.prompt_tokens(node, deep), out)
            st.out_tokens[node.index] = out
            finish.append(max((finish[d] for d in node.deps), default=0.0) + lat)
        st.out_tokens[:] = saved
        return max(finish)
