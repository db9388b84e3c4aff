"""maslat bench: speed benchmarks that print figures (never timed unit tests)."""

from __future__ import annotations

import importlib

from ._common import add_json_flag

HELP = "speed benchmarks: `maslat bench sim` (simulator), more with `maslat bench -h`"

#: benchmark name -> module exposing configure(parser) and run(args)
BENCHES: dict[str, str] = {
    "sim": "maslat.commands.bench_sim",
    "serve": "maslat.commands.bench_serve",
    "env": "maslat.commands.bench_env",
    "conformance": "maslat.commands.bench_conformance",
}


def configure(p) -> None:
    sub = p.add_subparsers(dest="bench", metavar="BENCH")
    for name, module in BENCHES.items():
        mod = importlib.import_module(module)
        sp = sub.add_parser(name, help=mod.HELP, description=getattr(mod, "DESCRIPTION", mod.HELP))
        mod.configure(sp)
        if not any(a.dest == "json" for a in sp._actions):
            add_json_flag(sp)
        sp.set_defaults(_bench=mod.run)


def run(args) -> int:
    if not getattr(args, "_bench", None):
        raise ValueError(f"name a benchmark: one of {sorted(BENCHES)}")
    return args._bench(args)
