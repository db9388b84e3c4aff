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

--background exact (the default path: every background request simulated), tape (the background replayed
from a tape simulated once per seed, an approximation: envs.bgtape) or both (default): both measured in this
run, the tape's figures under "tape" and the ratios tape/exact under "tape_over_exact" (the machine's load
moves absolute figures; the ratio is what to compare). The tape's one-off recording time is
"tape_build_s".
"""


def configure(p) -> None:
    p.add_argument("--task", default="gsm8k")
    p.add_argument("--episodes", type=int, default=1000, help="episodes for the rollout measurement")
    p.add_argument("--gym-episodes", type=int, default=200, help="episodes for the Gymnasium-loop measurement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--background", choices=("exact", "tape", "both"), default="both",
                   help="how background load is served (tape: an approximation, envs.bgtape)")
    add_json_flag(p)


def _policy(task: str, seed: int):
    import numpy as np

    from agents.controller import ControllerPolicy, LAMaSController
    from envs import make_task, operator_embeddings, operator_set

    kind = make_task(task).kind
    ctrl = LAMaSController(operator_embeddings(kind), seed=seed)
    return ControllerPolicy(ctrl, operator_set(kind), np.random.default_rng(seed), record=False)


def _measure(args, pol, backend) -> dict:
    import gymnasium as gym

    kw = {} if backend is None else {"backend": backend}
    env = gym.make("MASLatency-v0", task=args.task, split="test", **kw)
    c_build = time.process_time()
    env.reset(seed=args.seed)
    build_s = time.process_time() - c_build
    t0, cpu0 = time.perf_counter(), time.process_time()
    calls = 0
    sub_gym0 = env.unwrapped.world.num_submitted
    for _ in range(args.gym_episodes):
        obs, _ = env.reset()
        done = False
        while not done:
            obs, _r, term, trunc, info = env.step(pol.act(obs))
            done = term or trunc
        calls += info["llm_calls"]
    gym_wall, gym_cpu = time.perf_counter() - t0, time.process_time() - cpu0
    gym_bg = env.unwrapped.world.num_submitted - sub_gym0 - calls
    raw = env.unwrapped
    raw.reset(seed=args.seed)
    n = args.episodes
    queries = [i % len(raw.queries) for i in range(n)]
    sub0 = raw.world.num_submitted
    t0, cpu0 = time.perf_counter(), time.process_time()
    infos = raw.rollout(pol, queries, concurrency=30)
    ro_wall, ro_cpu = time.perf_counter() - t0, time.process_time() - cpu0
    mas_calls = sum(i["llm_calls"] for i in infos)
    tape = getattr(raw.world, "tape", None)
    bg_per_s = None if tape is None else tape.num_background / (tape.t0_s + tape.horizon_s)
    return {"episodes_per_s": n / ro_wall, "episodes_per_s_cpu": n / ro_cpu,
            "gym_episodes_per_s": args.gym_episodes / gym_wall, "gym_episodes_per_s_cpu": args.gym_episodes / gym_cpu,
            "rollout_episodes": n, "gym_episodes": args.gym_episodes,
            "rollout_llm_calls_per_episode": mas_calls / n,
            "rollout_background_requests_per_episode": ((raw.world.num_submitted - sub0 - mas_calls) / n
                                                        if tape is None else bg_per_s * raw.world.now / n),
            "gym_background_requests_per_episode": (gym_bg / args.gym_episodes if tape is None else None),
            "rollout_simulated_s": raw.world.now, "task": args.task, "reset_s": build_s}


def run(args) -> int:
    import torch

    import envs  # noqa: F401  (registers MASLatency-v0)
    from envs.background_modes import TapeBackend

    torch.set_num_threads(1)
    pol = _policy(args.task, args.seed)
    modes = ("exact", "tape") if args.background == "both" else (args.background,)
    res = {m: _measure(args, pol, TapeBackend() if m == "tape" else None) for m in modes}
    out = dict(res[modes[0]])
    out["background"] = args.background
    rows = [[f"{m}: rollout (concurrency 30)", r["episodes_per_s"], r["rollout_background_requests_per_episode"]]
            for m, r in res.items()]
    rows += [[f"{m}: gym loop (1 at a time)", r["gym_episodes_per_s"], r["gym_background_requests_per_episode"]]
             for m, r in res.items()]
    if "tape" in res:
        t = res["tape"]
        out["tape_build_s"] = t.pop("reset_s")
        if len(modes) == 2:
            out["tape"] = t
            out["tape_over_exact"] = {k: t[k] / out[k] for k in ("episodes_per_s", "episodes_per_s_cpu",
                                                                  "gym_episodes_per_s", "gym_episodes_per_s_cpu")}
    out.pop("reset_s", None)
    print(format_table(rows, ["mode", "episodes/s", "background req/episode"]))
    if "tape_over_exact" in out:
        print("tape / exact: " + ", ".join(f"{k} {v:.2f}x" for k, v in out["tape_over_exact"].items()))
    if args.json:
        emit_json(out)
    return 0
