"""maslat train METHOD: one sub-command per trainer of ``agents.registry``, with that trainer's options only."""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

from traces.atomic import atomic_open

from ..checkpoints import save_checkpoint
from ._common import add_json_flag, emit_json, progress
from ._options import add_dataclass_options, dataclass_kwargs

HELP = "train a method: `maslat train lamas|maas|...|ppo-lagrangian|masrouter|estimators [options]`"
DESCRIPTION = """\
Train one method; `maslat train METHOD --help` lists that method's options, generated from its Args
dataclass (name, type, default, docstring), so a default lives once, next to the algorithm.

LAMaS family (MASLatency-v0, LAMaS's protocol: train split in file order, 4 epochs, batches of 4 queries run
concurrently on the simulated cluster, one Adam step per batch):
  OUT/controller.pt   the checkpoint (versioned header + state dict + the run's arguments)
  OUT/metrics.csv     one row per batch: losses/loss, train/score, train/cp_tokens, latency/cp_seconds, ...

MASLatency-CMDP-v0 (system-aware routing under a latency SLO): ppo-lagrangian (one load regime: OUT/policy.pt and
OUT/metrics.csv with lambda, cost, SLO attainment per epoch), masrouter (load-blind), estimators (the two-phase
dataset in simulation, F_lat and F_len, their held-out MAPE; OUT/estimators.npz for --estimator).

The underscored names of earlier releases (ppo_lagrangian, lamas_no_cp, ...) and `--method NAME` still work.

examples:
  maslat train lamas --task gsm8k --seed 0 --out runs/lamas-gsm8k-0
  maslat train estimators --json
  maslat train ppo-lagrangian --task gsm8k --load busy --seed 0
  maslat train masrouter --task humaneval
"""
ARGS = "a_"


def normalize_argv(argv: list[str]) -> list[str]:
    """``--method NAME`` (deprecated) becomes the sub-command ``NAME``."""
    return _method_option_to_subcommand(argv)


def _method_option_to_subcommand(argv: list[str]) -> list[str]:
    for i, tok in enumerate(argv):
        if tok == "--method" and i + 1 < len(argv):
            return [argv[i + 1], *argv[:i], *argv[i + 2:]]
        if tok.startswith("--method="):
            return [tok.split("=", 1)[1], *argv[:i], *argv[i + 1:]]
    return argv


def configure(p) -> None:
    from agents.registry import get_method, method_names

    sub = p.add_subparsers(dest="method", metavar="METHOD", required=True)
    for name in method_names(trainable=True):
        spec = get_method(name)
        sp = sub.add_parser(name, aliases=[spec.legacy] if spec.legacy else [], help=spec.summary,
                            description=f"maslat train {name}: {spec.summary}.",
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        _CONFIGURE[spec.family](sp, spec)
        sp.set_defaults(_method=name)


def run(args) -> int:
    import torch

    from agents.registry import get_method

    torch.set_num_threads(1)
    spec = get_method(args._method)
    return _RUN[spec.family](args, spec)


# ------------------------------------------------------------------------------------------ LAMaS family
def _configure_lamas(p, spec) -> None:
    from ._mas import add_cluster_args

    add_dataclass_options(p.add_argument_group(f"{spec.name} (agents.lamas.Args)"), spec.args_type, prefix=ARGS,
                          exclude=spec.hidden | {"test_concurrency", "test_repeats"}, choices=spec.choices, aliases=spec.aliases)
    p.add_argument("--out", type=Path, default=None,
                   help=f"output directory (default runs/{spec.legacy or spec.name}-<task>-<seed>)")
    add_cluster_args(p)
    add_json_flag(p)


def _train_lamas(args, spec) -> int:
    from agents.lamas import train_epochs
    from envs import make_task

    from ._mas import cluster_from_args

    a = spec.make_args(**dataclass_kwargs(args, spec.args_type, prefix=ARGS), cluster=cluster_from_args(args))
    out = args.out or Path("runs") / f"{a.method}-{a.task}-{a.seed}"
    total = make_task(a.task).num_train * train_epochs(a)
    t0 = time.perf_counter()
    with progress(total, f"train {spec.name} on {a.task}", unit="episode") as bar:
        res = spec.train(a, progress=bar.update)
    wall = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    meta = {"method": a.method, "task": a.task, "seed": a.seed, "epochs": train_epochs(a), "batch_size": a.batch_size,
            "lr": a.lr, "token_weight": a.token_weight, "threshold": a.threshold, "num_layers": a.num_layers}
    header_args = {**{k: getattr(a, k) for k in spec.args_type.__dataclass_fields__ if k != "cluster"}, **meta}
    save_checkpoint({"args": meta, "state_dict": res.controller.state_dict()}, out / "controller.pt",
                    method=spec.name, args=header_args)
    with atomic_open(out / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(res.metrics[0]))
        w.writeheader()
        w.writerows(res.metrics)
    last = res.metrics[-16:]
    fig = {k: sum(m[k] for m in last) / len(last) for k in ("train/score", "train/cp_tokens", "latency/cp_seconds")}
    print(f"trained {spec.name} on {a.task} (seed {a.seed}) in {wall:.1f} s; last 16 batches: "
          f"score {fig['train/score']:.3f}, CP {fig['train/cp_tokens']:.0f} tokens, {fig['latency/cp_seconds']:.1f} s")
    print(f"checkpoint: {out / 'controller.pt'}   metrics: {out / 'metrics.csv'}")
    if args.json:
        emit_json({"checkpoint": str(out / "controller.pt"), "metrics_csv": str(out / "metrics.csv"), "wall_s": wall,
                   "steps": len(res.metrics), **{k.replace("/", "_"): v for k, v in fig.items()}})
    return 0


def _configure_estimators(p, spec) -> None:
    from ._estimators import configure_estimators

    configure_estimators(p, spec)


def _configure_cmdp(p, spec) -> None:
    from ._cmdp import configure_train

    configure_train(p, spec)


def _train_cmdp(args, spec) -> int:
    from ._cmdp import train_cmdp

    return train_cmdp(args, spec)


def _train_estimators(args, spec) -> int:
    from ._estimators import train_estimators_command

    return train_estimators_command(args, spec)


_CONFIGURE = {"lamas": _configure_lamas, "cmdp": _configure_cmdp, "estimators": _configure_estimators}
_RUN = {"lamas": _train_lamas, "cmdp": _train_cmdp, "estimators": _train_estimators}
