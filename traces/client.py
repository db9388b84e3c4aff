"""The collector's HTTP side: a scaled clock, one streamed OpenAI request, and request bodies.

What a client can measure, and only that (a real vLLM does not send its engine-core timestamps):

    sent   the request leaves the client         -> queued_ts (monotonic), arrival_time (epoch)
    first  the first chunk carrying output text   -> first_token_ts
    each   every later chunk carrying output text -> one inter-token gap (itls)
    last   the last chunk carrying output text    -> last_token_ts

Token counts come from the server's ``usage`` (``stream_options.include_usage``), which vLLM reports
exactly; the number of text chunks is the fallback.

``Clock`` plays in the server's time: against the stand-in server with ``maslat:time_scale`` = X, one
server second lasts X wall seconds, so every duration measured here is divided by X (and every pause
multiplied by X). Against a real server X = 1 and nothing changes.

Keys: a server started with ``vllm serve --api-key KEY`` (or ``maslat serve --api-key``) wants
``Authorization: Bearer KEY`` on ``/v1/*``; ``resolve_api_key`` takes ``--api-key``, else ``OPENAI_API_KEY``,
else ``VLLM_API_KEY``, and ``auth_headers`` makes the session header. A 401 from ``/v1/models`` (the first
call of every client) fails at once with a message naming the flag.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

__all__ = ["API_KEY_ENV", "Clock", "StreamResult", "auth_headers", "base_url", "chat_body", "completion_body",
           "resolve_api_key", "served_model", "stream_request"]

#: environment variables read for the key when ``--api-key`` is not given, in this order
API_KEY_ENV = ("OPENAI_API_KEY", "VLLM_API_KEY")

#: words that are one token each for Llama-3 and for the stand-in's tokenizer approximation
_WORDS = ("time", "data", "model", "plan", "code", "test", "graph", "node", "value", "list", "item", "state",
          "agent", "task", "step", "query", "table", "index", "cache", "block")


#: time scales the collector plays (wall seconds per server second): beyond them its arithmetic on clocks and
#: timeouts overflows or loses every digit (``maslat serve --time-scale`` is typically 0.01 to 10)
TIME_SCALE_RANGE = (1e-4, 1e4)


class Clock:
    """Monotonic and epoch clocks in server seconds (wall seconds divided by ``time_scale``)."""

    def __init__(self, time_scale: float = 1.0):
        lo, hi = TIME_SCALE_RANGE
        if not (isinstance(time_scale, (int, float)) and lo <= time_scale <= hi):
            raise ValueError(f"time scale {time_scale!r} (maslat:time_scale, wall seconds per server second) is "
                             f"outside {lo:g}..{hi:g}; a stand-in server runs at such a scale, and a real vLLM "
                             "publishes none (1)")
        self.time_scale = float(time_scale)
        self._m0, self._e0 = time.monotonic(), time.time()

    def mono(self) -> float:
        return self._m0 + (time.monotonic() - self._m0) / self.time_scale

    def epoch(self) -> float:
        return self._e0 + (time.monotonic() - self._m0) / self.time_scale

    def elapsed(self) -> float:
        return (time.monotonic() - self._m0) / self.time_scale

    async def sleep_until(self, elapsed_s: float) -> None:
        """Sleep until ``elapsed_s`` server seconds after the clock started."""
        delay = (elapsed_s - self.elapsed()) * self.time_scale
        if delay > 0:
            await asyncio.sleep(delay)


@dataclass(slots=True)
class StreamResult:
    """What the client saw of one streamed request (times on ``Clock.mono``)."""

    sent_mono: float
    sent_epoch: float
    status: int | None = None
    error: str | None = None
    chunk_times: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    done: bool = False  # saw [DONE]

    @property
    def ok(self) -> bool:
        return self.error is None and self.done and bool(self.chunk_times)

    @property
    def output_tokens(self) -> int:
        return self.completion_tokens if self.completion_tokens is not None else len(self.chunk_times)


def _chunk_has_output(obj: dict) -> bool:
    for ch in obj.get("choices") or ():
        if ch.get("text"):
            return True
        delta = ch.get("delta") or {}
        if delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning"):
            return True
    return False


async def _read_error(resp) -> str:
    text = await resp.text()
    try:
        err = json.loads(text)
        err = err.get("error", err)
        msg = err.get("message", text) if isinstance(err, dict) else text
    except ValueError:
        msg = text
    return f"HTTP {resp.status}: {msg[:500]}"


async def stream_request(session, url: str, body: dict, clock: Clock, res: StreamResult | None = None) -> StreamResult:
    """POST ``body`` (with ``stream: true``) and time every output chunk into ``res`` (a new one if not
    given, stamped now). Never raises for HTTP or network failures (they land in ``error``); cancellation
    propagates after ``error`` is set, so a caller holding ``res`` keeps the partial result."""
    import aiohttp

    if res is None:
        res = StreamResult(sent_mono=clock.mono(), sent_epoch=clock.epoch())
    try:
        async with session.post(url, json=body) as resp:
            res.status = resp.status
            if resp.status != 200:
                res.error = await _read_error(resp)
                return res
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    res.done = True
                    break
                obj = json.loads(data)
                if "error" in obj and "choices" not in obj:
                    res.error = f"error in stream: {obj['error']}"
                    break
                if _chunk_has_output(obj):
                    res.chunk_times.append(clock.mono())
                usage = obj.get("usage")
                if usage:
                    res.prompt_tokens = usage.get("prompt_tokens")
                    res.completion_tokens = usage.get("completion_tokens")
        if res.error is None and not res.done:
            res.error = "the stream ended without [DONE]"
    except asyncio.CancelledError:
        res.error = "cancelled"
        raise
    except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as e:
        res.error = _describe(e)
    except Exception as e:  # noqa: BLE001 - e.g. aiohttp's LineTooLong (a stream line over 512 KiB): a failed
        res.error = _describe(e)  # request, recorded with its error, never an exception that kills a client task
    return res


def _describe(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    return text if len(text) <= 500 else text[:500] + "..."


def resolve_api_key(explicit: str | None = None) -> str | None:
    """``explicit`` (``--api-key``) if given, else the first of ``API_KEY_ENV`` that is set, else ``None``."""
    import os

    for key in (explicit, *(os.environ.get(v) for v in API_KEY_ENV)):
        if key:
            return key
    return None


def auth_headers(api_key: str | None) -> dict[str, str]:
    """Session headers that send ``api_key`` as vLLM's ``AuthenticationMiddleware`` expects it."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def base_url(endpoint: str) -> str:
    """``http://host:port`` of an endpoint given as ``http://host:port`` or ``http://host:port/v1``."""
    u = endpoint.rstrip("/")
    return u[:-3] if u.endswith("/v1") else u


