"""``MASLatency-v0``: LAMaS's agentic supernet, one query per episode, on a simulated serving cluster."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from .backend import BACKEND_POOL, Backend, SimBackend
from .cluster import ClusterConfig
from .decision import DecisionEnv, Episode, observation_space
from .embeddings import EMBED_DIM
from .infos import MASFinalInfo
from .operators import CONSTANTS, GENERATE_TYPE, operator_set, quality
from .seeding import entropy
from .supernet import Call, Draws, GraphConfig, OpPlan, QueryRun, ToolRun
from .tasks import make_queries, make_task, task_key

__all__ = ["MASLatencyEnv"]

_SPLIT_ID = {"train": 1, "test": 2}


@dataclass(slots=True, kw_only=True, eq=False)
class _Episode(Episode):
    """One query in flight: its bookkeeping across attempts (retries)."""

    attempt: int = 0
    run: QueryRun | None = None
    pre_s: float = 0.0
    post_s: float = 0.0
    cost_usd: float = 0.0
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    rejected: int = 0
    layers: list[dict] = field(default_factory=list)
    prev_ops: list[int] = field(default_factory=list)


class MASLatencyEnv(DecisionEnv):
    """The LAMaS agentic supernet answering one benchmark query per episode on a simulated vLLM cluster.

    ## Description
    LAMaS (Shi, Zheng and Lou, arXiv 2601.10560) and MaAS (Zhang et al., ICML 2025) build a multi-agent
    architecture per query, layer by layer, from a fixed operator set. Here each step chooses the operators
    of the next layer (at most ``num_layers`` = 4); the simulator then runs every LLM call of that layer as a
    request on a simulated vLLM pool shared with background traffic, and returns when the layer is done
    (the next decision point). Operators of a layer run concurrently and contend for the replicas
    (``execution="parallel"``, LAMaS) or one after another, each seeing the previous one's result
    (``"sequential"``, MaAS). The graph's fixed steps (docs/lamas.md#2-fixed-steps: GSM8K's final ScEnsemble and Programmer
    verification, MATH's pre-step Programmer, HumanEval's final Test) run too. Task models (difficulty,
    lengths, answer quality) are in ``envs.tasks`` and ``envs.operators``; operator semantics in
    ``envs.supernet``.

    ## Action space
    ``MultiDiscrete([K + 1] * K)`` with K = 7 operators: an *ordered* list of slots, each an operator index
    (controller order, ``env.operator_names``) or K for an empty slot. Order matters as in LAMaS: results
    merge in list order, the first operator conditions the next layer's controller, sequential mode runs
    them in this order. Repeated operators run once (counted in ``info["ignored_duplicates"]``); an all-empty
    action is read as ``[EarlyStop]``. Anything else (another length, a value outside 0..K, a non-integer
    number, a string) raises ``ValueError`` naming the space, before the world moves: the episode goes on and
    ``step`` can be called again with a valid action. With ``action_type="discrete"``: ``Discrete((K + 1) ** K)``,
    the slots in mixed radix, ``a = sum_i slot_i (K + 1) ** i`` (``encode_action``/``decode_action``; in
    ``rollout`` a policy may return either form).

    ## Observation space
    A single-level ``Dict`` (keys sorted; ``flatten_obs=True`` gives ``spaces.flatten`` of it, a ``Box``, to
    ``reset``/``step``; ``rollout``'s policies always get the ``Dict``):

    | Key | Type | Meaning | Unit |
    |---|---|---|---|
    | ``attempt`` | Discrete(max_retries + 1) | retry number of this query (a layer-0 ScEnsemble over no solutions raises and the query restarts, as in LAMaS) | count |
    | ``layer`` | Discrete(num_layers) | index of the layer to choose | - |
    | ``load`` | Box(3) | mean over replicas of running requests, waiting requests, KV-cache usage | requests, requests, fraction |
    | ``prev_first`` | Discrete(K + 1) | first operator of the previous layer (K at layer 0) | - |
    | ``prev_ops`` | MultiBinary(K) | operators of the previous layer | - |
    | ``progress`` | Box(4) | elapsed time of the query, CP tokens so far, solutions in hand, cost so far | s, tokens, count, mUSD |
    | ``query`` | Box(384) | frozen query embedding (unit norm) | - |

    ## Rewards
    0 on every step but the last, which pays ``score - cost_weight * cost_usd - token_weight / 50 * cp_tokens
    - seconds_weight * cp_seconds`` (defaults 3, 0, 0: MaAS's utility). Score is 1 if the final answer is
    right, else 0.

    ## Episode end
    Terminates after the layer that contains EarlyStop, after ``num_layers`` layers, or after
    ``max_retries`` failed attempts (score 0). The final ``info`` holds ``score``, ``cp_tokens`` (LAMaS's
    ``cp_token``: per-layer max of c(op), sum in sequential mode, plus post-processing), ``cp_tokens_layers``,
    ``cp_seconds`` (simulated wall time from the query's start to its answer), ``cost_usd``, ``llm_calls``,
    prompt/completion tokens, ``retries`` and ``layers``: per layer the operators, their c(op) tokens and
    seconds, and the bottleneck by tokens (ties to the first) and by seconds.

    ## Arguments
    ``gym.make("MASLatency-v0", task="gsm8k", split="train", execution="parallel", variant="lamas",
    cluster=ClusterConfig(...), num_layers=4, cost_weight=3.0, token_weight=0.0, seconds_weight=0.0,
    dataset_seed=0, shuffle=False, max_retries=20, backend=None, action_type="multidiscrete", flatten_obs=False)``. ``variant`` picks LAMaS's or MaAS's fixed
    steps where they differ (MATH test pre-step). ``backend`` says where the LLM calls run (``envs.backend``):
    ``None`` is the simulated ``cluster`` (``SimBackend``); ``maslat.livebackend.LiveBackend`` sends them to
    live vLLM servers in wall-clock time (then ``cluster`` must be ``None``, ``cp_seconds`` is measured and
    ``load`` comes from the servers' ``/metrics``). Task outcomes and token counts depend only on the seed,
    the query and the actions, never on the backend. ``reset(seed=s)`` builds a fresh world (same seed, same
    episode, bit for bit); ``reset()`` keeps the world running, so background traffic continues across
    episodes. Pass
    ``options={"query": i}`` to choose the query; otherwise queries come in file order (``shuffle=True``:
    a seeded permutation per pass). ``rollout(policy, queries, concurrency)`` runs many queries at once in
    the same world (LAMaS's training batches of 4 and test concurrency of 30).

    ## Copies
    An environment cannot be copied or pickled (``TypeError``, ``envs.nocopy``): its world is live SimPy
    processes. Build another with the same arguments and reset it with the same seed to get the same episode.

    ## Version History
    * v0: initial version (the backend seam changed nothing in the simulated dynamics). Since the decision
      skeleton (``envs.decision``): the episode key is ``info["episode_key"]`` (it was ``info["episode"]``, the
      key ``RecordEpisodeStatistics`` owns), ``action_type`` and ``flatten_obs``, unbounded (``np.inf``) bounds
      of ``load`` and ``progress``; same seed, same episode, bit for bit.
    """

    metadata = {"render_modes": [], "autoreset_mode": gym.vector.AutoresetMode.NEXT_STEP}

    def __init__(self, task: str = "gsm8k", split: str = "train", *, execution: str = "parallel",
                 variant: str = "lamas", cluster: ClusterConfig | None = None, num_layers: int = 4,
                 cost_weight: float = 3.0, token_weight: float = 0.0, seconds_weight: float = 0.0,
                 dataset_seed: int = 0, shuffle: bool = False, max_retries: int = 20, render_mode: str | None = None,
                 backend: Backend | None = None, action_type: str = "multidiscrete", flatten_obs: bool = False):
        spec = make_task(task)
        self.cfg = GraphConfig(task=spec, split=split, execution=execution, variant=variant)
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be an integer >= 1, got {num_layers!r}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries!r}")
        if backend is not None and cluster is not None:
            raise ValueError("give either cluster= (the simulated serving side) or backend=, not both")
        self.cluster = cluster if cluster is not None else ClusterConfig()
        self.backend: Backend = backend if backend is not None else SimBackend(self.cluster)
        self.num_layers, self.max_retries, self.shuffle = num_layers, max_retries, shuffle
        self.cost_weight, self.token_weight, self.seconds_weight = cost_weight, token_weight, seconds_weight
        self.dataset_seed = dataset_seed
        self.queries = make_queries(spec, split, dataset_seed)
        self.quality = quality(spec)
        self.operator_names = operator_set(spec.kind)
        k = len(self.operator_names)
        self._stop_idx = self.operator_names.index("EarlyStop")
        if action_type not in ("multidiscrete", "discrete"):
            raise ValueError(f"action_type must be 'multidiscrete' or 'discrete', got {action_type!r}")
        self.action_type, self.flatten_obs = action_type, bool(flatten_obs)
        self.action_space = (spaces.MultiDiscrete([k + 1] * k) if action_type == "multidiscrete"
                             else spaces.Discrete((k + 1) ** k))
        self.dict_space = spaces.Dict({
            "attempt": spaces.Discrete(max_retries + 1),
            "layer": spaces.Discrete(num_layers),
            "load": spaces.Box(0.0, np.inf, (3,), np.float32),
            "prev_first": spaces.Discrete(k + 1),
            "prev_ops": spaces.MultiBinary(k),
            "progress": spaces.Box(0.0, np.inf, (4,), np.float32),
            "query": spaces.Box(-1.0, 1.0, (EMBED_DIM,), np.float32),
        })
        self.observation_space = observation_space(self.dict_space, flatten_obs)
        self.render_mode = render_mode
        self.ledger_usd = 0.0      # cumulative $ of every call finished in this world (LAMaS's CostManager)
        self._init_decisions(self.backend, num_queries=len(self.queries), shuffle=shuffle)

    # ================================================================== the decision skeleton's hooks
    def _on_new_world(self, seed: int) -> None:
        self.ledger_usd = 0.0

    def _new_episode(self, q: int, visit: int, key: int, options: dict) -> _Episode:
        return _Episode(q=q, visit=visit, key=key)

    def _check_action(self, action) -> np.ndarray:
        return self.check_action(action)

    def _observe(self, obs: dict):
        return spaces.flatten(self.dict_space, obs).astype(np.float32) if self.flatten_obs else obs

    def _policy_action(self, policy, obs, ep: _Episode):
        a = policy.act(obs, episode=ep.key)
        k = len(self.operator_names)
        return self.encode_action(a) if self.action_type == "discrete" and np.size(a) == k else a

    def _step_result(self, ep: _Episode, action, done: bool) -> tuple[dict, float, dict]:
        if not done:
            return self._observe(ep.obs), 0.0, {}
        info = ep.info
        r = (info["score"] - self.cost_weight * info["cost_usd"] - self.token_weight / 50.0 * info["cp_tokens"]
             - self.seconds_weight * info["cp_seconds"])
        return self._observe(self._terminal_obs(ep)), float(r), info

    # ================================================================== the query process
    def _new_run(self, ep: _Episode) -> QueryRun:
        words = [self.run_seed, self.dataset_seed, task_key(self.cfg.task.name), _SPLIT_ID[self.cfg.split], ep.q,
                 ep.visit, ep.attempt]
        qid = (task_key(self.cfg.task.name) << 28) | (_SPLIT_ID[self.cfg.split] << 24) | ep.q
        return QueryRun(cfg=self.cfg, quality=self.quality, difficulty=float(self.queries.difficulty[ep.q]),
                        query_tokens=int(self.queries.prompt_tokens[ep.q]), query_content_id=qid,
                        draws=Draws(entropy(words)))

    def _episode(self, ep: _Episode):
        env = self.backend
        ep.start_s = env.now
        while True:
            ep.run = run = self._new_run(ep)
            ep.layers, ep.prev_ops = [], []
            ok = yield from self._attempt(ep, run)
            if ok or ep.attempt >= self.max_retries:
                break
            ep.attempt += 1
            yield env.timeout(CONSTANTS["retry_wait_s"][0])
        ep.end_s = env.now
        return self._final_info(ep, run, ok)

    def _attempt(self, ep: _Episode, run: QueryRun):
        env = self.backend
        t0 = env.now
        for plan in run.pre_steps():
            yield from self._exec(ep, plan)
            run.apply(plan)
        ep.pre_s = env.now - t0
        for layer in range(self.num_layers):
            act = yield from self.decision(ep, functools.partial(self._obs, ep, run, layer))
            names, dups = self._decode(act)
            ok = yield from self._layer(ep, run, layer, names, dups)
            if not ok:
                return False
            if "EarlyStop" in names:
                break
        t1 = env.now
        gen = run.post_steps()
        for plan in gen:
            yield from self._exec(ep, plan)
            run.apply_post(plan)
        ep.post_s = env.now - t1
        return True

    def _layer(self, ep: _Episode, run: QueryRun, layer: int, names: list[str], dups: int):
        env = self.backend
        t0 = env.now
        if self.cfg.parallel:
            plans = [run.plan(n, layer) for n in names]
            procs = [env.process(self._exec(ep, p)) for p in plans]
            bad = next((pr for p, pr in zip(plans, procs, strict=True) if p.raises), None)
            if bad is not None:           # asyncio.gather raises at once; the other operators run on
                yield bad
                return False
            secs = list((yield env.all_of(procs)).values()) if procs else []
            for p in plans:
                run.apply(p)
        else:
            plans, secs = [], []
            for n in names:
                p = run.plan(n, layer)
                plans.append(p)
                secs.append((yield from self._exec(ep, p)))
                if p.raises:
                    return False
                run.apply(p)
        cps = [p.cp_tokens for p in plans]
        contrib = run.record_layer(cps)
        ep.layers.append(self._layer_info(names, cps, secs, contrib, env.now - t0, dups))
        ep.prev_ops = [self.operator_names.index(n) for n in names]
        return True

    @staticmethod
    def _layer_info(names, cps, secs, contrib, seconds, dups) -> dict:
        b = max(range(len(cps)), key=cps.__getitem__) if cps else -1       # the first maximum (np.argmax's)
        bs = max(range(len(secs)), key=secs.__getitem__) if secs else -1
        return {"ops": list(names), "cp_tokens": cps, "op_seconds": secs, "cp_tokens_layer": contrib,
                "seconds": seconds, "bottleneck": names[b] if b >= 0 else None, "bottleneck_index": b,
                "bottleneck_seconds": names[bs] if bs >= 0 else None, "ignored_duplicates": dups}

    def _exec(self, ep: _Episode, plan: OpPlan):
        """Run one operator's stages on the backend; returns its seconds."""
        env = self.backend
        t0 = env.now
        for stage in plan.stages:
            evs = []
            for item in stage:
                if isinstance(item, Call):
                    segs = item.segments
                    p = item.prompt_tokens
                    ctx = p
                    for _, n in segs:
                        ctx -= n
                    if ctx > 0:
                        segs = (*segs, ((1 << 50) + self.new_key(), ctx))
                    evs.append(env.submit(BACKEND_POOL, p, item.completion_tokens, segs))
                    ep.calls += 1
                    ep.prompt_tokens += p
                    ep.completion_tokens += item.completion_tokens
                else:
                    assert isinstance(item, ToolRun)
                    evs.append(env.timeout(item.seconds))
            if len(evs) == 1:
                res = yield evs[0]
                ep.rejected += bool(getattr(res, "reject_reason", None))
            else:  # every call of the stage that was not served counts (concurrent calls too)
                res = yield env.all_of(evs)
                ep.rejected += sum(bool(getattr(v, "reject_reason", None)) for v in res.values())
        cost = plan.cost_usd
        ep.cost_usd += cost
        self.ledger_usd += cost
        return env.now - t0

    def encode_action(self, slots) -> int:
        """The ``Discrete`` action of a slot list (``action_type="discrete"``)."""
        a = self._check_slots(slots)
        return int(sum(int(v) * (len(self.operator_names) + 1) ** i for i, v in enumerate(a.tolist())))

    def decode_action(self, action: int) -> np.ndarray:
        """The slot list (int64) of a ``Discrete`` action, or ``ValueError`` naming the space."""
        k = len(self.operator_names)
        a = np.asarray(action)
        if a.size != 1 or a.dtype.kind not in "iu" or not 0 <= int(a.reshape(-1)[0]) < (k + 1) ** k:
            raise ValueError(f"action must be an integer in [0, {(k + 1) ** k}) (the action space is "
                             f"Discrete({(k + 1) ** k}), slots in mixed radix {k + 1}); got {action!r}")
        v = int(a.reshape(-1)[0])
        return np.array([(v // (k + 1) ** i) % (k + 1) for i in range(k)], np.int64)

    def check_action(self, action) -> np.ndarray:
        """``action`` as the int64 slot array, or ``ValueError`` naming the space (as the CMDP env's
        ``decode_action``). A ``Discrete`` action is decoded (``action_type="discrete"``)."""
        return self.decode_action(action) if self.action_type == "discrete" else self._check_slots(action)

    def _check_slots(self, action) -> np.ndarray:
        """Integer-valued floats are accepted (a policy's float tensor of indices), and any shape holding
        exactly K entries (a batch of one)."""
        k = len(self.operator_names)
        if type(action) is np.ndarray and action.shape == (k,) and action.dtype.kind in "iu":
            v = action.tolist()  # the common case (a policy's int array), checked without numpy reductions
            if min(v) >= 0 and max(v) <= k:
                return action.astype(np.int64)
        want = (f"{k} integers in 0..{k} (an operator index of env.operator_names, or {k} for an empty slot): "
                f"the action space is MultiDiscrete([{k + 1}] * {k})")
        try:
            a = np.asarray(action)
            ok = a.size == k and a.ndim >= 1 and a.dtype.kind in "iuf" and bool(np.all(np.isfinite(a)))
            a = a.reshape(-1)
            ok = ok and bool(np.all(a == np.round(a))) and bool(np.all((a >= 0) & (a <= k)))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"action entries must be {want}; got {action!r}")
        return a.astype(np.int64)

    def _decode(self, a: np.ndarray) -> tuple[list[str], int]:
        """Operator names of checked slots (``check_action``), and the duplicates ignored."""
        k = len(self.operator_names)
        names, seen, dups = [], set(), 0
        for v in a.tolist():
            if v == k:
                continue
            if v in seen:
                dups += 1
                continue
            seen.add(v)
            names.append(self.operator_names[v])
        return (names or ["EarlyStop"]), dups

    def _obs(self, ep: _Episode, run: QueryRun, layer: int) -> dict:
        k = len(self.operator_names)
        prev = np.zeros(k, np.int8)
        for i in ep.prev_ops:
            prev[i] = 1
        be = self.backend
        load = np.array(be.load(), np.float32)
        prog = np.array((be.now - ep.start_s, run.cp_layers, len(run.solutions), 1e3 * ep.cost_usd), np.float32)
        return {"attempt": min(ep.attempt, self.max_retries), "layer": layer, "load": load,
                "prev_first": ep.prev_ops[0] if ep.prev_ops else k, "prev_ops": prev, "progress": prog,
                "query": self.queries.embedding[ep.q].copy()}

    def _terminal_obs(self, ep: _Episode) -> dict:
        obs = self._obs(ep, ep.run, min(len(ep.layers), self.num_layers - 1))
        return obs

    def _final_info(self, ep: _Episode, run: QueryRun, ok: bool) -> MASFinalInfo:
        """The final info less the skeleton's keys (``envs.infos.MASFinalInfo``)."""
        score = run.score if ok else 0.0
        return {"score": score, "cp_tokens": run.cp_tokens,
                "cp_tokens_layers": run.cp_layers, "cp_tokens_post": run.post_cp, "cp_seconds": ep.end_s - ep.start_s,
                "pre_seconds": ep.pre_s, "post_seconds": ep.post_s, "cost_usd": ep.cost_usd,
                "cumulative_cost_usd": self.ledger_usd, "llm_calls": ep.calls, "prompt_tokens": ep.prompt_tokens,
                "completion_tokens": ep.completion_tokens, "retries": ep.attempt, "failed": not ok,
                "num_layers": len(ep.layers), "layers": ep.layers, "clipped_tokens": run.clipped_tokens,
                "rejected_calls": ep.rejected,
                "generate_first": bool(ep.layers and ep.layers[0]["ops"][0] in GENERATE_TYPE)}
