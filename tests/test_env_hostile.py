"""Environments under careless use: bad actions are refused with the space named and the episode survives;
copies and pickles are refused with a message saying what to do instead."""

import copy
import pickle

import numpy as np
import pytest

from envs import ClusterConfig, MASLatencyEnv
from envs.cmdp import MASLatencyCMDPEnv

GOOD = [np.array([1, 2, 7, 7, 7, 7, 7]), np.array([5, 6, 7, 7, 7, 7, 7]), np.array([0, 7, 7, 7, 7, 7, 7])]


def _env():
    return MASLatencyEnv("humaneval", "train", cluster=ClusterConfig(background_rate_per_s=2.0))


def _play(env, actions, bad=()):
    """Reset with seed 3 and play ``actions``, trying every ``bad`` action (refused) before each good one."""
    env.reset(seed=3, options={"query": 2})
    for a in actions:
        for b in bad:
            with pytest.raises(ValueError, match=r"MultiDiscrete\(\[8\] \* 7\)"):
                env.step(b)
        obs, r, term, _, info = env.step(a)
        if term:
            return r, info
    raise AssertionError("the episode did not end")


@pytest.mark.parametrize("bad", [
    np.arange(10) % 8,                      # 10 entries for 7
    np.array([1, 2, 3]),                    # too few
    3.0, 3, "1234567", ["a"] * 7, None,     # a float, an int, strings, nothing
    np.array([1.5, 2, 7, 7, 7, 7, 7]),      # a non-integer number
    np.array([1, 2, 8, 7, 7, 7, 7]),        # out of range
    np.array([-1, 2, 7, 7, 7, 7, 7]),
    np.array([np.nan, 2, 7, 7, 7, 7, 7]),
    np.array([True] * 7),
    {"ops": [1, 2]},
])
def test_bad_actions_are_refused_and_the_episode_survives(bad):
    env = _env()
    r_ref, ref = _play(env, GOOD)
    r, info = _play(env, GOOD, bad=[bad])
    assert r == r_ref and info["cp_seconds"] == ref["cp_seconds"] and info["layers"] == ref["layers"], \
        "a refused action changes nothing: the same episode as without it"


def test_integer_valued_floats_and_a_batch_of_one_are_accepted():
    env = _env()
    r_ref, ref = _play(env, GOOD)
    r, info = _play(env, [a.astype(np.float32).reshape(1, -1) for a in GOOD])
    assert r == r_ref and info["cp_seconds"] == ref["cp_seconds"]


@pytest.mark.parametrize("make", [_env, lambda: MASLatencyCMDPEnv("gsm8k", "train", load="idle")])
def test_copies_and_pickles_are_refused_with_a_reason(make):
    env = make()
    env.reset(seed=0)
    for f in (copy.deepcopy, copy.copy, pickle.dumps):
        with pytest.raises(TypeError, match=r"cannot be (deep-copied|copied|pickled).*reset\(seed=\.\.\.\)"):
            f(env)
    env.step(env.action_space.sample())  # still usable
