"""The OpenAI-compatible request and response shapes of vLLM's server, without any web framework.

Mirrors ``vllm/entrypoints/openai/protocol.py`` (``CompletionRequest``, ``ChatCompletionRequest``, the
response and stream-chunk models, ``ErrorResponse``) and the length check of ``serving_engine.py``
(``_validate_input``). Only what changes timing or token counts is interpreted; sampling parameters
(temperature, top_p, seed, stop, logprobs, ...) are accepted and ignored, as the stand-in samples no text.

Not supported (a 400 says so): ``n`` other than 1, several prompts in one completion request,
``echo``, ``best_of`` other than 1. There is no EOS: every request generates exactly its ``max_tokens``
(``finish_reason="length"``), which is what ``ignore_eos=true`` asks of a real server. Default
``max_tokens``: 16 for completions (vLLM's ``CompletionRequest`` default), the room left in
``max_model_len`` for chat (optionally capped by the server's ``--default-max-tokens``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .tokenizer import BOS_TOKEN_ID, MAX_CHARS_PER_TOKEN, chat_token_ids, text_token_ids

__all__ = ["APIError", "Generation", "error_body", "parse_chat", "parse_completion"]


class APIError(Exception):
    """An OpenAI-style error: HTTP ``status``, error ``type``, ``message`` and the offending ``param``."""

    TYPES = {400: "BadRequestError", 404: "NotFoundError", 405: "MethodNotAllowed", 408: "Request Timeout",
             500: "InternalServerError"}

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    @property
    def type(self) -> str:
        return self.TYPES.get(self.status, "BadRequestError")


def error_body(e: APIError) -> dict:
    """vLLM's ``ErrorResponse`` (OpenAI's nested form)."""
    return {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.status}}


@dataclass(frozen=True, slots=True, kw_only=True)
class Generation:
    """A validated generation request."""

    kind: str  # "completion" | "chat"
    model: str
    token_ids: tuple[int, ...]
    max_tokens: int
    stream: bool
    include_usage: bool

    @property
    def prompt_tokens(self) -> int:
        return len(self.token_ids)


def loads_object(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise APIError(400, "the request body is not valid JSON: nested too deeply") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def _typed(body: dict, key: str, types, default=None):
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise APIError(400, f"{key} must be {getattr(types, '__name__', types)}, got a boolean", key)
    if not isinstance(v, types):
        raise APIError(400, f"{key} has the wrong type ({type(v).__name__})", key)
    return v


_TRUE = frozenset(("1", "on", "t", "true", "y", "yes"))
_FALSE = frozenset(("0", "off", "f", "false", "n", "no"))


def _lax_bool(obj: dict, key: str, default: bool, where: str = "") -> bool:
    """A boolean field as vLLM's pydantic models read it (lax mode): ``true``/``false``, ``0``/``1``, or one of
    the strings ``yes no on off true false t f y n 1 0`` (any case); anything else is a 400."""
    v = obj.get(key)
    if v is None:
        return default
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in _TRUE | _FALSE:
        return v.strip().lower() in _TRUE
    raise APIError(400, f"{where}{key}: Input should be a valid boolean, got {json.dumps(v)[:50]}", where + key)


def _check_model(body: dict, served: str) -> str:
    model = _typed(body, "model", str, served)
    if model != served:
        raise APIError(404, f"The model `{model}` does not exist.", "model")
    return model


def _common(body: dict, kind: str, model: str, ids: list[int], *, max_model_len: int,
            default_max_tokens: int | None) -> Generation:
    n = _typed(body, "n", int, 1)
    if n != 1:
        raise APIError(400, "the stand-in server serves n=1 only", "n")
    if _typed(body, "best_of", int, 1) != 1:
        raise APIError(400, "the stand-in server serves best_of=1 only", "best_of")
    if not ids:
        raise APIError(400, "The decoder prompt cannot be empty", "prompt" if kind == "completion" else "messages")
    key = "max_completion_tokens" if kind == "chat" and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _typed(body, key, int, None)
    if kind == "completion" and "max_tokens" not in body:
        max_tokens = 16  # CompletionRequest.max_tokens defaults to 16, as in OpenAI's completions API
    p = len(ids)
    if p > max_model_len:  # vLLM's _token_len_check (vllm/renderers/params.py): text was cut at max_model_len + 1
        qualifier = "at least " if p == max_model_len + 1 else ""
        raise APIError(400, f"This model's maximum context length is {max_model_len} tokens. However, your prompt "
                            f"contains {qualifier}{p} input tokens, which exceeds this limit even without any "
                            f"output tokens. Please reduce the length of the input prompt.", "input_tokens")
    if max_tokens is None:
        if p >= max_model_len:
            raise APIError(400, f"This model's maximum context length is {max_model_len} tokens. However, your "
                                f"request has {p} input tokens. Please reduce the length of the input messages.")
        # vLLM's default: whatever room the context leaves (optionally capped by the server)
        max_tokens = max_model_len - p if default_max_tokens is None else min(default_max_tokens, max_model_len - p)
    if max_tokens < 1:
        raise APIError(400, f"{key} must be at least 1, got {max_tokens}", key)
    if p + max_tokens > max_model_len:
        raise APIError(400, f"This model's maximum context length is {max_model_len} tokens. However, you "
                            f"requested {p + max_tokens} tokens ({p} in the messages, {max_tokens} in the "
                            f"completion). Please reduce the length of the messages or completion.", key)
    stream = _lax_bool(body, "stream", False)
    opts = _typed(body, "stream_options", dict, {})
    include_usage = _lax_bool(opts, "include_usage", False, "stream_options.")
    _lax_bool(opts, "continuous_usage_stats", False, "stream_options.")
    return Generation(kind=kind, model=model, token_ids=tuple(ids), max_tokens=max_tokens, stream=stream,
                      include_usage=include_usage)


def _check_chars(num_chars: int, max_model_len: int) -> None:
    """vLLM's ``_text_len_check``: text longer than ``max_model_len * max_chars_per_token`` characters cannot
    fit and is refused before it is tokenized."""
    max_chars = max_model_len * MAX_CHARS_PER_TOKEN
    if num_chars > max_chars:
        raise APIError(400, f"This model's maximum context length is {max_model_len} tokens. However, your prompt "
                            f"contains {num_chars} characters (more than {max_chars} characters, which is the upper "
                            f"bound for {max_model_len} input tokens). Please reduce the length of the input "
                            f"prompt.", "input_text")


def _check_vocab(ids: list[int], vocab_size: int | None) -> None:
    """vLLM's ``validate_token_ids`` (``vllm/renderers/base.py``): an id outside the vocabulary is a 400."""
    if vocab_size is not None and ids and max(ids) >= vocab_size:
        raise APIError(400, f"Token id {max(ids)} is out of vocabulary", "prompt")


