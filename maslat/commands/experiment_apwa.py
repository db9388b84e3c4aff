"""maslat experiment apwa: APWA (arXiv 2605.15132) against a centralised agent, a chain and a width-4 map."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from traces.atomic import output_path, write_text

from ._common import emit_json, format_table, progress

DESCRIPTION = """\
maslat experiment apwa: decomposed, parallel workflows over N items on the simulated cluster (APWA, arXiv 2605.15132).

For every seed and N (--items), APWA (manager on metadata, contract expanded over the rows, concurrent
workers with retries, hierarchical merges), a centralised agent with one growing context, a sequential
chain and a fixed width-4 parallel map run on the same warmed-up world with the same rows. The table gives
per method and N: makespan (s), tokens, structural completeness, modelled semantic utility, failures;
then each method's log-log slope of makespan against N and where it stopped completing.
Plot (--plots DIR): makespan_vs_items.png (log-log), utility_vs_items.png.
"""


def add_apwa_args(p) -> None:
    g = p.add_argument_group("apwa")
    g.add_argument("--items", default="10,30,100,300", help="apwa: comma-separated table sizes N (default 10,30,100,300)")
    g.add_argument("--workload", default="summarise", help="apwa: summarise | extract | redact")
    g.add_argument("--apwa-load", default="idle", help="apwa: background regime idle | busy | bursty | shift")
    g.add_argument("--live-endpoint", action="append", default=None, metavar="[POOL=]URL",
                   help="apwa: run the plans live on this OpenAI-compatible server (repeat per model pool: "
                        "llama-3.1-8b, llama-3.1-70b); with --ray the workers are Ray actors (default method: apwa)")


def _items(text: str) -> list[int]:
    try:
        return [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--items must be comma-separated integers, e.g. 10,30,100,300, got {text!r}") from None


def plot_scaling(summary: dict, out_dir: Path) -> list[Path]:
    from maslat.plots import _plt, save_figure

    plt = _plt()
    paths = []
    for key, ylabel, fname, log in (("makespan_s", "makespan (s)", "makespan_vs_items.png", True),
                                    ("semantic_utility", "semantic utility", "utility_vs_items.png", False)):
        fig, ax = plt.subplots(figsize=(6, 4.2))
        for m, d in summary["methods"].items():
            ns = [int(n) for n in d["by_items"]]
            ys = [d["by_items"][str(n)][key] for n in ns]
            ok = [d["by_items"][str(n)]["complete_share"] == 1.0 for n in ns]
            line, = ax.plot(ns, ys, marker="o", label=f"{m} (slope {d['scaling_exponent']:.2f})"
                            if d["scaling_exponent"] is not None else m)
            bad = [(n, y) for n, y, o in zip(ns, ys, ok, strict=True) if not o]
            if bad:
                ax.scatter([b[0] for b in bad], [b[1] for b in bad], marker="x", s=90, color=line.get_color(), zorder=3)
        if log:
            n0 = min(summary["items"])
            ax.plot(summary["items"], [summary["methods"].get("apwa", next(iter(summary["methods"].values())))
                                       ["by_items"][str(n0)]["makespan_s"] * n / n0 for n in summary["items"]],
                    ls=":", color="grey", label="linear in N")
            ax.set_yscale("log")
        ax.set_xscale("log")
        ax.set_xlabel("items N")
        ax.set_ylabel(ylabel)
        ax.set_title(f"APWA vs baselines ({summary['workload']}); x = incomplete run")
        ax.legend(fontsize=7)
        paths.append(save_figure(fig, Path(out_dir) / fname))
    return paths


def experiment_apwa(args) -> int:
    from agents.apwa_experiment import run_apwa_experiment
    from envs.apwa import APWAConfig

    if args.out:
        output_path(args.out, (".json",), what="--out")
    items = _items(args.items)
    if args.live_endpoint:
        from .experiment_apwa_live import experiment_apwa_live

        return experiment_apwa_live(args, items)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    methods = args.methods
    t0 = time.perf_counter()
    total = len(seeds) * len(items) * (len(methods) if methods else 4)
    with progress(total, "apwa experiment", unit="run") as bar:
        s = run_apwa_experiment(items, seeds, methods=methods, workload=args.workload,
                                cfg=APWAConfig(load=args.apwa_load), progress=bar.update)
    s["wall_s"] = time.perf_counter() - t0
    rows = []
    for m, d in s["methods"].items():
        for n, r in d["by_items"].items():
            rows.append([m, int(n), r["makespan_s"], r["tokens"], r["structural_completeness"], r["semantic_utility"],
                         r["rejected_calls"] + r["malformed_calls"], r["lost_items"], r["peak_context_tokens"],
                         r["kv_peak"], r["preemptions"], ",".join(r["failure_reasons"]) or "-"])
    print(format_table(rows, ["method", "N", "makespan_s", "tokens", "complete", "utility", "failed_calls",
                              "lost_items", "peak_ctx", "kv_peak", "preempt", "failure"]))
    for m, d in s["methods"].items():
        e = d["scaling_exponent"]
        print(f"{m}: makespan ~ N^{e:.2f}" if e is not None else f"{m}: too few complete sizes for a slope",
              f"(complete at N = {d['complete_items']}; breaks at N = {d['breaks_at_items']})")
    print(f"wall time {s['wall_s']:.1f} s", file=sys.stderr)
    if args.plots:
        print("plots: " + ", ".join(str(p) for p in plot_scaling(s, args.plots)))
    if args.out:
        write_text(args.out, json.dumps(s, indent=1))
    if args.json:
        emit_json(s)
    return 0
