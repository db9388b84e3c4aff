"""Helpers for tests that run the real stand-in server (``maslat serve``) as a subprocess on loopback."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def small_profile(tmp_path: Path, name: str = "small", **engine) -> Path:
    """A copy of the H100 8B profile with some engine limits changed, written as JSON."""
    from sim import load_profile

    p = load_profile("h100-llama-3.1-8b")
    p = p.replace(name=name, engine=replace(p.engine, **engine))
    path = tmp_path / f"{name}.json"
    path.write_text(p.to_json())
    return path


class Server:
    def __init__(self, proc: subprocess.Popen, url: str):
        self.proc, self.url = proc, url
        self.port = int(url.rsplit(":", 1)[1])
        self.stdout: list[str] = []

    def stop(self, sig=signal.SIGTERM, timeout: float = 20.0) -> tuple[int, str, str]:
        """Stop the server; return (exit code, rest of stdout, stderr)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, err


def start_server(*args: str, port: int = 0, startup_s: float = 30.0) -> Server:
    cmd = [sys.executable, "-m", "maslat", "serve", "--port", str(port), *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    first: list[str] = []
    reader = threading.Thread(target=lambda: first.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(startup_s)
    line = first[0] if first else ""
    m = re.search(r"(http://127\.0\.0\.1:\d+)", line)
    if not m:
        proc.kill()
        _, err = proc.communicate(timeout=10)
        raise RuntimeError(f"maslat serve did not start: {line!r}\n{err}")
    return Server(proc, m.group(1))


@contextmanager
def serving(*args: str, port: int = 0):
    srv = start_server(*args, port=port)
    try:
        yield srv
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.communicate(timeout=10)


def last_json_line(stdout: str) -> dict:
    lines = [ln for ln in stdout.strip().splitlines() if ln.strip()]
    assert lines, "no output"
    return json.loads(lines[-1])


async def stream_completion(session, url: str, body: dict) -> dict:
    """POST a streaming completion; return chunks' receive times, texts, usage and the finish reason."""
    import time

    t0 = time.monotonic()
    out = {"times": [], "texts": [], "usage": None, "finish": None, "done": False, "status": None, "t0": t0}
    async with session.post(url + "/v1/completions", json={**body, "stream": True}) as resp:
        out["status"] = resp.status
        if resp.status != 200:
            out["error"] = await resp.json()
            return out
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                out["done"] = True
                break
            obj = json.loads(data)
            if obj.get("usage"):
                out["usage"] = obj["usage"]
            for ch in obj.get("choices", []):
                if ch.get("text"):
                    out["times"].append(time.monotonic())
                    out["texts"].append(ch["text"])
                if ch.get("finish_reason"):
                    out["finish"] = ch["finish_reason"]
    return out


def parse_metrics(text: str) -> dict:
    """``{sample_name: {frozenset(labels): value}}`` from Prometheus text."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, {})[frozenset(s.labels.items())] = s.value
    return out


def metric_sum(metrics: dict, name: str, **labels) -> float:
    want = set(labels.items())
    return sum(v for k, v in metrics.get(name, {}).items() if want <= set(k))
