"""Helpers shared by the MASLatency commands: cluster options, checkpoints, the results table (plots:
``maslat.plots``)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["add_cluster_args", "cluster_from_args", "load_checkpoint", "results_table"]


CLUSTER = "cluster_"


def add_cluster_args(p) -> None:
    """The simulated pool's options, from ``envs.ClusterConfig`` (its defaults), and the background load."""
    import sim
    from envs import ClusterConfig

    from ._options import add_dataclass_options

    g = p.add_argument_group("simulated serving cluster (envs.ClusterConfig)")
    add_dataclass_options(g, ClusterConfig, prefix=CLUSTER, exclude=("background_rate_per_s", "background_trace"),
                          choices={"router": tuple(sim.ROUTERS)})
    g.add_argument("--background", choices=("poisson", "azure-trace", "none"), default="poisson",
                   help="background load: Poisson arrivals with Azure-conv-like lengths (default), a replay of "
                        "the Azure 2023 conversation trace ($MASLAT_TRACES_DIR), or none")
    g.add_argument("--background-rate", type=float, default=None,
                   help="background requests/s (default: the Azure conversation trace's native rate, "
                        "ClusterConfig.background_rate_per_s)")


def cluster_from_args(args):
    from envs import BackgroundTrace, ClusterConfig

    from ._options import dataclass_kwargs

    kw = dataclass_kwargs(args, ClusterConfig, prefix=CLUSTER)
    if args.background_rate is not None:
        kw["background_rate_per_s"] = args.background_rate
    if args.background == "none":
        kw["background_rate_per_s"] = 0.0
    elif args.background == "azure-trace":
        from traces.azure import azure_trace

        tr = azure_trace("conv")
        kw["background_trace"] = BackgroundTrace(tr.offsets_s, tr.prompt_tokens, tr.output_tokens)
    return ClusterConfig(**kw)


def load_checkpoint(checkpoint: str, *, task: str | None, seed: int, concurrency: int, cluster,
                    trust: bool = False, method: str | None = None):
    """``(agents.lamas.Args, controller)`` of a ``maslat train`` checkpoint, or of a static baseline name
    (``single_cot``, ``all_parallel``; controller ``None``), set up for a test run. The file is read once, by
    ``maslat.checkpoints.read_checkpoint`` (``weights_only=True`` unless ``trust``); with ``method`` it must
    hold that method."""
    from agents.lamas import METHODS, Args
    from agents.registry import get_method

    from ..checkpoints import read_checkpoint

    key = checkpoint.replace("-", "_")
    if key in METHODS and not METHODS[key].learned:
        return Args(method=key, task=task or "gsm8k", seed=seed, test_concurrency=concurrency,
                    cluster=cluster), None
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint (and not a static baseline name)")
    ck = read_checkpoint(path, trust=trust)
    spec = get_method(ck.header.method)
    if spec.family != "lamas" or "state_dict" not in ck.payload or not isinstance(ck.payload.get("args"), dict):
        raise ValueError(f"{path}: holds a {spec.name} checkpoint, not a `maslat train` controller "
                         f"(evaluate it with `maslat evaluate {spec.name} {path}`)")
    if method is not None and get_method(method).name != spec.name:
        raise ValueError(f"{path}: holds a {spec.name} controller, not {get_method(method).name}: run "
                         f"`maslat evaluate {spec.name} {path}`")
    meta = ck.payload["args"]
    task = task or meta["task"]
    a = Args(method=meta["method"], task=task, seed=seed, threshold=meta["threshold"], num_layers=meta["num_layers"],
             test_concurrency=concurrency, cluster=cluster)
    try:
        ctrl = spec.load_policy(ck.payload, a)
    except RuntimeError as e:
        raise ValueError(f"{path}: checkpoint does not fit a {task} controller ({e})") from None
    return a, ctrl


def results_table(methods: dict[str, dict]) -> str:
    from ._common import format_table

    def pm(d, k, fmt):
        return f"{fmt.format(d[k])} ± {fmt.format(d[k + '_std'])}"

    rows = []
    for name, d in methods.items():
        rows.append([name, pm(d, "score_pct", "{:.2f}"), pm(d, "cp_tokens_mean", "{:.0f}"), pm(d, "cp_tokens_p90", "{:.0f}"),
                     pm(d, "cost_usd_per_query", "{:.2e}"), pm(d, "cp_seconds_mean", "{:.1f}"),
                     pm(d, "cp_seconds_p90", "{:.1f}"), pm(d, "calls_per_query", "{:.2f}")])
    return format_table(rows, ["method", "score %", "CP tok mean", "CP tok p90", "$/query", "CP s mean", "CP s p90",
                               "calls/query"])