async def served_model(session, base: str, model: str | None = None) -> dict:
    """The ``/v1/models`` card of ``model`` (default: the first served), with its ``max_model_len``.

    Raises:
        ValueError: the endpoint cannot be listed, serves nothing, or does not serve ``model``.
    """
    try:
        async with session.get(base + "/v1/models") as r:
            if r.status == 401:
                sent = "Authorization" in session.headers
                raise PermissionError(f"{base}/v1/models answered 401 Unauthorized: "
                                      + ("the API key given was refused; pass the server's key with --api-key KEY"
                                         if sent else "the server requires an API key; pass --api-key KEY")
                                      + f" (or set {' / '.join(API_KEY_ENV)})")
            cards = (await r.json(content_type=None)).get("data") or []
    except PermissionError as e:
        raise ValueError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - any failure here means the endpoint is unusable
        raise ValueError(f"cannot list models at {base}/v1/models: {type(e).__name__}: {e}") from None
    ids = [c.get("id") for c in cards]
    if not ids:
        raise ValueError(f"{base}/v1/models lists no model")
    model = model or ids[0]
    if model not in ids:
        raise ValueError(f"model {model!r} is not served at {base}; served: {ids}")
    return cards[ids.index(model)]


def completion_body(model: str, token_ids: list[int], max_tokens: int) -> dict:
    """A ``/v1/completions`` body with an exact-length token-id prompt and an exact output length
    (``ignore_eos``, a vLLM extension every vLLM version accepts)."""
    return {"model": model, "prompt": token_ids, "max_tokens": int(max_tokens), "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}


def chat_body(model: str, content: str, max_tokens: int, *, ignore_eos: bool = True) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": int(max_tokens),
            "stream": True, "stream_options": {"include_usage": True}}
    if ignore_eos:
        body["ignore_eos"] = True
    return body


def filler_text(rng, num_tokens: int) -> str:
    """About ``num_tokens`` tokens of text (one-token words); the server's ``usage`` gives the exact count."""
    return " ".join(_WORDS[i] for i in rng.integers(0, len(_WORDS), max(1, num_tokens)).tolist())
