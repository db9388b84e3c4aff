"""API keys end to end against the stand-in started with --api-key: the collector, the live backend and
validate-policy send the key (flag or OPENAI_API_KEY / VLLM_API_KEY); without it they fail fast, naming the flag."""

import os
import subprocess
import sys
import time

import pytest

from envs import MASLatencyEnv
from maslat.livebackend import Endpoint, LiveBackend
from traces.client import auth_headers, resolve_api_key
from traces.runs import read_run

from .standin import ROOT, last_json_line, serving

KEY = "sk-standin-7f3a9c"


def _maslat(*args, env_extra=None, timeout=180):
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "VLLM_API_KEY")}
    env.update({"PYTHONUNBUFFERED": "1", **(env_extra or {})})
    t = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "maslat", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout, env=env)
    return p, time.monotonic() - t


@pytest.fixture(scope="module")
def keyed():
    with serving("--time-scale", "0.2", "--api-key", KEY) as srv:
        yield srv


def test_resolve_api_key_order(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    assert resolve_api_key(None) is None and auth_headers(None) == {}
    monkeypatch.setenv("VLLM_API_KEY", "v")
    assert resolve_api_key(None) == "v"
    monkeypatch.setenv("OPENAI_API_KEY", "o")
    assert resolve_api_key(None) == "o" and resolve_api_key("flag") == "flag"
    assert auth_headers("k") == {"Authorization": "Bearer k"}
    assert "k" not in repr(Endpoint(url="http://x", api_key="k")), "the key is never printed"


def test_collect_round_trip_with_a_key(keyed, tmp_path):
    common = ["collect", "--endpoint", keyed.url, "--rate", "20", "--num-requests", "6", "--workload", "fixed:50,5"]
    p, _ = _maslat(*common, "--out", str(tmp_path / "flag"), "--api-key", KEY, "--json")
    assert p.returncode == 0, p.stderr[-2000:]
    assert last_json_line(p.stdout)["ok"] == 6
    p, _ = _maslat(*common, "--out", str(tmp_path / "env"), "--json", env_extra={"VLLM_API_KEY": KEY})
    assert p.returncode == 0 and last_json_line(p.stdout)["ok"] == 6, p.stderr[-2000:]
    assert len(read_run(tmp_path / "flag").requests) == 6
    for f in (tmp_path / "flag").iterdir():
        assert KEY not in f.read_text(), f"the key leaked into {f.name}"


@pytest.mark.parametrize("extra, expect", [
    ((), "requires an API key; pass --api-key KEY"),
    (("--api-key", "sk-wrong"), "the API key given was refused"),
])
def test_collect_without_the_right_key_fails_fast(keyed, tmp_path, extra, expect):
    p, wall_s = _maslat("collect", "--endpoint", keyed.url, "--rate", "5", "--num-requests", "3", "--out",
                        str(tmp_path / "run"), *extra)
    assert p.returncode == 2 and "401 Unauthorized" in p.stderr and expect in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and wall_s < 30
    assert not (tmp_path / "run" / "requests.jsonl").exists()


def test_live_backend_sends_the_key(keyed):
    env = MASLatencyEnv("gsm8k", "test", backend=LiveBackend({"llm": Endpoint(url=keyed.url, api_key=KEY)}))
    try:
        env.reset(seed=0, options={"query": 0})
        _, _, term, _, info = env.step(env.action_space.sample() * 0 + 7)  # stop at once: no call needed
        assert term
    finally:
        env.close()
    b = LiveBackend({"llm": Endpoint(url=keyed.url)})
    with pytest.raises(ValueError, match="401 Unauthorized.*--api-key"):
        b.reset(0)
    b.close()


def test_validate_policy_sends_the_key(keyed):
    args = ["validate-policy", "single_cot", "--task", "gsm8k", "--endpoints", keyed.url, "--num-queries", "1",
            "--concurrency", "1", "--json"]
    p, _ = _maslat(*args, env_extra={"OPENAI_API_KEY": KEY})
    assert p.returncode in (0, 1), p.stderr[-2000:]  # 1: the accuracy bar failed; the calls went through
    out = last_json_line(p.stdout)
    assert out["live"]["endpoints"]["llm"]["calls"] >= 1 and out["failed_live_calls"] == 0
    p, wall_s = _maslat(*args[:-1])
    assert p.returncode == 2 and "--api-key" in p.stderr and "Traceback" not in p.stderr and wall_s < 60
