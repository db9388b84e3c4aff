"""maslat evaluate POLICY: one sub-command per policy of ``agents.registry``, plus policies from outside."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import add_json_flag, add_trust_flag, emit_json, format_table

HELP = "evaluate a policy: `maslat evaluate lamas runs/lamas-gsm8k-0/controller.pt`, `... ppo-lagrangian PATH`, `... sb3 M.zip`"
DESCRIPTION = """\
Evaluate one policy; `maslat evaluate POLICY --help` lists that policy's options.

LAMaS family (maas, lamas, ... with CHECKPOINT = controller.pt of `maslat train`; single-cot and all-parallel
need none): the test split --test-repeats times (avg@K, default 8, each run with fresh LLM outcomes, background
and sampling) at LAMaS's test concurrency with the method's execution mode and graph variant: the means of
score, CP tokens, cost, critical-path seconds and calls, and the score's spread over the runs.

MASLatency-CMDP-v0 (ppo-lagrangian and masrouter with CHECKPOINT = policy.pt; the fixed rules
always-large-deepthink, always-small-flash, greedy-fastest and the oracle need none), and policies from
outside: `sb3 MODEL.zip` (a Stable-Baselines3 model trained on MASLatency-CMDP-v0) and `policy --policy
module:attr` (any object with act(obs)): --num-queries test queries at every --slo-factor, each from a fresh
seeded world with background load (--load, default: the regime it was trained on), by the protocol of
`maslat experiment cmdp`: quality, SLO attainment, goodput, p50/p95 latency, $.

`maslat evaluate CHECKPOINT ...` (earlier releases) still works: the checkpoint's header names the method.

examples:
  maslat evaluate maas runs/maas-gsm8k-0/controller.pt --task gsm8k --json
  maslat evaluate ppo-lagrangian runs/ppo_lagrangian-gsm8k-busy-0/policy.pt --load shift --json
  maslat evaluate greedy-fastest --task gsm8k --load busy --num-queries 20
  maslat evaluate sb3 ppo_cmdp.zip --task gsm8k --load busy
  maslat evaluate policy --policy mypkg.policies:fast --task gsm8k
"""
EXTERNAL = {"sb3": "a Stable-Baselines3 model (.zip) trained on MASLatency-CMDP-v0",
            "policy": "any object with act(obs) -> (model, strategy) or an integer action, named module:attr"}


def normalize_argv(argv: list[str]) -> list[str]:
    """The earlier ``maslat evaluate CHECKPOINT|BASELINE ...`` and ``--policy M:A`` onto the sub-commands."""
    from agents.registry import METHODS

    if not argv or argv[0] in ("-h", "--help"):
        return argv
    if argv[0] == "--policy" or argv[0].startswith("--policy="):
        return ["policy", *argv]
    first = argv[0]
    if first.startswith("-") or first in METHODS or first in EXTERNAL or first.replace("_", "-") in METHODS:
        return argv
    if first.endswith(".zip"):
        return ["sb3", *argv]
    from agents.registry import get_method

    from ..checkpoints import UnsafeCheckpointError, read_checkpoint

    try:
        method = get_method(read_checkpoint(first, trust="--trust-checkpoint" in argv).header.method).name
    except UnsafeCheckpointError:
        method = "lamas"  # its loader reports the refusal, with what to pass
    return [method, *argv]


def configure(p) -> None:
    from agents.registry import get_method, method_names

    sub = p.add_subparsers(dest="policy_name", metavar="POLICY", required=True)
    for name in method_names():
        spec = get_method(name)
        if spec.family == "estimators":
            continue
        sp = sub.add_parser(name, aliases=[spec.legacy] if spec.legacy else [], help=spec.summary,
                            description=f"maslat evaluate {name}: {spec.summary}.",
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        learned = spec.load_policy is not None
        ckpt = ("checkpoint", f"{'controller' if spec.family == 'lamas' else 'policy'}.pt of `maslat train {name}`")
        if spec.family == "lamas":
            _configure_lamas(sp, spec, checkpoint=ckpt if learned else None)
        else:
            from ._cmdp import configure_evaluate

            configure_evaluate(sp, spec, positional=ckpt if learned else None)
        sp.set_defaults(_method=name)
    from ._cmdp import configure_evaluate

    sb3 = sub.add_parser("sb3", help=EXTERNAL["sb3"], description=f"maslat evaluate sb3: {EXTERNAL['sb3']}.")
    configure_evaluate(sb3, positional=("model", "the model's .zip (model.save(...) of stable-baselines3)"))
    sb3.add_argument("--algo", default=None, help="its SB3 algorithm (PPO, A2C, DQN, ...; default: tried in turn)")
    ext = sub.add_parser("policy", help=EXTERNAL["policy"], description=f"maslat evaluate policy: {EXTERNAL['policy']}.")
    ext.add_argument("--policy", required=True, metavar="MODULE:ATTR",
                     help="the policy object, or a class / zero-argument factory returning one (its module is "
                          "imported: only code you trust)")
    configure_evaluate(ext)
    for sp in (sb3, ext):
        sp.set_defaults(_method=None)


def _configure_lamas(p, spec, *, checkpoint: tuple[str, str] | None) -> None:
    from agents.lamas import Args

    from ._mas import add_cluster_args
    from ._options import add_dataclass_options

    if checkpoint is not None:
        p.add_argument(checkpoint[0], metavar="CHECKPOINT", help=checkpoint[1])
    p.add_argument("--task", default=None, choices=spec.choices["task"],
                   help="task (default: the checkpoint's; gsm8k for a static baseline)")
    p.add_argument("--split", default="test", choices=("train", "test"))
    p.add_argument("--seed", type=int, default=0, help="world and sampling seed of the test run")
    add_dataclass_options(p, Args, prefix="a_", exclude=[f for f in Args.__dataclass_fields__
                                                         if f not in ("test_concurrency", "test_repeats")],
                          aliases={"test_concurrency": ("--concurrency",)})
    add_trust_flag(p)
    add_cluster_args(p)
    add_json_flag(p)


def run(args) -> int:
    import torch

    from agents.registry import get_method

    torch.set_num_threads(1)
    spec = get_method(args._method) if args._method else None
    if spec is None or spec.family == "cmdp":
        from ._cmdp import evaluate_cmdp

        return evaluate_cmdp(args, spec)
    return _evaluate_lamas(args, spec)


def _evaluate_lamas(args, spec) -> int:
    from dataclasses import replace

    from agents.lamas import Args, evaluate_repeats, summarize_repeats

    from ._mas import cluster_from_args, load_checkpoint

    conc = getattr(args, "a_test_concurrency", Args.__dataclass_fields__["test_concurrency"].default)
    source = getattr(args, "checkpoint", None) or spec.name
    if getattr(args, "checkpoint", None) is not None and not Path(args.checkpoint).is_file():
        raise FileNotFoundError(f"{args.checkpoint}: no such checkpoint")
    a, ctrl = load_checkpoint(source, task=args.task, seed=args.seed, concurrency=conc,
                              cluster=cluster_from_args(args), trust=args.trust_checkpoint, method=spec.name)
    a = replace(a, test_repeats=getattr(args, "a_test_repeats", a.test_repeats))
    s, _ = summarize_repeats(evaluate_repeats(a, ctrl, split=args.split))
    print(format_table([[k, v] for k, v in s.items()], ["metric", a.method]))
    if args.json:
        emit_json({"method": a.method, "task": a.task, "split": args.split, **s})
    return 0
