"""maslat demo: the main job on embedded defaults."""

from __future__ import annotations

from pathlib import Path

from ._common import add_json_flag

HELP = "run the main job on embedded defaults (a two-replica H100 pool under Azure-conv load)"


def configure(p) -> None:
    p.add_argument("--out", type=Path, default=Path("out/demo"), help="where plots and records go")
    add_json_flag(p)


def run(args) -> int:
    import argparse

    from . import simulate

    args.out.mkdir(parents=True, exist_ok=True)
    ns = argparse.Namespace(profile="h100-llama-3.1-8b", replicas=2, router="least_outstanding", rate=24.0,
                            burst_cv=None, duration=120.0, seed=0, trace=None, time_scale=1.0, prompt_tokens=None,
                            output_tokens=None, no_prefix_caching=False, records=args.out / "records.csv",
                            timeseries=args.out / "timeseries.csv", plots=args.out, json=args.json)
    return simulate.run(ns)
