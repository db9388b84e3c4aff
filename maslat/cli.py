"""The ``maslat`` command line. Each command lives in ``maslat/commands/<name>.py`` and exposes
``HELP``, ``configure(parser)`` and ``run(args) -> int`` (optionally ``normalize_argv(argv) -> argv``, which
maps an older spelling of its arguments onto the current one); add one by adding a line to ``COMMANDS``.

Only the command being run is configured (``train``, ``evaluate`` and ``experiment`` build one sub-command per
method from ``agents.registry``, which imports the trainers); ``maslat --help`` lists every command."""

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


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``only``, the other commands are listed but not configured (nothing imported)."""
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
        if only is None or name == only:
            mod.configure(p)
        p.set_defaults(_run=mod.run)
    return parser


def _command_of(argv: list[str]) -> int | None:
    """Index of the command name in ``argv`` (the first token that is one), or ``None``."""
    return next((i for i, tok in enumerate(argv) if tok in COMMANDS), None)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    i = _command_of(argv)
    if i is not None:
        mod = importlib.import_module(COMMANDS[argv[i]])
        if hasattr(mod, "normalize_argv"):
            try:
                argv = [*argv[:i + 1], *mod.normalize_argv(argv[i + 1:])]
            except (ValueError, FileNotFoundError) as e:
                print(f"maslat {argv[i]}: error: {e}", file=sys.stderr)
                return 2
    parser = build_parser(argv[i] if i is not None else None)
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
