"""The stand-in vLLM server: real HTTP on loopback against `maslat serve` in a subprocess."""

import asyncio
import json
import signal
import time

import aiohttp
import pytest

from maslat.server.tokenizer import text_token_ids
from sim import load_profile

from .standin import last_json_line, metric_sum, parse_metrics, serving, small_profile, stream_completion

MODEL = "meta-llama/Llama-3.1-8B"


@pytest.fixture(scope="module")
def server():
    with serving("--time-scale", "0.5", "--replicas", "2") as srv:
        yield srv


def _run(coro):
    return asyncio.run(coro)


async def _get(url):
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return r.status, await r.text()


async def _post(url, body=None, raw=None):
    async with aiohttp.ClientSession() as s:
        data = raw if raw is not None else json.dumps(body)
        async with s.post(url, data=data, headers={"Content-Type": "application/json"}) as r:
            return r.status, await r.json()


def test_models_health_version_metrics(server):
    status, text = _run(_get(server.url + "/v1/models"))
    card = json.loads(text)["data"][0]
    assert status == 200 and card["id"] == MODEL and card["object"] == "model"
    assert card["max_model_len"] == load_profile("h100-llama-3.1-8b").engine.max_model_len
    assert _run(_get(server.url + "/health"))[0] == 200
    assert "0.19.0" in json.loads(_run(_get(server.url + "/version"))[1])["version"]
    status, text = _run(_get(server.url + "/metrics"))
    m = parse_metrics(text)
    assert status == 200
    engines = {dict(k)["engine"] for k in m["vllm:num_requests_running"]}
    assert engines == {"0", "1"}, "one engine label per replica, as a data-parallel vLLM"
    assert m["maslat:time_scale"][frozenset()] == 0.5
    info = {dict(k)["num_gpu_blocks"] for k in m["vllm:cache_config_info"]}
    assert info == {"27000"}


@pytest.mark.parametrize("path, body, raw, status, etype", [
    ("/v1/completions", None, b"{not json", 400, "BadRequestError"),
    ("/v1/completions", None, b"[1, 2]", 400, "BadRequestError"),
    ("/v1/completions", {"model": "gpt-7", "prompt": "hi", "max_tokens": 4}, None, 404, "NotFoundError"),
    ("/v1/chat/completions", {"model": "gpt-7", "messages": [{"role": "user", "content": "hi"}]}, None, 404,
     "NotFoundError"),
    ("/v1/completions", {"model": MODEL, "prompt": [1] * 131000, "max_tokens": 100}, None, 400, "BadRequestError"),
    ("/v1/completions", {"model": MODEL, "prompt": [1] * 131072}, None, 400, "BadRequestError"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, None, 400, "BadRequestError"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 4, "n": 2}, None, 400, "BadRequestError"),
    ("/v1/completions", {"prompt": "", "max_tokens": 4}, None, 400, "BadRequestError"),
    ("/v1/completions", {"prompt": 42, "max_tokens": 4}, None, 400, "BadRequestError"),
    ("/v1/chat/completions", {"messages": "hello"}, None, 400, "BadRequestError"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "four"}, None, 400, "BadRequestError"),
])
def test_bad_requests_get_openai_errors(server, path, body, raw, status, etype):
    got, obj = _run(_post(server.url + path, body, raw))
    assert got == status
    err = obj["error"]
    assert err["type"] == etype and err["code"] == status and err["message"]


def test_oversize_message_names_the_limit(server):
    _, obj = _run(_post(server.url + "/v1/completions", {"prompt": [5] * 131000, "max_tokens": 100}))
    assert "maximum context length is 131072 tokens" in obj["error"]["message"]
    assert "131100" in obj["error"]["message"]


def test_non_streaming_usage_counts(server):
    status, obj = _run(_post(server.url + "/v1/completions",
                             {"model": MODEL, "prompt": list(range(100, 137)), "max_tokens": 9, "ignore_eos": True}))
    assert status == 200 and obj["object"] == "text_completion"
    assert obj["usage"] == {"prompt_tokens": 37, "total_tokens": 46, "completion_tokens": 9}
    choice = obj["choices"][0]
    assert choice["finish_reason"] == "length" and len(text_token_ids(choice["text"])) == 9
    prompt = "The quick brown fox jumps over the lazy dog."
    status, obj = _run(_post(server.url + "/v1/completions", {"prompt": prompt, "max_tokens": 3}))
    assert obj["usage"]["prompt_tokens"] == 1 + len(text_token_ids(prompt)) == 11, "BOS + 10 pieces"
    status, obj = _run(_post(server.url + "/v1/completions", {"prompt": [1, 2, 3]}))
    assert obj["usage"]["completion_tokens"] == 16, "vLLM's completions default max_tokens"
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}]
    status, obj = _run(_post(server.url + "/v1/chat/completions", {"messages": msgs, "max_tokens": 4}))
    assert status == 200 and obj["object"] == "chat.completion"
    assert obj["usage"]["prompt_tokens"] == 1 + (5 + 3) + (5 + 10) + 4
    assert obj["choices"][0]["message"]["role"] == "assistant"
    assert obj["usage"]["completion_tokens"] == 4


