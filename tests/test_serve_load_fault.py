"""A bounded load-and-fault storm against `maslat serve` on loopback, repeated in rounds.

Each round: 1,000 concurrent streams (a seeded fifth of them disconnect at a random chunk, some just before the
last one), malformed bodies, slow bodies that never finish, and a burst of idle half-sent connections that
pushes the server past its connection cap. Throughout, a probe sends one normal request every 100 ms on a fresh
connection. Asserted: the server stays up and answers every probe within a second; every generation request is
completed, aborted or refused (nothing lost); the gauges return to 0; standard error stays small; the RSS of
the server process is flat across rounds and it keeps no per-request records.
"""

import asyncio
import json
import time

import aiohttp
import numpy as np
import psutil
import pytest

from .standin import last_json_line, metric_sum, parse_metrics, serving

ROUNDS, STREAMS, MALFORMED, SLOW, IDLE, CAP = 4, 1000, 60, 40, 400, 1300
MALFORMED_BODIES = [b"{not json", b"[" * 50_000, b'{"prompt": [1e400]}', b'{"prompt": "hi", "max_tokens": "x"}',
                    b'{"prompt": [100000000000000000000000000000]}', b'{"prompt": 42}', b"\xff\xfe",
                    b'{"prompt": [1], "stream": true, "stream_options": {"include_usage": "maybe"}}',
                    b'{"prompt": [1], "max_tokens": 999999999}', b'{"prompt": []}']


