"""Server-sent-event chunks of one streamed OpenAI response, rendered as vLLM's OpenAI server renders them.

Moved out of ``maslat.server.app`` (which imports it as ``_Chunks``); vLLM's own rendering is in
``vllm/entrypoints/openai/serving_completion.py`` and ``serving_chat.py``.
"""

from __future__ import annotations

import json

from .tokenizer import output_text

__all__ = ["SSEChunks"]


class SSEChunks:
    """Pre-rendered SSE chunks of one streamed response (one JSON object per output token)."""

    def __init__(self, kind: str, rid: str, created: int, model: str):
        self.kind = kind
        obj = "text_completion" if kind == "completion" else "chat.completion.chunk"
        self.head = f'{{"id":"{rid}","object":"{obj}","created":{created},"model":{json.dumps(model)},'
        if kind == "completion":
            self.pre = self.head + '"choices":[{"index":0,"text":'
            self.post = ',"logprobs":null,"finish_reason":%s,"stop_reason":null}]}'
        else:
            self.pre = self.head + '"choices":[{"index":0,"delta":{"content":'
            self.post = '},"logprobs":null,"finish_reason":%s}]}'

    def role(self) -> str:
        return (f'data: {self.head}"choices":[{{"index":0,"delta":{{"role":"assistant","content":""}},'
                f'"logprobs":null,"finish_reason":null}}]}}\n\n')

    def token(self, k: int, last: bool) -> str:
        fin = '"length"' if last else "null"
        return "data: " + self.pre + json.dumps(output_text(k, k + 1)) + self.post % fin + "\n\n"

    def usage(self, prompt: int, completion: int) -> str:
        u = {"prompt_tokens": prompt, "total_tokens": prompt + completion, "completion_tokens": completion}
        return f'data: {self.head}"choices":[],"usage":{json.dumps(u)}}}\n\n'
