"""maslat evaluate: test a trained controller (or a static baseline) on a task's test split."""

from __future__ import annotations

from pathlib import Path

from ._common import add_json_flag, emit_json, format_table
from ._mas import add_cluster_args, cluster_from_args

HELP = "evaluate a checkpoint: `maslat evaluate runs/lamas-gsm8k-0/controller.pt --task gsm8k`"
DESCRIPTION = """\
Run the test split once at concurrency 30 (LAMaS's test protocol) with the checkpoint's method (its
execution mode and graph variant) and print score, CP tokens, cost, critical-path seconds and calls.
CHECKPOINT may also name a static baseline: single_cot or all_parallel.

example:
  maslat evaluate runs/lamas-gsm8k-0/controller.pt --task gsm8k --json
"""


def configure(p) -> None:
    p.add_argument("checkpoint", help="controller.pt from `maslat train`, or single_cot | all_parallel")
    p.add_argument("--task", default=None, help="task (default: the checkpoint's)")
    p.add_argument("--split", default="test", choices=("train", "test"))
    p.add_argument("--seed", type=int, default=0, help="world and sampling seed of the test run")
    p.add_argument("--concurrency", type=int, default=30)
    add_cluster_args(p)
    add_json_flag(p)


def run(args) -> int:
    import torch

    from agents.lamas import METHODS, Args, evaluate, new_controller, summarize

    torch.set_num_threads(1)
    if args.checkpoint in METHODS and not METHODS[args.checkpoint].learned:
        method, task, ctrl = args.checkpoint, args.task or "gsm8k", None
        a = Args(method=method, task=task, seed=args.seed, test_concurrency=args.concurrency,
                 cluster=cluster_from_args(args))
    else:
        path = Path(args.checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such checkpoint (and not a static baseline name)")
        ck = torch.load(path, weights_only=False)
        meta = ck["args"]
        task = args.task or meta["task"]
        a = Args(method=meta["method"], task=task, seed=args.seed, threshold=meta["threshold"],
                 num_layers=meta["num_layers"], test_concurrency=args.concurrency, cluster=cluster_from_args(args))
        ctrl = new_controller(a)
        try:
            ctrl.load_state_dict(ck["state_dict"])
        except RuntimeError as e:
            raise ValueError(f"{path}: checkpoint does not fit a {task} controller ({e})") from None
        ctrl.refresh()
    s = summarize(evaluate(a, ctrl, split=args.split))
    print(format_table([[k, v] for k, v in s.items()], ["metric", a.method]))
    if args.json:
        emit_json({"method": a.method, "task": a.task, "split": args.split, **s})
    return 0