def test_streaming_completion_chunks_usage_and_timing(server):
    async def go():
        async with aiohttp.ClientSession() as s:
            return await stream_completion(s, server.url, {"prompt": [7] * 1000, "max_tokens": 40,
                                                           "stream_options": {"include_usage": True}})

    out = _run(go())
    assert out["status"] == 200 and out["done"]
    assert len(out["texts"]) == 40 and out["finish"] == "length"
    assert out["usage"] == {"prompt_tokens": 1000, "total_tokens": 1040, "completion_tokens": 40}
    # an idle H100 8B replica: prefill of 1000 tokens + frontend ~ 30-60 ms, decode steps ~ 7-10 ms
    # simulated; at time scale 0.5 the wall times are half that (plus loopback HTTP overhead)
    ttft = out["times"][0] - out["t0"]
    gaps = [b - a for a, b in zip(out["times"], out["times"][1:], strict=False)]
    assert 0.005 < ttft < 0.3
    mean_gap = sum(gaps) / len(gaps)
    assert 0.002 < mean_gap < 0.02, mean_gap
    assert max(gaps) < 0.2


def test_streaming_chat_sends_role_then_tokens(server):
    async def go():
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True}
        chunks = []
        async with aiohttp.ClientSession() as s, s.post(server.url + "/v1/chat/completions", json=body) as r:
            assert r.headers["Content-Type"].startswith("text/event-stream")
            async for raw in r.content:
                line = raw.decode().strip()
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunks.append(json.loads(line[6:]))
        return chunks

    chunks = _run(go())
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert [d["content"] for d in deltas[1:]] == [" lorem", " ipsum", " dolor", " sit", " amet"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_overload_queues_like_the_engine(tmp_path):
    """max_num_seqs=2: the third and fourth requests wait; the gauges say so; all four complete."""
    prof = small_profile(tmp_path, max_num_seqs=2)

    async def go(url):
        async with aiohttp.ClientSession() as s:
            tasks = [asyncio.create_task(stream_completion(s, url, {"prompt": [3] * 200, "max_tokens": 150}))
                     for _ in range(4)]
            await asyncio.sleep(0.4)
            async with s.get(url + "/metrics") as r:
                m = parse_metrics(await r.text())
            return m, await asyncio.gather(*tasks)

    with serving("--profile", str(prof), "--time-scale", "0.5") as srv:
        m, outs = _run(go(srv.url))
    assert metric_sum(m, "vllm:num_requests_running") == 2
    assert metric_sum(m, "vllm:num_requests_waiting") == 2
    assert all(o["done"] and len(o["texts"]) == 150 for o in outs)
    firsts = sorted(o["times"][0] - o["t0"] for o in outs)
    assert firsts[2] > firsts[1] + 0.3, "the queued requests start after a running one finished"


def test_disconnect_frees_the_slot(tmp_path):
    """One slot: a client that goes away mid-stream is aborted, and the queued request runs at once."""
    prof = small_profile(tmp_path, max_num_seqs=1)

    async def go(url):
        async with aiohttp.ClientSession() as s:
            resp = await s.post(url + "/v1/completions", json={"prompt": [9] * 500, "max_tokens": 100000,
                                                               "stream": True})
            await resp.content.readline()  # the first token is out: it holds the only slot
            waiter = asyncio.create_task(stream_completion(s, url, {"prompt": [4] * 100, "max_tokens": 20}))
            queued_waiter = asyncio.create_task(_post(url + "/v1/completions", {"prompt": [2] * 50,
                                                                                "max_tokens": 5}))
            await asyncio.sleep(0.3)
            async with s.get(url + "/metrics") as r:
                before = parse_metrics(await r.text())
            t_close = time.monotonic()
            resp.close()  # the client goes away
            out = await waiter
            await queued_waiter
            await asyncio.sleep(0.1)
            async with s.get(url + "/metrics") as r:
                after = parse_metrics(await r.text())
            return before, after, out, t_close

    with serving("--profile", str(prof), "--time-scale", "0.2", "--json") as srv:
        before, after, out, t_close = _run(go(srv.url))
        code, stdout, _ = srv.stop(signal.SIGINT)
    assert metric_sum(before, "vllm:num_requests_running") == 1
    assert metric_sum(before, "vllm:num_requests_waiting") == 2
    assert out["done"] and len(out["texts"]) == 20
    assert out["times"][0] - t_close < 1.0, "the queued request started as soon as the slot was freed"
    assert metric_sum(after, "vllm:request_success_total", finished_reason="abort") == 1
    assert metric_sum(after, "vllm:request_success_total", finished_reason="length") == 2
    assert metric_sum(after, "vllm:num_requests_running") == 0
    assert metric_sum(after, "vllm:kv_cache_usage_perc") == 0.0
    summary = last_json_line(stdout)
    assert code == 0 and summary["aborted"] == 1 and summary["completed"] == 2


def test_a_queued_non_streaming_client_that_leaves_is_aborted(tmp_path):
    prof = small_profile(tmp_path, max_num_seqs=1)

    async def go(url):
        async with aiohttp.ClientSession() as s:
            hog = asyncio.create_task(stream_completion(s, url, {"prompt": [9] * 100, "max_tokens": 400}))
            await asyncio.sleep(0.2)
            leaver = asyncio.create_task(_post(url + "/v1/completions", {"prompt": [1] * 100, "max_tokens": 5}))
            await asyncio.sleep(0.3)
            leaver.cancel()  # closes its connection while it waits in the engine's queue
            await asyncio.sleep(0.3)
            async with s.get(url + "/metrics") as r:
                m = parse_metrics(await r.text())
            await hog
            return m

    with serving("--profile", str(prof), "--time-scale", "0.5") as srv:
        m = _run(go(srv.url))
    assert metric_sum(m, "vllm:num_requests_waiting") == 0
    assert metric_sum(m, "vllm:request_success_total", finished_reason="abort") == 1


def test_a_thousand_concurrent_streams_none_lost():
    n, out_tokens = 1000, 16

    async def go(url):
        conn = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=300)
        async with aiohttp.ClientSession(connector=conn, timeout=timeout) as s:
            bodies = [{"prompt": [10 + i % 50] * (32 + i % 64), "max_tokens": out_tokens,
                       "stream_options": {"include_usage": True}} for i in range(n)]
            outs = await asyncio.gather(*(stream_completion(s, url, b) for b in bodies), return_exceptions=True)
            async with s.get(url + "/metrics") as r:
                return outs, parse_metrics(await r.text())

    with serving("--time-scale", "1", "--json") as srv:
        outs, m = _run(go(srv.url))
        code, stdout, _ = srv.stop(signal.SIGTERM)
    errors = [o for o in outs if isinstance(o, BaseException) or o["status"] != 200 or not o["done"]]
    assert not errors, errors[:3]
    assert all(len(o["texts"]) == out_tokens and o["usage"]["completion_tokens"] == out_tokens for o in outs)
    assert metric_sum(m, "vllm:request_success_total", finished_reason="length") == n
    assert metric_sum(m, "vllm:request_success_total", finished_reason="abort") == 0
    summary = last_json_line(stdout)
    assert summary["completed"] == n and summary["aborted"] == 0 and summary["client_errors"] == 0
    print("1000 streams: server summary", summary)


