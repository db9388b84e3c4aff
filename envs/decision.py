"""The decision skeleton every environment shares: run the world until the next decision, hand it over, resume.

An environment here is a *query process* (a generator on the ``envs.backend`` seam) that needs a decision now
and then, wrapped in Gymnasium's ``reset``/``step``. ``DecisionEnv`` owns everything that is not specific to
one environment, so the environments (``envs.mas_latency``, ``envs.cmdp``, and any new one) stay thin:

* the **backend** (``SimBackend`` or ``maslat.livebackend.LiveBackend``) and its worlds: ``reset(seed=s)``
  builds a fresh one, ``reset()`` keeps it running;
* the **query order** (``options={"query": i}`` or file order, a seeded permutation per pass with
  ``shuffle``), the **visit count** of each query and the **keys** (one counter per world: episode keys and
  content ids of prompt segments);
* **suspension**: in Gymnasium mode the query process yields an event at each decision and the world runs
  until that event is pending (``step`` succeeds it with the checked action) or the episode has ended;
  in ``rollout`` mode many query processes run at once and a policy answers each decision inline;
* the **final info**: the process returns it; ``step`` hands it over on the last step (``query``, ``visit``,
  ``episode_key``, ``start_s``, ``end_s`` are set for every environment).

Writing an environment on it (``DecisionEnv`` subclass)::

    class MyEnv(DecisionEnv):
        def __init__(self, ...):
            self._init_decisions(backend, num_queries=..., shuffle=...)    # after the action space exists

        def _new_episode(self, q, visit, key, options) -> Episode:        # the query's record (a subclass)
        def _episode(self, ep):                                          # the query's life, a generator:
            ...
            action = yield from self.decision(ep, lambda: obs)           #   a decision (obs built when called)
            ...
            return info                                                  #   the final info (a dict)
        def _check_action(self, action):                                 # ValueError before the world moves
        def _step_result(self, ep, action, done) -> (obs, reward, info)  # obs a fresh object every call
        def _reset_info(self, ep) -> dict                                # optional
        def _observe(self, obs)                                          # optional (reset's observation)
        def _policy_action(self, policy, obs, ep)                        # optional (rollout)
        def _on_new_world(self, seed)                                    # optional (per-world state)

``self.decision_wall_s`` sums the wall time of the decisions (observations and inline policies).
``self.backend``, ``self.run_seed`` (the world's seed), ``self.new_key()`` (a key unique in the world) and
``self.world`` (the simulated world, ``None`` on a live backend) are there for the subclass.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from .backend import Backend
from .nocopy import NotCopyable
from .query_order import QueryOrder

__all__ = ["DecisionEnv", "Episode"]


@dataclass(slots=True, kw_only=True, eq=False)
class Episode:
    """One query in flight. Subclass it (``@dataclass(slots=True, kw_only=True, eq=False)``) for the env's
    own bookkeeping.

    Attributes:
        q: the query's index; visit: how many times this world has run it before; key: the episode key.
        pending: the decision event a Gymnasium caller has to answer (``None`` when none is pending).
        obs: the observation of the latest decision; info: the final info once the episode has ended.
    """

    q: int
    visit: int
    key: int
    start_s: float = 0.0
    end_s: float | None = None
    pending: Any = None
    obs: Any = None
    info: dict | None = None
    decide: Callable | None = None
    on_finish: Callable | None = None


def observation_space(dict_space: spaces.Dict, flatten: bool) -> spaces.Space:
    """The env's observation space: ``dict_space`` itself, or its flat float32 ``Box`` (``flatten_obs=True``)."""
    if not flatten:
        return dict_space
    flat = spaces.flatten_space(dict_space)
    return spaces.Box(flat.low.astype(np.float32), flat.high.astype(np.float32), dtype=np.float32)