async def _stream(s, url, body, cut_after):
    """One stream; ``cut_after`` = chunks to read before leaving (``None``: read to the end)."""
    async with s.post(url + "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status == 200, await r.text()
        n = 0
        async for line in r.content:
            if line.startswith(b"data: [DONE]"):
                return "done"
            if line.startswith(b"data: "):
                n += 1
                if cut_after is not None and n >= cut_after:
                    r.close()  # the client goes away mid-stream
                    return "left"
    return "cut"


async def _malformed(s, url, raw):
    async with s.post(url + "/v1/completions", data=raw, headers={"Content-Type": "application/json"}) as r:
        body = await r.json()
        assert 400 <= r.status < 500 and body["error"]["code"] == r.status, (r.status, body)
        return r.status


async def _slow_body(port):
    """Headers and a third of the body, then silence: the server answers 408 after --body-timeout."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 90\r\n\r\n{\"prompt\": [1, 2, 3")
    await writer.drain()
    data = await asyncio.wait_for(reader.read(4096), 30)
    writer.close()
    return data.split(b" ", 2)[1] if data else b"closed"


async def _idle_burst(port, n):
    """``n`` connections that send half a request line and stall (slowloris)."""
    out = []
    for _ in range(n):
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"POST /v1/completions HTTP/1.1\r\nHost:")
            out.append(w)
        except OSError:
            pass
    return out


async def _probe(url, stop, lat):
    body = {"prompt": [7, 8, 9], "max_tokens": 2}
    while not stop.is_set():
        t = time.monotonic()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True),
                                         timeout=aiohttp.ClientTimeout(total=10)) as s:
            async with s.post(url + "/v1/completions", json=body) as r:
                assert r.status == 200 and (await r.json())["usage"]["completion_tokens"] == 2
        lat.append(time.monotonic() - t)
        await asyncio.sleep(0.1)


async def _round(url, port, rng):
    cuts, outs = [None] * STREAMS, [8 + i % 32 for i in range(STREAMS)]
    for i in rng.choice(STREAMS, STREAMS // 5, replace=False):
        outs[i] = int(rng.integers(8, 40))
        cuts[i] = outs[i] if rng.random() < 0.3 else int(rng.integers(1, outs[i]))  # 30 %: after the last token
    bodies = [{"prompt": [10 + i % 50] * (32 + i % 64), "max_tokens": outs[i]} for i in range(STREAMS)]
    stop, lat = asyncio.Event(), []
    probe = asyncio.create_task(_probe(url, stop, lat))
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as s:
        idle = await _idle_burst(port, IDLE)
        streams = [_stream(s, url, b, c) for b, c in zip(bodies, cuts, strict=True)]
        bad = [_malformed(s, url, MALFORMED_BODIES[i % len(MALFORMED_BODIES)]) for i in range(MALFORMED)]
        slow = [_slow_body(port) for _ in range(SLOW)]
        res = await asyncio.gather(*streams, *bad, *slow)
        for w in idle:
            w.close()
    stop.set()
    await probe
    return res[:STREAMS], res[STREAMS:STREAMS + MALFORMED], res[STREAMS + MALFORMED:], lat


async def _settle(url):
    """Wait until the gauges read 0 (every stream finished or aborted); return the last /metrics."""
    async with aiohttp.ClientSession() as s:
        for _ in range(100):
            async with s.get(url + "/metrics") as r:
                m = parse_metrics(await r.text())
            if (metric_sum(m, "vllm:num_requests_running") == 0 and metric_sum(m, "vllm:num_requests_waiting") == 0
                    and metric_sum(m, "vllm:kv_cache_usage_perc") == 0):
                return m
            await asyncio.sleep(0.1)
    return m


@pytest.mark.slow
def test_load_and_fault_storm_in_rounds():
    rng = np.random.Generator(np.random.PCG64(19))
    args = ("--time-scale", "0.05", "--max-connections", str(CAP), "--header-timeout", "3", "--body-timeout", "2",
            "--json")
    figures = []
    with serving(*args) as srv:
        proc = psutil.Process(srv.proc.pid)
        t0 = time.monotonic()
        for k in range(ROUNDS):
            streams, bad, slow, lat = asyncio.run(_round(srv.url, srv.port, rng))
            m = asyncio.run(_settle(srv.url))
            assert metric_sum(m, "vllm:num_requests_running") == 0 and metric_sum(m, "vllm:num_requests_waiting") == 0
            assert metric_sum(m, "vllm:kv_cache_usage_perc") == 0
            assert streams.count("done") + streams.count("left") == STREAMS, set(streams)
            assert set(slow) == {b"408"}, set(slow)
            assert lat and max(lat) < 1.0, f"round {k}: a normal request waited {max(lat):.2f} s"
            figures.append({"round": k, "rss_mb": proc.memory_info().rss / 2**20, "probes": len(lat),
                            "max_probe_s": max(lat), "left": streams.count("left"),
                            "aborted": metric_sum(m, "vllm:request_success_total", finished_reason="abort")})
        wall_s = time.monotonic() - t0
        code, out, err = srv.stop()
    s = last_json_line(out)
    print(json.dumps({"wall_s": wall_s, "rounds": figures, "summary": s, "stderr_bytes": len(err)}))
    probes = sum(f["probes"] for f in figures)
    assert code == 0
    assert s["requests"] == ROUNDS * (STREAMS + MALFORMED + SLOW) + probes, "every request reached a handler"
    assert s["completed"] + s["aborted"] + s["client_errors"] == s["requests"], "nothing lost"
    assert s["client_errors"] == ROUNDS * (MALFORMED + SLOW)
    left = sum(f["left"] for f in figures)
    assert s["aborted"] <= left and s["completed"] >= ROUNDS * STREAMS - left + probes
    assert s["aborted"] == figures[-1]["aborted"], "the server's count of aborts is /metrics' count"
    assert s["connections"]["evicted"] > 0 and s["connections"]["peak"] <= CAP
    assert s["records_kept"] < ROUNDS * STREAMS / 2, "per-request records are dropped once counted"
    assert len(err) < 4000 and "Traceback" not in err, err[-2000:]
    growth_mb = figures[-1]["rss_mb"] - figures[1]["rss_mb"]
    assert growth_mb < 25, f"RSS grew {growth_mb:.1f} MB from round 2 to round {ROUNDS}: {figures}"
