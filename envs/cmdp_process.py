"""The query process of ``envs.cmdp.MASLatencyCMDPEnv``: its episode record, calls, observations and final info.

Split out of ``envs.cmdp`` to keep each file small. ``CMDPQueryProcess`` is a mixin of methods only (no state of
its own): the SimPy process that walks a query's topology (``_episode``, one decision per agent call, sequential
or parallel execution), each call's submission to the backend (``_call``), the observation built at each
decision (``system_state``, ``_obs``, ``_out_obs``) and the episode's final info (``_final_info``). The
environment class (``envs.cmdp``) owns the spaces, the configuration, the world and the SLO; it lists this mixin
before ``envs.decision.DecisionEnv`` so that ``_episode`` here overrides the skeleton's.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
from gymnasium import spaces

from .backend import call_timing
from .cmdp_catalog import ROLE_NAMES, STRATEGY_NAMES
from .cmdp_query import QueryState
from .decision import Episode
from .infos import CMDPFinalInfo
from .topologies import MODES, Node, Topology

__all__ = ["CMDPQueryProcess"]

_ROLE_ID = {r: i for i, r in enumerate(ROLE_NAMES)}
_MODE_ID = {m: i for i, m in enumerate(MODES)}


@dataclass(slots=True, kw_only=True, eq=False)
class _Episode(Episode):
    topology: Topology
    state: QueryState
    slo_s: float
    slo_factor: float | None
    reference_s: float
    overrun_s: float = 0.0
    cost_usd: float = 0.0
    rejected: int = 0
    node: Node | None = None
    calls: list[dict] = field(default_factory=list)
    decided: int = 0


class CMDPQueryProcess:
    """Methods of ``MASLatencyCMDPEnv`` that run a query and observe it (see the module docstring)."""

    # ================================================================== the query process
    def _episode(self, ep: _Episode):
        env = self.backend
        nodes = ep.topology.nodes
        done = [False] * len(nodes)
        started = [False] * len(nodes)
        running: dict[int, object] = {}
        returned: set[int] = set()
        while not all(done):
            for node in nodes:
                if started[node.index] or not all(done[d] for d in node.deps):
                    continue
                if self.execution == "sequential" and running:
                    break
                ep.node = node
                action = yield from self.decision(ep, functools.partial(self._obs, ep, node))
                ep.decided += 1
                started[node.index] = True
                running[node.index] = env.process(self._call(ep, node, *action, returned))
                if self.execution == "sequential":
                    break
            yield env.any_of(list(running.values()))
            for i in [i for i in running if i in returned]:
                done[i] = True
                del running[i]
        ep.end_s = env.now
        return self._final_info(ep)

    def _call(self, ep: _Episode, node: Node, model: int, strategy: int, returned: set[int]):
        env = self.backend
        st = ep.state
        plan = st.call(node, strategy)
        segs = (*plan.segments, ((1 << 50) + self.new_key(), plan.context_tokens))
        t0 = env.now
        req = yield env.submit(self.model_names[model], plan.prompt_tokens, plan.completion_tokens, segs)
        served = req.reject_reason is None
        st.finish(node, model, strategy, plan.completion_tokens, served)
        price = self.models[model].price_usd_per_token
        usd = price * (plan.prompt_tokens + plan.completion_tokens) if served else 0.0
        ep.cost_usd += usd
        ep.rejected += not served
        n = plan.completion_tokens
        rec = {"node": node.index, "role": node.role, "model": self.model_names[model],
               "strategy": STRATEGY_NAMES[strategy], "prompt_tokens": plan.prompt_tokens, "output_tokens": n,
               "start_s": t0 - ep.start_s, "latency_s": env.now - t0, "cost_usd": usd, "served": served,
               "reject_reason": req.reject_reason}
        if served:
            rec["ttft_s"], rec["tpot_s"] = call_timing(req, t0, n)
        ep.calls.append(rec)
        returned.add(node.index)

    # ================================================================== observations and info
    def system_state(self) -> np.ndarray:
        """(models, 4): waiting, running, KV usage, TTFT EMA (ms) per model pool, now."""
        for i, name in enumerate(self.model_names):
            self.backend.pool_state(name, self._sys[i])
        return self._sys.copy()

    def _obs(self, ep: _Episode, node: Node) -> dict:
        st = ep.state
        sysm = self.system_state()
        ns = len(STRATEGY_NAMES)
        prompts = np.array([[st.prompt_tokens(node, s) for s in range(ns)]] * len(self.models), dtype=np.float64)
        emb = self.queries.embedding[ep.q]
        ttft, tpot, length = self.estimator.predict(sysm, _ROLE_ID[node.role], prompts, emb)
        est = ttft + length * tpot
        elapsed = self.backend.now - ep.start_s
        b = ep.slo_s - elapsed
        paths = ep.topology.path_lengths()
        return {
            "budget": np.array([b, b / ep.slo_s], np.float32),
            "estimates": np.clip(est.reshape(-1), 0.0, 1e6).astype(np.float32),
            "nodes_left": np.array([len(ep.topology) - ep.decided, paths[node.index]], np.float32),
            "prompt_tokens": np.array([st.base_prompt_tokens(node)], np.float32),
            "query": emb.copy(),
            "role": _ROLE_ID[node.role],
            "step": node.index,
            "system": sysm.reshape(-1).astype(np.float32),
            "topology": _MODE_ID[ep.topology.mode],
        }

    def _out_obs(self, obs: dict):
        """What the caller gets: a fresh copy (the terminal observation repeats the last decision's)."""
        if self.flatten_obs:
            return spaces.flatten(self.dict_space, obs).astype(np.float32)
        return {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in obs.items()}

    def _final_info(self, ep: _Episode) -> CMDPFinalInfo:
        """The episode's keys of ``envs.infos.CMDPFinalInfo`` (``step`` adds the step's, the skeleton its own)."""
        lat = ep.end_s - ep.start_s
        q = ep.state.score
        ok = lat <= ep.slo_s
        calls = sorted(ep.calls, key=lambda c: c["node"])
        extra = {"quality_by_action": ep.state.counterfactual_scores()} if self.counterfactual_quality else {}
        return {"quality": q, "quality_expected": ep.state.expected_score(), **extra, "latency_s": lat, "slo_s": ep.slo_s, "slo_factor": ep.slo_factor,
                "reference_s": ep.reference_s, "slo_violated": not ok, "goodput": float(q > 0 and ok),
                "cost_usd": ep.cost_usd, "topology": ep.topology.mode,
                "num_calls": len(calls), "rejected_calls": ep.rejected, "calls": calls,
                "clipped_tokens": ep.state.clipped_tokens}