def test_tokens_leave_at_the_simulated_step_times():
    """In-process server, real HTTP: each request's first and last chunks reach the client within a few
    milliseconds after the wall-clock instants of its simulated first_token_ts and last_token_ts."""
    from maslat.server.app import ServeConfig, StandInServer

    async def go():
        srv = StandInServer(ServeConfig(profile=load_profile("h100-llama-3.1-8b"), port=0, time_scale=1.0,
                                        keep_records=True))
        url = await srv.start()
        loop = asyncio.get_running_loop()
        try:
            async with aiohttp.ClientSession() as s:
                outs = []
                for prompt, out in ((2000, 30), (100, 60)):
                    t_send = loop.time()
                    o = await stream_completion(s, url, {"prompt": [11] * prompt, "max_tokens": out})
                    o["t_send"] = t_send
                    outs.append(o)
                    await asyncio.sleep(0.05)
            recs = srv.world.records.to_dataframe()
            return outs, recs, srv.sim
        finally:
            await srv.stop()

    outs, recs, sim = _run(go())
    for o, (_, rec) in zip(outs, recs.iterrows(), strict=True):
        # stream_completion stamps with time.monotonic, the loop's clock on Linux
        first_late = o["times"][0] - sim.wall_at(rec.first_token_s)
        last_late = o["times"][-1] - sim.wall_at(rec.last_token_s)
        print("lateness", first_late, last_late)
        assert -0.002 < first_late < 0.05 and -0.002 < last_late < 0.05, (first_late, last_late)  # CI cores are shared
        assert abs(sim.wall_at(rec.arrival_s) - o["t_send"]) < 0.03
