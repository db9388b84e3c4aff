"""maslat demo: the main job on embedded defaults, the LAMaS experiment on GSM8K (one seed)."""

from __future__ import annotations

from pathlib import Path

from ._common import add_json_flag

HELP = "run the main job: LAMaS vs MaAS (+ ablations, baselines) on GSM8K in simulation, one seed"
DESCRIPTION = """\
The GSM8K experiment of LAMaS (arXiv 2601.10560) in simulation, one seed: every method trained on the
264 training queries (4 epochs, batches of 4) and tested on the 1,055 test queries at concurrency 30 on two
simulated H100 replicas with Azure-conversation-like background load. Prints the table and writes the
Pareto plot (score vs CP tokens and vs CP seconds) and the learning curves to --out.
Same as: maslat experiment lamas --task gsm8k --seeds 1 --plots out/demo
"""


def configure(p) -> None:
    p.add_argument("--out", type=Path, default=Path("out/demo"), help="where the plots and summary.json go")
    p.add_argument("--task", default="gsm8k")
    add_json_flag(p)


def run(args) -> int:
    from maslat.cli import build_parser

    argv = ["experiment", "lamas", "--task", args.task, "--seeds", "1", "--plots", str(args.out),
            "--out", str(args.out / "summary.json")] + (["--json"] if args.json else [])
    ns = build_parser().parse_args(argv)
    return ns._run(ns)
