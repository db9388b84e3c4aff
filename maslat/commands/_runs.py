"""Options and reading shared by the commands that take measured run directories (calibrate, replay)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["add_skip_flag", "fraction", "read_runs", "skipped_lines"]


def fraction(text: str) -> float:
    v = float(text)
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return v


def add_skip_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip malformed or implausible lines of requests.jsonl / timeseries.csv and count them "
                        "(skipped_lines in the report) instead of refusing the run")


def read_runs(paths: list[Path], skip_bad: bool) -> list:
    """Read every run first (a bad line is refused before any work, or skipped and said on stderr)."""
    from traces.runs import read_run

    runs = [read_run(p, skip_bad=skip_bad) for p in paths]
    for run in runs:
        for name, n in run.skipped.items():
            if n:
                print(f"{run.path}: skipped {n} bad line(s) of {name} (--skip-bad-lines), e.g.", file=sys.stderr)
                for msg in run.skipped_detail.get(name, [])[:3]:
                    print(f"  {msg}", file=sys.stderr)
    return runs


def skipped_lines(runs: list, detail: bool = False) -> dict:
    """Skipped lines per file (``detail``: their messages), per run when there are several."""
    of = (lambda r: dict(r.skipped_detail)) if detail else (lambda r: dict(r.skipped))
    return {run.name: of(run) for run in runs} if len(runs) > 1 else of(runs[0])
