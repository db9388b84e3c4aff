"""maslat collect: measure a vLLM (or stand-in) server under load and write a run directory."""

from __future__ import annotations

import sys
from pathlib import Path

from ._common import add_json_flag, emit_json, format_table, progress

HELP = "load a vLLM OpenAI-compatible server, scrape its /metrics, and write a measured run (needs aiohttp)"
DESCRIPTION = """\
Send streamed requests to an OpenAI-compatible vLLM server and write the measured run format
(requests.jsonl, timeseries.csv, meta.json; failures.jsonl for requests that failed) to --out.

Load: --rate R (Poisson, requests/s), --concurrency N (closed loop: N clients), or --trace-arrivals
(replay an Azure trace's arrival times). Lengths: --workload fixed:P,O | lognormal:PM,OM[,SIGMA] |
azure-conv | azure-code | PATH.csv. Completions prompts are token ids of the exact planned length, with
ignore_eos so outputs have the planned length too; --api chat sends filler text instead.

Times are what a client can see: queued_ts = send, first/last_token_ts = first/last output chunk (so TTFT
includes HTTP and the API server's frontend time); scheduled_ts is null. meta.json records what the
server tells (model, max_model_len, vLLM version, num_gpu_blocks from vllm:cache_config_info) and what it
cannot (--engine-kwarg max_num_seqs=256 ...). Against `maslat serve --time-scale X` all times are
converted to the server's simulated seconds.

--phase2 writes the two-phase estimator dataset (phase2.csv, the seed's columns) from a Phase-1 CSV
(--prompts, columns prompt_text and role_id) under --concurrency N background clients.

Ctrl-C or SIGTERM (timeout, docker stop, systemd) stops sending, records the requests in flight as failed
and leaves a valid partial run (meta.json: interrupted; exit 130 or 143). A server restart during the run is
survived: failed requests are recorded in failures.jsonl and the load goes on. When no request completes,
no run is written (failures.jsonl keeps the errors) and the exit status is 1.

examples:
  maslat collect --endpoint http://127.0.0.1:8000 --rate 5 --num-requests 300 --workload azure-conv --out runs/r5
  maslat collect --endpoint http://127.0.0.1:8000/v1 --concurrency 32 --duration 120 --workload fixed:1024,256 \\
      --out runs/c32 --engine-kwarg max_num_seqs=256 --json
  maslat collect --endpoint http://127.0.0.1:8000 --phase2 --prompts intermediate_prompts.csv --concurrency 10 \\
      --out runs/phase2-n10
"""


