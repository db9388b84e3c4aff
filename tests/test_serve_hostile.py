"""The stand-in server against hostile or careless clients, and its API keys (real HTTP on loopback)."""

import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import aiohttp
import pytest

from .standin import ROOT, last_json_line, serving

KEY = "sk-test-0123456789"


def _run(coro):
    return asyncio.run(coro)


async def _request(method, url, *, body=None, raw=None, headers=None):
    async with aiohttp.ClientSession() as s:
        data = raw if raw is not None else (json.dumps(body) if body is not None else None)
        h = {"Content-Type": "application/json", **(headers or {})}
        async with s.request(method, url, data=data, headers=h) as r:
            text = await r.text()
            return r.status, r.headers.get("Content-Type", ""), text


@pytest.fixture(scope="module")
def server():
    with serving("--time-scale", "0.05", "--header-timeout", "1", "--body-timeout", "1", "--json") as srv:
        yield srv


def _error(text: str) -> dict:
    err = json.loads(text)["error"]
    assert isinstance(err, dict) and err["message"] and isinstance(err["code"], int), err
    return err


@pytest.mark.parametrize("method, path, raw, status", [
    ("POST", "/v1/completions", b"[" * 100_000 + b"]" * 100_000, 400),  # RecursionError in the parser
    ("POST", "/v1/completions", b'{"prompt": ' + b"[" * 5000 + b"1" + b"]" * 5000 + b"}", 400),
    ("GET", "/v1/nowhere", None, 404),
    ("GET", "/v1/completions", None, 405),
    ("DELETE", "/health", None, 405),
    ("POST", "/v1/completions", b"x" * (64 * 2**20 + 1), 413),
])
def test_framework_errors_are_openai_json(server, method, path, raw, status):
    got, ctype, text = _run(_request(method, server.url + path, raw=raw))
    assert got == status and ctype.startswith("application/json"), (got, ctype, text[:200])
    assert _error(text)["code"] == status


@pytest.mark.parametrize("body, fragment", [
    ({"prompt": [10**29, 5], "max_tokens": 2}, "Token id 100000000000000000000000000000 is out of vocabulary"),
    ({"prompt": [128256], "max_tokens": 2}, "Token id 128256 is out of vocabulary"),
    ({"prompt": [5], "max_tokens": 2, "stream": True, "stream_options": {"include_usage": "maybe"}},
     "stream_options.include_usage"),
    ({"prompt": [5], "max_tokens": 2, "stream": True, "stream_options": {"include_usage": 2}},
     "stream_options.include_usage"),
    ({"prompt": "word " * 1_000_000, "max_tokens": 2}, "characters (more than"),
    ({"prompt": "word " * 140_000, "max_tokens": 2}, "contains at least 131073 input tokens"),
    ({"messages": [{"role": "user", "content": "x" * 5_000_000}]}, "characters (more than"),
])
def test_refusals_like_vllm(server, body, fragment):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    got, _, text = _run(_request("POST", server.url + path, body=body))
    assert got == 400 and fragment in _error(text)["message"], text[:300]


def test_lax_booleans_as_pydantic_reads_them(server):
    """vLLM's pydantic models read "no" as false (lax mode): no usage chunk; "yes" as true."""
    async def go():
        out = {}
        async with aiohttp.ClientSession() as s:
            for flag in ("no", "yes"):
                body = {"prompt": [5, 6], "max_tokens": 3, "stream": True, "stream_options": {"include_usage": flag}}
                async with s.post(server.url + "/v1/completions", json=body) as r:
                    out[flag] = (r.status, await r.text())
        return out

    out = _run(go())
    assert out["no"][0] == 200 and '"usage"' not in out["no"][1]
    assert out["yes"][0] == 200 and '"usage"' in out["yes"][1]


def test_a_huge_prompt_does_not_stall_the_loop(server):
    """A 3.9 MB prompt of 130,000 tokens (under both bounds) is parsed and tokenized off the event loop:
    /health answers meanwhile."""
    async def go():
        async with aiohttp.ClientSession() as s:
            big = asyncio.create_task(s.post(server.url + "/v1/completions",
                                             json={"prompt": ("a" + " " * 29) * 130_000, "max_tokens": 2}))
            lat = []
            while not big.done():
                t = time.monotonic()
                async with s.get(server.url + "/health") as r:
                    assert r.status == 200
                lat.append(time.monotonic() - t)
                await asyncio.sleep(0.02)
            resp = await big
            return resp.status, await resp.text(), lat

    status, text, lat = _run(go())
    assert status == 200, text[:300]
    assert json.loads(text)["usage"]["prompt_tokens"] == 1 + 130_000
    assert max(lat) < 0.5, f"/health waited {max(lat):.2f} s while the prompt was tokenized"


