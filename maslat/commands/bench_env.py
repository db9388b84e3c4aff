"""maslat bench env: episodes per second of MASLatency-v0 with background load, on one core."""

from __future__ import annotations

import time

from ._common import add_json_flag, emit_json, format_table

HELP = "environment speed: MASLatency-v0 episodes/s with background load (Gymnasium loop and concurrent rollout)"
DESCRIPTION = """\
Runs MASLatency-v0 (GSM8K by default) with the default cluster (2 x h100-llama-3.1-8b, Poisson background at
the Azure conversation trace's 5.53 requests/s) and an untrained LAMaS controller choosing the layers:

  gym      : the Gymnasium loop, gym.make + reset/step, one query at a time (each episode spans ~10
             simulated seconds, all of whose background requests are simulated too)
  rollout  : env.rollout(..., concurrency=30), LAMaS's test protocol (30 queries in flight)

episodes_per_s is the rollout figure (the experiment's workload); both are reported.
"""


def configure(p) -> None:
    p.add_argument("--task", default="gsm8k")
    p.add_argument("--episodes", type=int, default=1000, help="episodes for the rollout measurement")
    p.add_argument("--gym-episodes", type=int, default=200, help="episodes for the Gymnasium-loop measurement")
    p.add_argument("--seed", type=int, default=0)
    add_json_flag(p)


def _policy(task: str, seed: int):
    import numpy as np

    from agents.controller import ControllerPolicy, LAMaSController
    from envs import make_task, operator_embeddings, operator_set

    kind = make_task(task).kind
    ctrl = LAMaSController(operator_embeddings(kind), seed=seed)
    return ControllerPolicy(ctrl, operator_set(kind), np.random.default_rng(seed), record=False)


def run(args) -> int:
    import gymnasium as gym
    import torch

    import envs  # noqa: F401  (registers MASLatency-v0)

    torch.set_num_threads(1)
    pol = _policy(args.task, args.seed)
    env = gym.make("MASLatency-v0", task=args.task, split="test")
    env.reset(seed=args.seed)
    t0, cpu0 = time.perf_counter(), time.process_time()
    calls = 0
    for _ in range(args.gym_episodes):
        obs, _ = env.reset()
        done = False
        while not done:
            obs, _r, term, trunc, info = env.step(pol.act(obs))
            done = term or trunc
        calls += info["llm_calls"]
    gym_wall, gym_cpu = time.perf_counter() - t0, time.process_time() - cpu0
    gym_bg = env.unwrapped.world.num_submitted - calls
    raw = env.unwrapped
    raw.reset(seed=args.seed)
    n = args.episodes
    queries = [i % len(raw.queries) for i in range(n)]
    sub0 = raw.world.num_submitted
    t0, cpu0 = time.perf_counter(), time.process_time()
    infos = raw.rollout(pol, queries, concurrency=30)
    ro_wall, ro_cpu = time.perf_counter() - t0, time.process_time() - cpu0
    mas_calls = sum(i["llm_calls"] for i in infos)
    out = {"episodes_per_s": n / ro_wall, "episodes_per_s_cpu": n / ro_cpu,
           "gym_episodes_per_s": args.gym_episodes / gym_wall, "gym_episodes_per_s_cpu": args.gym_episodes / gym_cpu,
           "rollout_episodes": n, "gym_episodes": args.gym_episodes,
           "rollout_llm_calls_per_episode": mas_calls / n,
           "rollout_background_requests_per_episode": (raw.world.num_submitted - sub0 - mas_calls) / n,
           "gym_background_requests_per_episode": gym_bg / args.gym_episodes,
           "rollout_simulated_s": raw.world.now, "task": args.task}
    print(format_table([["rollout (concurrency 30)", out["episodes_per_s"], out["rollout_background_requests_per_episode"]],
                        ["gym loop (1 at a time)", out["gym_episodes_per_s"], out["gym_background_requests_per_episode"]]],
                       ["mode", "episodes/s", "background req/episode"]))
    if args.json:
        emit_json(out)
    return 0
