"""maslat evaluate: test a trained controller (or a static baseline), or a CMDP policy, on a test split."""

from __future__ import annotations

from ._cmdp import add_cmdp_args, evaluate_cmdp, is_cmdp_checkpoint
from ._common import add_json_flag, add_trust_flag, emit_json, format_table
from ._mas import add_cluster_args, cluster_from_args, load_checkpoint

HELP = "evaluate a checkpoint: `maslat evaluate runs/lamas-gsm8k-0/controller.pt --task gsm8k`"
DESCRIPTION = """\
Run the test split once at concurrency 30 (LAMaS's test protocol) with the checkpoint's method (its
execution mode and graph variant) and print score, CP tokens, cost, critical-path seconds and calls.
CHECKPOINT may also name a static baseline: single_cot or all_parallel.

A MASLatency-CMDP-v0 checkpoint (policy.pt of `maslat train ppo_lagrangian|masrouter`) is evaluated on
--num-queries test queries at every --slo-factor, each from a fresh seeded world with 20 s of background
(--load, default: the regime it was trained on): quality, SLO attainment, goodput, p50/p95 latency, $.

examples:
  maslat evaluate runs/lamas-gsm8k-0/controller.pt --task gsm8k --json
  maslat evaluate runs/ppo_lagrangian-gsm8k-busy-0/policy.pt --load shift --json
"""


def configure(p) -> None:
    p.add_argument("checkpoint", help="controller.pt from `maslat train`, or single_cot | all_parallel")
    p.add_argument("--task", default=None, help="task (default: the checkpoint's)")
    p.add_argument("--split", default="test", choices=("train", "test"))
    p.add_argument("--seed", type=int, default=0, help="world and sampling seed of the test run")
    p.add_argument("--concurrency", type=int, default=30)
    p.add_argument("--num-queries", type=int, default=60, help="CMDP: test queries evaluated (default 60)")
    add_trust_flag(p)
    add_cluster_args(p)
    add_cmdp_args(p, load_default=None)
    add_json_flag(p)


def run(args) -> int:
    import torch

    from agents.lamas import evaluate, summarize

    torch.set_num_threads(1)
    if is_cmdp_checkpoint(args.checkpoint, trust=args.trust_checkpoint):
        return evaluate_cmdp(args)
    a, ctrl = load_checkpoint(args.checkpoint, task=args.task, seed=args.seed, concurrency=args.concurrency,
                              cluster=cluster_from_args(args), trust=args.trust_checkpoint)
    s = summarize(evaluate(a, ctrl, split=args.split))
    print(format_table([[k, v] for k, v in s.items()], ["metric", a.method]))
    if args.json:
        emit_json({"method": a.method, "task": a.task, "split": args.split, **s})
    return 0