def test_slow_headers_and_bodies_are_cut(server):
    """Half-sent headers are closed after --header-timeout; a half-sent body gets 408 after --body-timeout."""
    host, port = "127.0.0.1", server.port
    with socket.create_connection((host, port)) as a, socket.create_connection((host, port)) as b:
        a.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # headers never finished
        b.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"prompt\"")
        a.settimeout(5)
        b.settimeout(5)
        t = time.monotonic()
        try:
            assert a.recv(100) == b"", "the half-sent headers' connection is closed"
        except ConnectionResetError:  # closed with a reset: the same
            pass
        waited_s = time.monotonic() - t
        assert 0.5 < waited_s < 10, waited_s
        reply = b.recv(4096).decode()
        assert reply.startswith("HTTP/1.1 408") and '"code": 408' in reply


def test_idle_connections_past_the_cap_make_way(tmp_path):
    """--max-connections 20: half-sent requests are closed at once to admit a real request; connections that
    sent nothing are closed once they are a second old (before, a new connection is refused: their bytes may
    simply not be read yet); the refusals and evictions are reported in a line or two, not one per connection."""
    body = {"prompt": [1, 2], "max_tokens": 2}
    with serving("--time-scale", "0.05", "--max-connections", "20", "--json") as srv:
        slowloris = []
        for _ in range(40):
            slowloris.append(socket.create_connection(("127.0.0.1", srv.port)))
            slowloris[-1].sendall(b"POST /v1/completions HTTP/1.1\r\nHost:")
            time.sleep(0.01)
        assert _run(_request("POST", srv.url + "/v1/completions", body=body))[0] == 200
        silent = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(40)]
        time.sleep(0.3)
        with pytest.raises(aiohttp.ClientError):  # 20 young silent connections hold every place
            _run(_request("POST", srv.url + "/v1/completions", body=body))
        time.sleep(1.0)
        assert _run(_request("POST", srv.url + "/v1/completions", body=body))[0] == 200
        for s in slowloris + silent:
            s.close()
        code, out, err = srv.stop()
    conns = last_json_line(out)["connections"]
    assert conns["evicted"] >= 20 and conns["refused"] >= 1 and conns["peak"] <= 20 and conns["max"] == 20, conns
    assert len(err) < 2000 and "Traceback" not in err, err


# ---------------------------------------------------------------------------------------------------- keys
async def _key_probe(url: str, key: str | None) -> dict:
    h = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"prompt": [1, 2, 3], "max_tokens": 2}
    out = {}
    for name, method, path in (("models", "GET", "/v1/models"), ("completions", "POST", "/v1/completions"),
                               ("health", "GET", "/health"), ("metrics", "GET", "/metrics")):
        status, _, text = await _request(method, url + path, body=body if method == "POST" else None, headers=h)
        out[name] = (status, text)
    return out


def test_api_key_guards_v1_only():
    with serving("--time-scale", "0.05", "--api-key", KEY) as srv:
        none, wrong, right = (_run(_key_probe(srv.url, k)) for k in (None, "sk-wrong", KEY))
        _, _, basic = _run(_request("GET", srv.url + "/v1/models", headers={"Authorization": f"Basic {KEY}"}))
    for probe in (none, wrong):
        for name in ("models", "completions"):
            status, text = probe[name]
            assert status == 401 and _error(text) == {"message": "Unauthorized", "type": "Unauthorized",
                                                      "param": None, "code": 401}
        assert probe["health"][0] == 200 and probe["metrics"][0] == 200, "/health and /metrics stay open"
    assert _error(basic)["code"] == 401, "only the Bearer scheme"
    assert all(right[n][0] == 200 for n in right)


def test_api_key_from_vllm_api_key_env_and_warning_off_loopback():
    env = {**os.environ, "VLLM_API_KEY": KEY, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "maslat", "serve", "--port", "0", "--time-scale", "0.05"]
    proc = subprocess.Popen([*cmd, "--host", "127.0.0.1"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().split()[2]
        assert _run(_key_probe(url, None))["models"][0] == 401
        assert _run(_key_probe(url, KEY))["models"][0] == 200
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    assert "warning" not in err
    env.pop("VLLM_API_KEY")
    proc = subprocess.Popen([*cmd, "--host", "0.0.0.0"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        proc.stdout.readline()
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    assert "warning: listening on 0.0.0.0 without an API key" in err and "--api-key" in err
