"""maslat bench serve: N concurrent streams against a stand-in server subprocess on loopback."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time

from ._common import emit_json, format_table

HELP = "stand-in server capacity: N concurrent streaming requests on loopback (none may be lost)"
DESCRIPTION = """\
Start `maslat serve` in a subprocess, open --streams concurrent streaming completions at once, and report
how many completed with every token, the wall time, client-side TTFT, and the server's worst clock lag
(how far its simulated clock fell behind the wall clock while it handled the burst).

example:
  maslat bench serve --streams 1000 --output-tokens 16 --json
"""


def configure(p) -> None:
    p.add_argument("--streams", type=int, default=1000, help="concurrent streaming requests (default 1000)")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--output-tokens", type=int, default=16)
    p.add_argument("--profile", default="h100-llama-3.1-8b")
    p.add_argument("--time-scale", type=float, default=1.0)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")


async def _one(session, url: str, body: dict) -> tuple[int, float | None, str | None]:
    t0 = time.monotonic()
    tokens, ttft = 0, None
    try:
        async with session.post(url, json=body) as r:
            if r.status != 200:
                return 0, None, f"HTTP {r.status}"
            async for raw in r.content:
                if raw.startswith(b"data: [DONE]"):
                    return tokens, ttft, None
                if raw.startswith(b"data: {") and any(c.get("text") for c in json.loads(raw[6:])["choices"]):
                    tokens += 1
                    ttft = ttft if ttft is not None else time.monotonic() - t0
        return tokens, ttft, "no [DONE]"
    except Exception as e:  # noqa: BLE001 - every failure is counted and reported
        return tokens, ttft, f"{type(e).__name__}: {e}"


async def _burst(url: str, n: int, prompt: int, out: int) -> tuple[list, float]:
    import aiohttp

    body = {"prompt": [100] * prompt, "max_tokens": out, "stream": True}
    t0 = time.monotonic()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=600)) as s:
        res = await asyncio.gather(*(_one(s, url + "/v1/completions", body) for _ in range(n)))
    return res, time.monotonic() - t0


def run(args) -> int:
    import numpy as np

    from .serve import _raise_fd_limit

    _raise_fd_limit()
    proc = subprocess.Popen([sys.executable, "-m", "maslat", "serve", "--port", "0", "--profile", args.profile,
                             "--time-scale", str(args.time_scale), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        m = re.search(r"http://[\d.]+:\d+", proc.stdout.readline())
        if not m:
            raise ValueError(f"the stand-in server did not start: {proc.stderr.read()[-2000:]}")
        res, wall = asyncio.run(_burst(m.group(0), args.streams, args.prompt_tokens, args.output_tokens))
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
    server = json.loads(out.strip().splitlines()[-1])
    complete = sum(1 for t, _, e in res if e is None and t == args.output_tokens)
    errors = [e for _, _, e in res if e is not None]
    ttft = np.array([f for _, f, _ in res if f is not None])
    stats = {"streams": args.streams, "complete": complete, "lost": args.streams - complete,
             "errors": len(errors), "first_errors": errors[:5], "wall_s": wall,
             "client_ttft_s": {"p50": float(np.median(ttft)) if len(ttft) else None,
                               "max": float(ttft.max()) if len(ttft) else None},
             "server_max_lag_s": server["max_lag_s"], "server_simulated_s": server["simulated_s"],
             "time_scale": args.time_scale, "profile": args.profile, "prompt_tokens": args.prompt_tokens,
             "output_tokens": args.output_tokens}
    print(format_table([[args.streams, complete, len(errors), wall, stats["client_ttft_s"]["max"],
                         server["max_lag_s"]]],
                       ["streams", "complete", "errors", "wall_s", "max_ttft_s", "server_max_lag_s"]))
    if args.json:
        emit_json(stats)
    return 0 if complete == args.streams else 1
