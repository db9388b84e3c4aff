"""maslat train: train a LAMaS/MaAS controller, or a MASLatency-CMDP-v0 policy or its estimators."""

from __future__ import annotations

import csv
import time
from pathlib import Path

from traces.atomic import atomic_open

from ..checkpoints import save_checkpoint
from ._cmdp import CMDP_METHODS, add_cmdp_args, train_cmdp
from ._common import add_json_flag, emit_json, progress
from ._mas import add_cluster_args, cluster_from_args

HELP = "train a controller, a CMDP policy or the estimators: `maslat train lamas|ppo_lagrangian|estimators ...`"
DESCRIPTION = """\
Train one method's controller with LAMaS's protocol (train split in file order, 4 epochs, batches of 4
queries run concurrently on the simulated cluster, one Adam step per batch) and write:

  OUT/controller.pt   the checkpoint (state dict + the run's arguments), for `maslat evaluate`
  OUT/metrics.csv     one row per batch: losses/loss, train/score, train/cp_tokens, latency/cp_seconds, ...

Methods: lamas, maas, lamas_lambda0, lamas_no_cp, lamas_sequential (static baselines need no training).

MASLatency-CMDP-v0 (system-aware routing under a latency SLO):

  estimators       generate the two-phase dataset in simulation (Phase 1: agent prompts of planned topologies
                   with random strategies; Phase 2: every prompt x strategy x model under background
                   concurrency N), train F_lat and F_len, print their held-out MAPE and calibration, and write
                   an estimator bundle (OUT/estimators.npz; `--estimator` of the other commands takes it)
  ppo_lagrangian   PPO-Lagrangian on one load regime (--load): OUT/policy.pt + OUT/metrics.csv (lambda, cost,
                   SLO attainment per epoch)
  masrouter        the load-blind MasRouter-style router (quality - cost_rate x $, REINFORCE, no baseline)

examples:
  maslat train lamas --task gsm8k --seed 0 --out runs/lamas-gsm8k-0
  maslat train estimators --json
  maslat train ppo_lagrangian --task gsm8k --load busy --seed 0
  maslat train masrouter --task humaneval
"""


def configure(p) -> None:
    p.add_argument("method", help="lamas | maas | lamas_lambda0 | lamas_no_cp | lamas_sequential | estimators | "
                                  "ppo_lagrangian | masrouter")
    p.add_argument("--task", default="gsm8k", help="gsm8k | math | humaneval | mbpp")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=None,
                   help="passes over the train split (default: 4, more on a small split to reach 120 Adam steps)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--token-weight", type=float, default=None, help="lambda_t (default: the method's)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default runs/<method>-<task>-<seed>)")
    add_cluster_args(p)
    add_cmdp_args(p, dataset=True)
    add_json_flag(p)


def run(args) -> int:
    import torch

    from agents.lamas import METHODS, Args, train, train_epochs

    torch.set_num_threads(1)
    if args.method in CMDP_METHODS:
        return train_cmdp(args)
    if args.method not in METHODS or not METHODS[args.method].learned:
        learned = sorted(m for m, s in METHODS.items() if s.learned) + list(CMDP_METHODS)
        raise ValueError(f"method must be one of {learned}, got {args.method!r}")
    a = Args(method=args.method, task=args.task, seed=args.seed, epochs=args.epochs, batch_size=args.batch_size,
             lr=args.lr, token_weight=args.token_weight, cluster=cluster_from_args(args))
    out = args.out or Path("runs") / f"{args.method}-{args.task}-{args.seed}"
    from envs import make_task

    total = make_task(args.task).num_train * train_epochs(a)
    t0 = time.perf_counter()
    with progress(total, f"train {args.method} on {args.task}", unit="episode") as bar:
        res = train(a, progress=bar.update)
    wall = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    meta = {"method": a.method, "task": a.task, "seed": a.seed, "epochs": train_epochs(a), "batch_size": a.batch_size,
            "lr": a.lr, "token_weight": a.token_weight, "threshold": a.threshold, "num_layers": a.num_layers}
    save_checkpoint({"args": meta, "state_dict": res.controller.state_dict()}, out / "controller.pt")
    with atomic_open(out / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(res.metrics[0]))
        w.writeheader()
        w.writerows(res.metrics)
    last = res.metrics[-16:]
    fig = {k: sum(m[k] for m in last) / len(last) for k in ("train/score", "train/cp_tokens", "latency/cp_seconds")}
    print(f"trained {args.method} on {args.task} (seed {args.seed}) in {wall:.1f} s; last 16 batches: "
          f"score {fig['train/score']:.3f}, CP {fig['train/cp_tokens']:.0f} tokens, {fig['latency/cp_seconds']:.1f} s")
    print(f"checkpoint: {out / 'controller.pt'}   metrics: {out / 'metrics.csv'}")
    if args.json:
        emit_json({"checkpoint": str(out / "controller.pt"), "metrics_csv": str(out / "metrics.csv"), "wall_s": wall,
                   "steps": len(res.metrics), **{k.replace("/", "_"): v for k, v in fig.items()}})
    return 0