def parse_completion(body: dict, *, served_model: str, max_model_len: int, default_max_tokens: int | None = None,
                     vocab_size: int | None = None) -> Generation:
    """``POST /v1/completions``: ``prompt`` is a string or a list of token ids (one prompt only)."""
    model = _check_model(body, served_model)
    if body.get("echo"):
        raise APIError(400, "the stand-in server does not support echo", "echo")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        _check_chars(len(prompt), max_model_len)
        # vLLM adds special tokens to text
        ids = [BOS_TOKEN_ID, *text_token_ids(prompt, limit=max_model_len)][:max_model_len + 1] if prompt else []
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt):
        ids = list(prompt)
        _check_vocab(ids, vocab_size)
    elif isinstance(prompt, list) and prompt and all(isinstance(t, (str, list)) for t in prompt):
        raise APIError(400, "the stand-in server takes one prompt per request", "prompt")
    else:
        raise APIError(400, "prompt must be a string or a list of non-negative token ids", "prompt")
    return _common(body, "completion", model, ids, max_model_len=max_model_len, default_max_tokens=default_max_tokens)


def _content_text(content, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"messages[{i}].content: only text parts are supported", "messages")
            parts.append(part["text"])
        return "".join(parts)
    if content is None:
        return ""
    raise APIError(400, f"messages[{i}].content must be a string or a list of text parts", "messages")


def parse_chat(body: dict, *, served_model: str, max_model_len: int, default_max_tokens: int | None = None,
               vocab_size: int | None = None) -> Generation:
    """``POST /v1/chat/completions``: ``messages`` is a list of ``{"role", "content"}``."""
    model = _check_model(body, served_model)
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "messages must be a non-empty list", "messages")
    pairs = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, f"messages[{i}] must be an object with a string role", "messages")
        pairs.append((m["role"], _content_text(m.get("content"), i)))
    _check_chars(sum(len(r) + len(c) for r, c in pairs), max_model_len)
    ids = chat_token_ids(pairs, limit=max_model_len)[:max_model_len + 1]  # cut as vLLM's max_length + 1
    return _common(body, "chat", model, ids, max_model_len=max_model_len,
                   default_max_tokens=default_max_tokens)
