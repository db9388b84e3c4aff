"""maslat validate-policy: run a trained policy against live vLLM servers, next to the simulator's prediction."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from traces.atomic import output_path, write_text

from ._common import _clean, add_json_flag, add_trust_flag, emit_json, format_table, progress

HELP = "run a trained policy's queries against live vLLM servers and compare with the simulator (needs aiohttp)"
DESCRIPTION = """\
Run a policy trained in simulation (a `maslat train` checkpoint, or single_cot | all_parallel) on the first
--num-queries queries of a task split against live OpenAI-compatible vLLM servers (one URL per model pool;
MASLatency-v0 sends every call to pool "llm"), --concurrency queries at a time, every LLM call a streamed
request. Then run the same queries with the same actions in the simulator (--profile, --replicas: default
as many replicas as the endpoint's /metrics shows engines; no background load unless --background-rate)
and print the evaluation table side by side: live, simulated, and the prediction's error in %.

Score, CP tokens, calls, tokens and cost are identical by construction (same seed, queries and actions;
checked query by query); the simulator predicts the seconds: the bar is |error| <= 5 % on the mean and
p90 of the critical-path seconds, with no failed live call. Against `maslat serve --time-scale X` all
times are the server's simulated seconds. Below the table, the calls' clock (`call_clock` in the JSON): the
calls' client seconds and the engine's queue, prefill and decode sums (live: the server's own latency
histograms over the run), simulated against live, and the serving path per call, so a miss reads as the
engine's speed or as the path around it.

MASLatency-CMDP-v0 policies (a PPO-Lagrangian or MasRouter policy.pt from `maslat train`, or a baseline:
always_large_deepthink | always_small_flash | greedy_fastest) need one endpoint per model pool, named after
the models (llama-3.1-8b=URL llama-3.1-70b=URL): the Planner and the Executor run live, the system
observations come from each pool's /metrics, and the bar is on the mean and p90 of the end-to-end seconds
of the queries (every query's SLO is --slo-factor reference latencies).

A live call that fails (HTTP error, cut stream, no answer within --request-timeout) fails its query: score 0
in the live column, counted in the table, and the exit status is 1. --out writes the result as JSON; when the
run is interrupted (Ctrl-C) or fails, the live queries finished so far are written there (partial: true).

examples:
  maslat validate-policy runs/lamas-gsm8k-0/controller.pt --endpoints http://127.0.0.1:8000 --num-queries 50
  maslat validate-policy single_cot --task math --endpoints llm=http://gpu-box:8000/v1 \\
      --profile my-calibrated.json --concurrency 30 --json
  maslat validate-policy runs/ppo_lagrangian-mbpp-busy-0/policy.pt \\
      --endpoints llama-3.1-8b=http://a:8000 llama-3.1-70b=http://b:8000 --num-queries 20 --concurrency 4
"""


def configure(p) -> None:
    p.add_argument("checkpoint", help="controller.pt (LAMaS) or policy.pt (CMDP) from `maslat train`, or a "
                                      "baseline: single_cot | all_parallel | always_large_deepthink | "
                                      "always_small_flash | greedy_fastest")
    p.add_argument("--endpoints", nargs="+", required=True, metavar="[POOL=]URL",
                   help="live server per model pool (http://host:port or .../v1; the pool defaults to llm)")
    p.add_argument("--metrics-url", action="append", default=[], metavar="[POOL=]URL",
                   help="a pool's Prometheus page when not at <endpoint>/metrics (repeatable)")
    p.add_argument("--task", default=None, help="task (default: the checkpoint's)")
    p.add_argument("--split", default="test", choices=("train", "test"))
    p.add_argument("--num-queries", type=int, default=50, help="the first N queries of the split (default 50)")
    p.add_argument("--concurrency", type=int, default=10, help="queries in flight at once (default 10)")
    p.add_argument("--seed", type=int, default=0, help="environment and sampling seed")
    p.add_argument("--request-timeout", type=float, default=120.0,
                   help="seconds (server time) before a live call without its answer fails (default 120)")
    p.add_argument("--out", type=Path, default=None,
                   help="write the result as JSON here (the finished live queries when interrupted or failing)")
    p.add_argument("--api-key", help="key for servers started with --api-key (default: $OPENAI_API_KEY, else "
                                     "$VLLM_API_KEY)")
    add_trust_flag(p)
    p.add_argument("--slo-factor", type=float, default=1.5,
                   help="CMDP: every query's SLO in reference latencies (default 1.5)")
    g = p.add_argument_group("the simulator's prediction")
    g.add_argument("--profile", default="h100-llama-3.1-8b", help="profile of the live servers (name or .json)")
    g.add_argument("--replicas", type=int, default=None, help="replicas (default: the endpoint's engines)")
    g.add_argument("--router", default="least_outstanding")
    g.add_argument("--background-rate", type=float, default=0.0, help="simulated background requests/s (default 0)")
    add_json_flag(p)


def _endpoints(args) -> dict:
    from dataclasses import replace

    from envs.backend import BACKEND_POOL
    from maslat.livebackend import parse_endpoints
    from traces.client import resolve_api_key

    eps = parse_endpoints(args.endpoints, BACKEND_POOL)
    for pool, ep in parse_endpoints(args.metrics_url, BACKEND_POOL).items() if args.metrics_url else ():
        if pool not in eps:
            raise ValueError(f"--metrics-url for pool {pool!r}, which has no endpoint")
        eps[pool] = replace(eps[pool], metrics_url=ep.url)
    key = resolve_api_key(args.api_key)
    return {pool: replace(ep, api_key=key) for pool, ep in eps.items()}


def _table(out: dict) -> str:
    rows = [[k, v["live"], v["simulated"], "" if v["error_pct"] is None else f"{v['error_pct']:+.2f}",
             "predicted" if v["predicted"] else "identical"] for k, v in out["table"].items()]
    return format_table(rows, ["metric", "live", "simulated", "error %", ""])


def run(args) -> int:
    import torch

    from envs import ClusterConfig
    from maslat.validation import validate_policy

    from ._mas import load_checkpoint

    try:
        import aiohttp  # noqa: F401
    except ImportError:
        raise ValueError("maslat validate-policy needs aiohttp: pip install 'maslatency[server]'") from None
    if args.num_queries < 1 or args.concurrency < 1:
        raise ValueError("--num-queries and --concurrency must be >= 1")
    if not args.request_timeout > 0:
        raise ValueError(f"--request-timeout must be positive seconds, got {args.request_timeout}")
    if args.out is not None:
        output_path(args.out, (".json",), what="--out")
    torch.set_num_threads(1)
    if _is_cmdp(args):
        return _run_cmdp(args)
    a, ctrl = load_checkpoint(args.checkpoint, task=args.task, seed=args.seed, concurrency=args.concurrency,
                              cluster=ClusterConfig(), trust=args.trust_checkpoint)
    partial: list[dict] = []
    try:
        with progress(args.num_queries, "live queries", unit="query") as bar:
            out = validate_policy(a, ctrl, _endpoints(args), split=args.split, num_queries=args.num_queries,
                                  concurrency=args.concurrency, profile=args.profile, replicas=args.replicas,
                                  router=args.router, background_rate_per_s=args.background_rate,
                                  on_done=lambda _i: bar.update(1), request_timeout_s=args.request_timeout,
                                  partial=partial)
    except (KeyboardInterrupt, Exception) as e:
        _save_partial(args, partial, e)
        raise
    header = (f"{out['method']} on {out['task']} {out['split']}: {out['queries']} queries at concurrency "
              f"{out['concurrency']}; live {', '.join(e['url'] for e in out['live']['endpoints'].values())} "
              f"(time scale {out['live']['time_scale']:g}) vs simulated {out['simulated']['profile']} x "
              f"{out['simulated']['replicas']}")
    return _report(args, out, header, "per_query_cp_seconds_error_pct", "CP seconds")


def _is_cmdp(args) -> bool:
    from agents.cmdp_policies import BASELINES

    from ._cmdp import is_cmdp_checkpoint

    return args.checkpoint in BASELINES or is_cmdp_checkpoint(args.checkpoint, trust=args.trust_checkpoint)


def _run_cmdp(args) -> int:
    """A ``MASLatency-CMDP-v0`` policy: ``maslat.validation.validate_cmdp_policy``, printed as for LAMaS."""
    from agents.cmdp_policies import BASELINES, make_baseline
    from envs.cmdp import MASLatencyCMDPEnv
    from maslat.validation import validate_cmdp_policy

    from ._cmdp import load_policy

    if args.checkpoint in BASELINES:
        task, estimator = args.task or "mbpp", "default"
        pol, name = make_baseline(args.checkpoint, MASLatencyCMDPEnv(task, args.split, estimator="none")), args.checkpoint
    else:
        pol, ck = load_policy(args.checkpoint, trust=args.trust_checkpoint)
        task, estimator, name = args.task or ck["task"], ck.get("estimator", "default"), ck["kind"]
    if args.replicas is not None:
        raise ValueError("--replicas is for MASLatency-v0; a CMDP policy's simulated pools take each endpoint's engines")
    partial: list[dict] = []
    try:
        with progress(args.num_queries, "live queries", unit="query") as bar:
            out = validate_cmdp_policy(pol, _endpoints(args), task=task, name=name, split=args.split,
                                       num_queries=args.num_queries, concurrency=args.concurrency, seed=args.seed,
                                       slo_factor=args.slo_factor, estimator=estimator,
                                       request_timeout_s=args.request_timeout, on_done=lambda _i: bar.update(1),
                                       partial=partial)
    except (KeyboardInterrupt, Exception) as e:
        _save_partial(args, [{"query": x["query"], "score": x["quality"], "cp_seconds": x["latency_s"],
                              "llm_calls": x["num_calls"], "rejected_calls": x["rejected_calls"]} for x in partial], e)
        raise
    urls = ", ".join(f"{k}={e['url']}" for k, e in out["live"]["endpoints"].items())
    header = (f"{out['method']} on {out['task']} {out['split']} (MASLatency-CMDP-v0): {out['queries']} queries at "
              f"concurrency {out['concurrency']}; live {urls} "
              f"(time scale {out['live']['time_scale']:g}) vs simulated {out['simulated']['replicas']}")
    return _report(args, out, header, "per_query_latency_error_pct", "end-to-end seconds")


def _report(args, out: dict, header: str, error_key: str, label: str) -> int:
    """Save ``--out``, print the header, the table, the per-query error and the bar verdict; exit 1 on failed calls."""
    if args.out is not None:
        write_text(args.out, json.dumps(_clean(out), indent=1) + "\n")
    print(header)
    print(_table(out))
    pq, b = out[error_key], out["bar"]
    print(f"per query, {label} error: median |e| {_pct(pq['median_abs'])}, p90 {_pct(pq['p90_abs'])}; "
          f"mismatched queries {sum(out['mismatched_queries'].values())}; failed live calls {out['failed_live_calls']}")
    if "call_clock" in out:
        print(_call_clock_line(out["call_clock"]))
    print(f"bar |error| <= {b['threshold_pct']:g} % on {'/'.join(b['on'])}: {'PASS' if b['passed'] else 'FAIL'} "
          f"(worst {b['worst']} {_pct(b['worst_error_pct'])})")
    if out["failed_live_calls"]:
        print(f"maslat validate-policy: {out['failed_live_calls']} live call(s) failed in "
              f"{out['queries_with_failed_calls']} of {out['queries']} queries (scored as failures): "
              f"{out['live']['endpoints']}", file=sys.stderr)
    if args.json:
        emit_json(out)
    return 1 if out["failed_live_calls"] else 0


def _call_clock_line(c: dict) -> str:
    """The calls' seconds, simulated against live: client, and the engine core's phases (``maslat.callclock``)."""
    e = c["error_pct"]
    parts = [f"client {c['live']['client_s']:.4g} s {_signed(e['client_s'])}"]
    if c["engine"] == "measured":
        parts += [f"{k} {c['live'][k]:.4g} s {_signed(e[k])}" for k in ("queue_s", "prefill_s", "decode_s")]
        parts.append(f"serving path per call {c['live']['serving_s_per_call']:.3g} s (simulated "
                     f"{c['simulated']['serving_s_per_call']:.3g} s)")
    else:
        parts.append(f"engine phases: {c['engine']}")
    return f"calls ({c['live']['calls']} live), live seconds and simulated error: " + ", ".join(parts)


def _signed(x: float | None) -> str:
    return "(n/a)" if x is None else f"({x:+.2f} %)"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f} %"


def _save_partial(args, partial: list[dict], error: BaseException) -> None:
    """Write the live queries that finished before an interruption or failure to --out (said on stderr)."""
    if args.out is None or not partial:
        return
    from maslat.validation import failed_as_failures

    keep = ("query", "score", "cp_tokens", "cp_seconds", "llm_calls", "rejected_calls", "failed")
    rows = [{k: x.get(k) for k in keep} for x in failed_as_failures(partial)]
    write_text(args.out, json.dumps(_clean({"partial": True, "error": f"{type(error).__name__}: {error}",
                                            "method": args.checkpoint, "live_queries": rows}), indent=1) + "\n")
    print(f"maslat validate-policy: {len(rows)} finished live queries saved to {args.out}", file=sys.stderr)
