"""The ``maslat`` command line. Each command lives in ``maslat/commands/<name>.py`` and exposes
``HELP``, ``configure(parser)`` and ``run(args) -> int``; add one by adding a line to ``COMMANDS``."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, str] = {
    "simulate": "maslat.commands.simulate",
    "profiles": "maslat.commands.profiles",
    "bench": "maslat.commands.bench",
    "demo": "maslat.commands.demo",
    "calibrate": "maslat.commands.calibrate",
    "replay": "maslat.commands.replay",
    "serve": "maslat.commands.serve",
    "collect": "maslat.commands.collect",
    "train": "maslat.commands.train",
    "evaluate": "maslat.commands.evaluate",
    "experiment": "maslat.commands.experiment",
    "validate-policy": "maslat.commands.validate_policy",
    "sweep": "maslat.commands.sweep",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maslat",
        description="maslatency: a calibrated vLLM-v1 replica simulator and latency-aware multi-agent trainers.",
    )
    parser.add_argument("--version", action="version", version="maslatency 0.1.0")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS.items():
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=mod.HELP, description=getattr(mod, "DESCRIPTION", mod.HELP),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.configure(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as e:
        print(f"maslat {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a folder where a file goes...: a message, not a traceback
        name = f" {e.filename}" if getattr(e, "filename", None) else ""
        print(f"maslat {args.command}: error:{name} {e.strerror or e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
