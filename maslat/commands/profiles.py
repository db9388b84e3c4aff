"""maslat profiles: list the embedded serving profiles (or show one)."""

from __future__ import annotations

from ._common import add_json_flag, emit_json, format_table

HELP = "list the embedded serving profiles, or print one as JSON"


def configure(p) -> None:
    p.add_argument("name", nargs="?", help="profile to print in full")
    add_json_flag(p)


def run(args) -> int:
    from sim import list_profiles, load_profile

    if args.name:
        prof = load_profile(args.name)
        print(prof.to_json(), end="")
        return 0
    rows = []
    for name in list_profiles():
        p = load_profile(name)
        rows.append([name, p.model.name if p.model else "(shape-free)", p.hardware.name if p.hardware else "-",
                     p.parallel.tensor_parallel_size, p.engine.num_gpu_blocks,
                     p.engine.max_num_seqs, p.engine.max_num_batched_tokens])
    print(format_table(rows, ["profile", "model", "hardware", "tp", "num_gpu_blocks", "max_num_seqs",
                              "max_num_batched_tokens"]))
    if args.json:
        emit_json({"profiles": [r[0] for r in rows]})
    return 0