class DecisionEnv(NotCopyable, gym.Env):
    """Gymnasium ``reset``/``step`` and ``rollout`` over a query process that needs decisions (module doc)."""

    backend: Backend

    def _init_decisions(self, backend: Backend, *, num_queries: int, shuffle: bool) -> None:
        self.backend = backend
        self.run_seed = 0
        self._visits: dict[int, int] = {}
        self._queries = QueryOrder(num_queries, shuffle)
        self._ep: Episode | None = None
        self._pause = None
        self._keys = 0
        self.decision_wall_s = 0.0   # wall seconds spent building observations and choosing actions

    # ------------------------------------------------------------------ what a subclass provides
    def _new_episode(self, q: int, visit: int, key: int, options: dict) -> Episode:
        raise NotImplementedError

    def _episode(self, ep: Episode) -> Generator:
        raise NotImplementedError

    def _check_action(self, action) -> Any:
        raise NotImplementedError

    def _step_result(self, ep: Episode, action, done: bool) -> tuple[Any, float, dict]:
        raise NotImplementedError

    def _reset_info(self, ep: Episode) -> dict:
        return {"query": ep.q, "visit": ep.visit}

    def _observe(self, obs):
        """The observation as ``reset`` hands it over (e.g. flattened); the identity by default."""
        return obs

    def _policy_action(self, policy, obs, ep: Episode):
        return policy.act(obs, episode=ep.key)

    def _on_new_world(self, seed: int) -> None:
        pass

    # ------------------------------------------------------------------ what a subclass uses
    @property
    def world(self):
        """The simulated world (``None`` before the first reset, or when the backend is not the simulator)."""
        return getattr(self.backend, "world", None)

    def new_key(self) -> int:
        """A key unique in this world (episode keys and prompt content ids share the counter)."""
        self._keys += 1
        return self._keys

    def decision(self, ep: Episode, make_obs: Callable[[], Any]) -> Generator:
        """``action = yield from self.decision(ep, lambda: obs)`` inside ``_episode``: the decision's action.

        ``make_obs`` builds the observation now; the wall time spent building it and, in ``rollout``, choosing
        the action is added to ``decision_wall_s`` (on a live backend it is part of every measured latency;
        the simulator's clock does not move while it is spent)."""
        t0 = time.perf_counter()
        ep.obs = obs = make_obs()
        act = ep.decide(ep, obs)
        self.decision_wall_s += time.perf_counter() - t0
        if self.backend.is_event(act):
            act = yield act
        return act

    def start_world(self, seed: int) -> None:
        """A fresh world for ``seed`` with no episode started (``reset(seed=...)`` less its first episode):
        what ``rollout`` callers use so that every query of the rollout is theirs."""
        gym.Env.reset(self, seed=seed)
        self._new_world(seed)

    def close(self) -> None:
        self.backend.close()

    # ------------------------------------------------------------------ Gymnasium API
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is not None or not self.backend.started:
            self._new_world(int(self.np_random.integers(2**31)) if seed is None else seed)
        options = options or {}
        q = self._queries.next(options, self.np_random)
        ep = self._ep = self._start(q, options, self._gym_decide)
        self._advance(ep)
        if ep.pending is None:
            raise RuntimeError("the episode ended before its first decision")
        return self._observe(ep.obs), self._reset_info(ep)

    def step(self, action):
        ep = self._ep
        if ep is None or ep.pending is None:
            raise RuntimeError("call reset() before step(), and again after an episode ends")
        act = self._check_action(action)  # raises before the world moves: the episode survives a bad action
        ev, ep.pending = ep.pending, None
        ev.succeed(act)
        self._advance(ep)
        done = ep.info is not None
        if done:
            self._ep = None
        obs, reward, info = self._step_result(ep, act, done)
        return obs, reward, done, False, info

    # ------------------------------------------------------------------ many queries at once
    def rollout(self, policy, queries: Sequence[int], *, concurrency: int = 1,
                on_done: Callable[[dict], None] | None = None) -> list[dict]:
        """Run ``queries`` through the current world, at most ``concurrency`` at a time.

        A new query starts as soon as one finishes (LAMaS's asyncio semaphore); with ``concurrency`` equal to
        the number of queries they all start together (a training batch). The policy answers every decision
        (``_policy_action``: ``policy.act(obs, episode=key)`` by default). Returns the final ``info`` of each
        query, in the order given.
        """
        if not self.backend.started:
            self._new_world(0)
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency!r}")
        be = self.backend
        out: list[dict | None] = [None] * len(queries)
        todo = list(enumerate(queries))[::-1]
        done_ev = be.event()
        left = [len(queries)]

        def decide(ep, obs):
            return self._check_action(self._policy_action(policy, obs, ep))

        def finished(i: int, ep: Episode) -> None:
            out[i] = ep.info
            if on_done is not None:
                on_done(ep.info)
            left[0] -= 1
            if todo:
                launch()
            elif left[0] == 0:
                done_ev.succeed()

        def launch() -> None:
            i, q = todo.pop()
            self._start(int(q), {}, decide, lambda ep, i=i: finished(i, ep))

        if not queries:
            return []
        for _ in range(min(concurrency, len(queries))):
            launch()
        be.run(until=done_ev)
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------------ internals
    def _new_world(self, seed: int) -> None:
        self.run_seed = seed
        self.backend.reset(seed)
        self._visits, self._keys = {}, 0
        self._on_new_world(seed)
        self._queries.reset()
        self.action_space.seed(seed)

    def _start(self, q: int, options: dict, decide, on_finish=None) -> Episode:
        visit = self._visits.get(q, 0)
        self._visits[q] = visit + 1
        ep = self._new_episode(q, visit, self.new_key(), options)
        ep.decide, ep.on_finish = decide, on_finish
        self.backend.process(self._life(ep))
        return ep

    def _life(self, ep: Episode):
        info = yield from self._episode(ep)
        info.update(query=ep.q, visit=ep.visit, episode_key=ep.key, start_s=ep.start_s, end_s=ep.end_s)
        ep.info = info
        if ep.on_finish is not None:
            ep.on_finish(ep)
        else:
            self._wake()

    def _gym_decide(self, ep: Episode, obs):
        ev = self.backend.event()
        ep.pending = ev
        self._wake()
        return ev

    def _wake(self) -> None:
        if self._pause is not None and not self._pause.triggered:
            self._pause.succeed()

    def _advance(self, ep: Episode) -> None:
        """Run the world until the Gymnasium episode needs a decision or has ended."""
        if ep.pending is not None or ep.info is not None:
            return
        self._pause = self.backend.event()
        self.backend.run(until=self._pause)
        self._pause = None
