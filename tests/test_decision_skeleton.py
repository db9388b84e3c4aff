"""The decision skeleton's interface, as a new environment uses it: a minimal third env on ``DecisionEnv``
(two LLM calls per query, the action picks each call's output length) passes Gymnasium's checker, runs
``rollout`` and gets the skeleton's keys in its final info."""

from dataclasses import dataclass

import numpy as np
import pytest
from gymnasium import spaces
from gymnasium.utils.env_checker import check_env

from envs import ClusterConfig, DecisionEnv, Episode, SimBackend
from envs.backend import BACKEND_POOL

LENGTHS = (16, 64, 256)


@dataclass(slots=True, kw_only=True, eq=False)
class _Ep(Episode):
    tokens: int = 0


class TwoCalls(DecisionEnv):
    metadata = {"render_modes": []}

    def __init__(self, num_queries: int = 5):
        self.action_space = spaces.Discrete(len(LENGTHS))
        self.observation_space = spaces.Box(0.0, np.inf, (2,), np.float32)
        self._init_decisions(SimBackend(ClusterConfig(replicas=1, background_rate_per_s=1.0)),
                             num_queries=num_queries, shuffle=False)

    def _new_episode(self, q, visit, key, options):
        return _Ep(q=q, visit=visit, key=key, start_s=self.backend.now)

    def _episode(self, ep):
        for i in range(2):
            a = yield from self.decision(ep, lambda i=i: np.array([i, self.backend.now - ep.start_s], np.float32))
            req = yield self.backend.submit(BACKEND_POOL, 100 + ep.q, LENGTHS[a], ((ep.q, 100 + ep.q),))
            ep.tokens += LENGTHS[a] if req.reject_reason is None else 0
        ep.end_s = self.backend.now
        return {"tokens": ep.tokens}

    def _check_action(self, action):
        a = int(np.asarray(action).reshape(-1)[0])
        if not 0 <= a < len(LENGTHS):
            raise ValueError(f"action must be in 0..{len(LENGTHS) - 1}")
        return a

    def _step_result(self, ep, action, done):
        if not done:
            return ep.obs, 0.0, {}
        return ep.obs.copy(), -float(ep.end_s - ep.start_s), ep.info   # a fresh object (Gymnasium's rule)


class Longest:
    def act(self, obs, episode=0):
        return 2


@pytest.mark.filterwarnings("ignore:.*infinity")
def test_a_third_env_on_the_skeleton():
    check_env(TwoCalls(), skip_render_check=True)
    env = TwoCalls()
    obs, info = env.reset(seed=0)
    assert info == {"query": 0, "visit": 0} and obs[0] == 0
    obs, r, term, _, info = env.step(1)
    assert not term and obs[0] == 1 and obs[1] > 0
    obs, r, term, _, info = env.step(0)
    assert term and info["tokens"] == 64 + 16 and r == -(info["end_s"] - info["start_s"])
    assert {"query", "visit", "episode_key", "start_s", "end_s"} <= set(info)
    with pytest.raises(RuntimeError, match="call reset"):
        env.step(0)
    with pytest.raises(ValueError, match="action must be"):
        env.reset()
        env.step(7)                      # refused before the world moves: the episode goes on
    assert not env.step(2)[2]
    infos = env.rollout(Longest(), [0, 1, 2, 3], concurrency=2)
    assert [i["query"] for i in infos] == [0, 1, 2, 3] and all(i["tokens"] == 512 for i in infos)
    assert len({i["episode_key"] for i in infos}) == 4 and env.decision_wall_s > 0


def test_same_seed_same_episode_on_the_skeleton():
    def run():
        env = TwoCalls()
        env.start_world(3)
        return [(i["start_s"], i["end_s"]) for i in env.rollout(Longest(), [4, 2, 0], concurrency=3)]

    assert run() == run()
