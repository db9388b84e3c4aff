"""A deterministic tokenizer approximation for the stand-in server (no model files needed).

The stand-in never runs a model, so it only needs token *counts* (for ``usage``, the context-length check
and the simulated prefill) and stable token *identities* (for the prefix cache). Rules:

* A prompt given as token ids (``"prompt": [1, 2, 3]``, as vLLM accepts) is taken exactly: its length is
  the prompt length and its ids feed the prefix cache. This is what ``maslat collect`` sends, so the
  counts it records agree with the server's to the token, here and on a real vLLM.
* Text is split into pieces: runs of letters/underscores, runs of digits, and single other non-space
  characters. A letter run of L characters counts ``ceil(L / 5)`` tokens, a digit run ``ceil(L / 3)``
  (Llama-3 splits numbers into groups of at most three digits), any other piece one token. English
  prose comes out near 1.3 tokens per word, close to Llama-3's tokenizer; code and unusual text can be
  off by tens of percent. Each token id is the CRC-32 of its characters, so equal text gives equal ids.
* A text completion prompt starts with ``<|begin_of_text|>`` (1 token), as vLLM tokenizes text prompts
  with special tokens; token-id prompts are taken as given (vLLM adds nothing to them).
* A chat prompt follows the Llama-3 template's token overhead: ``<|begin_of_text|>`` (1), per message a
  header ``<|start_header_id|>role<|end_header_id|>\\n\\n`` (4) and ``<|eot_id|>`` (1), and the
  generation prompt for the assistant (4): ``1 + sum(5 + content) + 4``.
* Generated text cycles through short words, one token each (``" lorem"``, ``" ipsum"``, ...), so the
  output re-tokenises to exactly ``completion_tokens`` under the same rules.
"""

from __future__ import annotations

import re
import zlib

__all__ = ["BOS_TOKEN_ID", "MAX_CHARS_PER_TOKEN", "OUTPUT_WORDS", "chat_token_ids", "output_text", "prompt_segments", "text_token_ids"]

_PIECES = re.compile(r"[^\W\d]+|\d+|[^\w\s]")
BOS_TOKEN_ID = 128000  # <|begin_of_text|>
_BOS, _HEADER, _EOT, _GEN_PROMPT = BOS_TOKEN_ID, (128006, 0, 128007, 271), 128009, (128006, 78191, 128007, 271)
_ID_RANGE = 120_000  # ids stay below Llama-3's 128,000 text tokens

#: one token each under the rules above
OUTPUT_WORDS = (" lorem", " ipsum", " dolor", " sit", " amet", " sed", " do", " magna", " elit", " ut",
                " enim", " ad", " minim", " quis", " nisi", " ex")


def _piece_ids(piece: str, width: int) -> list[int]:
    return [zlib.crc32(piece[i:i + width].encode("utf-8", "surrogatepass")) % _ID_RANGE for i in range(0, len(piece), width)]


#: the most characters one token of these rules can stand for, counting the whitespace between pieces
#: generously; the prompt character bound is ``max_model_len * MAX_CHARS_PER_TOKEN`` (vLLM's
#: ``_text_len_check`` in ``vllm/renderers/params.py`` uses the tokenizer's ``max_chars_per_token``)
MAX_CHARS_PER_TOKEN = 32


def text_token_ids(text: str, limit: int | None = None) -> list[int]:
    """Approximate token ids of ``text`` (see the module docstring for the rules).

    With ``limit``, stop once more than ``limit`` ids are found (vLLM tokenizes with
    ``max_length = max_input_tokens + 1`` for the same reason: the work stays bounded while the length check
    still fails).
    """
    out: list[int] = []
    for m in _PIECES.finditer(text):
        if limit is not None and len(out) > limit:
            break
        piece = m.group()
        if piece.isdigit():
            out += _piece_ids(piece, 3)
        elif piece[0].isalpha() or piece[0] == "_":
            out += _piece_ids(piece, 5)
        else:
            out.append(zlib.crc32(piece.encode("utf-8", "surrogatepass")) % _ID_RANGE)
    return out


def chat_token_ids(messages: list[tuple[str, str]], limit: int | None = None) -> list[int]:
    """Token ids of a chat prompt ``[(role, content), ...]`` under the Llama-3 template overhead (``limit``:
    as ``text_token_ids``; the result may then be cut short, but is longer than ``limit``)."""
    out = [_BOS]
    for role, content in messages:
        if limit is not None and len(out) > limit:
            break
        header = list(_HEADER)
        header[1] = zlib.crc32(role.encode("utf-8", "surrogatepass")) % _ID_RANGE
        out += header
        out += text_token_ids(content, None if limit is None else max(0, limit - len(out)))
        out.append(_EOT)
    out += _GEN_PROMPT
    return out


def output_text(start: int, stop: int) -> str:
    """The generated text of output tokens ``start .. stop-1``."""
    n = len(OUTPUT_WORDS)
    return "".join(OUTPUT_WORDS[k % n] for k in range(start, stop))


def prompt_segments(token_ids, block_size: int) -> tuple[tuple[int, int], ...]:
    """Prefix-cache segments of a prompt: one per KV block, identified by the block's token ids.

    The simulator chains segment identities (``sim.kv_cache.build_chain``), so two prompts share cached
    blocks exactly where their leading blocks have equal tokens, as vLLM's chained block hashes do.
    Python's hash of a tuple of ints does not depend on the process, so identities are reproducible.
    """
    ids = tuple(int(t) for t in token_ids)
    mask = (1 << 62) - 1
    return tuple((hash(ids[i:i + block_size]) & mask, len(ids[i:i + block_size]))
                 for i in range(0, len(ids), block_size))
