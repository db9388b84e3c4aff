"""maslat serve: a stand-in vLLM server whose replicas are simulated in real time."""

from __future__ import annotations

import sys

from ._common import add_json_flag, emit_json

HELP = "run a stand-in vLLM OpenAI-compatible server backed by simulated replicas (needs the server extra)"
DESCRIPTION = """\
Start an HTTP server on loopback that behaves like `vllm serve`: /v1/completions and
/v1/chat/completions (streaming server-sent events or not; max_tokens, ignore_eos, usage), /v1/models,
/health, /version and /metrics (Prometheus text with vLLM's metric names; one `engine` label per replica).

Timing comes from the simulated replicas, advancing with the wall clock: queues, batching, preemption and
KV saturation are those of the profile's engine. --time-scale X makes one simulated second last X wall
seconds (0.1 = ten times faster than real time); latencies in /metrics are simulated seconds and the
stand-in's own gauge `maslat:time_scale` says X. There is no EOS: every request generates exactly
max_tokens. Prompt tokens: token-id prompts count exactly; text is counted by a documented approximation
(maslat/server/tokenizer.py). A client that disconnects frees its slot (request_success{finished_reason="abort"}).

Keys, as `vllm serve --api-key`: with --api-key KEY (repeatable; else the VLLM_API_KEY environment
variable) every /v1/* request needs the header `Authorization: Bearer KEY` (otherwise 401); /health,
/metrics and /version stay open. Listening on a non-loopback address without a key prints a warning.

Hostile clients: at most --max-connections sockets (a new one evicts the longest-idle connection, or is
refused when all are busy), request headers within --header-timeout s, bodies within --body-timeout s (408),
idle keep-alive connections closed after 75 s; refusals are logged once per 10 s, not per connection.

The first line on standard output names the URL. SIGINT or SIGTERM stops the server and prints a summary
(with --json, one JSON object as the last line).

examples:
  maslat serve --profile h100-llama-3.1-8b --port 8000
  maslat serve --profile h100-llama-3.1-8b --replicas 2 --port 0 --time-scale 0.1 --json
  VLLM_API_KEY=secret maslat serve --host 0.0.0.0 --port 8000
"""


def configure(p) -> None:
    p.add_argument("--profile", default="h100-llama-3.1-8b", help="embedded profile name or path to a profile JSON")
    p.add_argument("--replicas", type=int, default=1, help="simulated engines behind the server (default 1)")
    p.add_argument("--router", default="least_outstanding", help="how requests are spread over replicas")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback)")
    p.add_argument("--port", type=int, default=8000, help="port (0 picks a free one; default 8000)")
    p.add_argument("--time-scale", type=float, default=1.0,
                   help="wall seconds per simulated second (default 1 = real time; 0.1 = 10x faster)")
    p.add_argument("--served-model-name", help="model name clients use (default: the profile's model name)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--default-max-tokens", type=int,
                   help="max_tokens for requests that give none (default: vLLM's rule, max_model_len - prompt)")
    p.add_argument("--api-key", action="append", default=None, metavar="KEY",
                   help="require `Authorization: Bearer KEY` on /v1/* (repeatable; default: $VLLM_API_KEY)")
    p.add_argument("--max-connections", type=int, default=8192,
                   help="open connections at most (default 8192, lowered to the file limit)")
    p.add_argument("--header-timeout", type=float, default=30.0,
                   help="seconds a connection may take to send its request headers (default 30)")
    p.add_argument("--body-timeout", type=float, default=60.0,
                   help="seconds a request body may take to arrive, else 408 (default 60)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="token ids at or above this are refused (default: the profile's embedding rows)")
    add_json_flag(p)


def _api_keys(args) -> tuple[str, ...]:
    """``--api-key`` wins over ``VLLM_API_KEY``, as in vLLM (``entrypoints/serve/middleware/register.py``)."""
    import os

    keys = [k for k in (args.api_key or [os.environ.get("VLLM_API_KEY")]) if k]
    return tuple(keys)


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _raise_fd_limit() -> None:
    """Each open stream holds a socket; lift the soft file limit to the hard one."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass


def run(args) -> int:
    import asyncio
    import signal

    try:
        import aiohttp  # noqa: F401
    except ImportError:
        raise ValueError("maslat serve needs aiohttp: pip install 'maslatency[server]'") from None
    from sim import load_profile

    from ..server.app import ServeConfig, serve_forever

    cfg = ServeConfig(profile=load_profile(args.profile), replicas=args.replicas, router=args.router, host=args.host,
                      port=args.port, time_scale=args.time_scale, served_model_name=args.served_model_name,
                      seed=args.seed, default_max_tokens=args.default_max_tokens, api_keys=_api_keys(args),
                      max_connections=args.max_connections, header_timeout_s=args.header_timeout,
                      body_timeout_s=args.body_timeout, vocab_size=args.vocab_size)
    if not cfg.api_keys and not _is_loopback(cfg.host):
        print(f"warning: listening on {cfg.host} without an API key: anyone who can reach this port can send "
              f"requests; pass --api-key KEY (or set VLLM_API_KEY)", file=sys.stderr, flush=True)
    _raise_fd_limit()

    def ready(url: str) -> None:
        print(f"maslat serve: {url}  model={cfg.model_name}  profile={cfg.profile.name}  replicas={cfg.replicas}  "
              f"time-scale={cfg.time_scale}{'  api-key=required' if cfg.api_keys else ''}", flush=True)

    async def main() -> dict:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await serve_forever(cfg, on_ready=ready, stop=stop)

    try:
        summary = asyncio.run(main())
    except OSError as e:  # the port is taken, or the address is not ours
        raise ValueError(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}") from None
    c = summary["connections"]
    print(f"served {summary['requests']} requests: {summary['completed']} completed, {summary['aborted']} aborted, "
          f"{summary['client_errors']} client errors; {summary['simulated_s']:.1f} simulated s; "
          f"worst timer lag {summary['max_lag_s'] * 1e3:.1f} ms; connections: {c['accepted']} accepted (at most "
          f"{c['peak']} open of {c['max']}), {c['evicted']} evicted, {c['refused']} refused, {c['timed_out']} timed out",
          file=sys.stderr)
    if args.json:
        emit_json(summary)
    return 0