def configure(p) -> None:
    p.add_argument("--endpoint", required=True, help="server base URL (http://host:port or http://host:port/v1)")
    p.add_argument("--metrics-url", help="Prometheus page (default: <endpoint>/metrics)")
    p.add_argument("--out", type=Path, required=True, help="run directory to write")
    p.add_argument("--model", help="served model name (default: the first listed by /v1/models)")
    p.add_argument("--api-key", help="key for a server started with --api-key (default: $OPENAI_API_KEY, "
                                     "else $VLLM_API_KEY)")
    p.add_argument("--api", choices=("completions", "chat"), default="completions")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--rate", type=float, help="Poisson arrivals, requests per second")
    load.add_argument("--trace-arrivals", action="store_true", help="replay the Azure workload's arrival times")
    p.add_argument("--concurrency", type=int,
                   help="closed loop with N clients (with --phase2: N background clients; 0 = none)")
    p.add_argument("--workload", default="azure-conv",
                   help="fixed:P,O | lognormal:PM,OM[,SIGMA] | azure-conv | azure-code | PATH.csv (default azure-conv)")
    p.add_argument("--num-requests", type=int, help="requests to plan")
    p.add_argument("--duration", type=float, help="stop sending after this many seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scrape-interval", type=float, default=1.0, help="seconds between scrapes (default 1)")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds before a request fails")
    p.add_argument("--engine-kwarg", action="append", default=[], metavar="KEY=VALUE",
                   help="an engine setting the server does not expose, recorded in meta.json (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.add_argument("--phase2", action="store_true", help="write the two-phase estimator dataset (phase2.csv)")
    p.add_argument("--prompts", type=Path, help="Phase-1 CSV (prompt_text, role_id) for --phase2")
    p.add_argument("--strategies", default="Flash,Concise,DeepThink", help="--phase2 strategies (comma-separated)")
    p.add_argument("--max-tokens", type=int, default=1024, help="--phase2 cap on each call's output (default 1024)")
    p.add_argument("--repeats", type=int, default=1, help="--phase2 passes over every (prompt, strategy)")
    p.add_argument("--model-id", help="--phase2 model_id column (default: the served model name)")
    p.add_argument("--limit-prompts", type=int, help="--phase2: only the first N prompts")
    add_json_flag(p)


def _engine_kwargs(items: list[str]) -> dict:
    import json

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--engine-kwarg must be KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def _config(args):
    from traces.client import resolve_api_key
    from traces.collect import CollectConfig

    phase2 = None
    if args.phase2:
        from traces.phase2 import Phase2Config

        if args.prompts is None:
            raise ValueError("--phase2 needs --prompts (the Phase-1 CSV with prompt_text and role_id)")
        if args.rate is not None or args.trace_arrivals:
            raise ValueError("--phase2 takes --concurrency N background clients, not --rate/--trace-arrivals")
        phase2 = Phase2Config(prompts_csv=args.prompts, strategies=tuple(s.strip() for s in args.strategies.split(",")),
                              max_tokens=args.max_tokens, repeats=args.repeats, model_id=args.model_id,
                              limit=args.limit_prompts)
    return CollectConfig(endpoint=args.endpoint, out_dir=args.out, metrics_url=args.metrics_url, model=args.model,
                         api=args.api, rate_per_s=args.rate, concurrency=args.concurrency,
                         trace_arrivals=args.trace_arrivals, workload=args.workload,
                         num_requests=args.num_requests, duration_s=args.duration, seed=args.seed,
                         scrape_interval_s=args.scrape_interval, request_timeout_s=args.request_timeout,
                         engine_kwargs=_engine_kwargs(args.engine_kwarg), overwrite=args.overwrite, phase2=phase2,
                         api_key=resolve_api_key(args.api_key))


def run(args) -> int:
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        raise ValueError("maslat collect needs aiohttp: pip install 'maslatency[server]'") from None
    from traces.collect import collect

    from .serve import _raise_fd_limit

    cfg = _config(args)
    _raise_fd_limit()
    total = cfg.num_requests
    with progress(total, "requests", unit="req") as bar:
        s = collect(cfg, progress=bar)
    rows = [[m, s[m]["mean"], s[m]["p50"], s[m]["p90"], s[m]["p99"]] for m in ("ttft_s", "tpot_s", "itl_s", "e2e_s")]
    print(f"{s['model']}: {s['ok']} ok, {s['failed']} failed, {s['skipped_oversize']} skipped (too long) "
          f"of {s['sent'] + s['skipped_oversize']} planned{'; INTERRUPTED' if s['interrupted'] else ''}")
    print(format_table(rows, ["client-side", "mean", "p50", "p90", "p99"]))
    tput = s["throughput_req_per_s"]
    print(f"throughput {tput if tput is None else round(tput, 3)} req/s; scrape failures {s['scrape_failures']}, "
          f"counter resets {s['counter_resets']}; run written to {s['out']}")
    for err in s["task_errors"]:
        print(f"maslat collect: error: a client task failed ({err}); the run is marked incomplete", file=sys.stderr)
    code = {"SIGTERM": 143}.get(s["signal"], 130) if s["interrupted"] and s["signal"] else 0
    if not s["run_written"]:
        fails = f"; failures in {s['out']}/failures.jsonl" if s["failed"] else ""
        print(f"maslat collect: error: no request completed ({s['failed']} failed"
              f"{', first: ' + s['first_error'] if s['first_error'] else ''}{'; interrupted' if s['interrupted'] else ''}"
              f"); no run written to {s['out']}{fails}", file=sys.stderr)
        code = code or 1
    elif s["task_errors"]:
        code = code or 1
    if args.json:
        emit_json(s)
    return code
