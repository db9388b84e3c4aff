"""Errors shared by the trace readers, and the hostile-input guards every reader goes through.

Every malformed input ends in ``TraceFormatError`` whose message reads ``file:line: field F: what is wrong, what
was expected``. The guards here turn what Python's own parsers raise on hostile bytes (``UnicodeDecodeError`` on
binary files, ``RecursionError`` on deeply nested JSON, ``ValueError`` on integers of more than 4,300 digits,
lone surrogates that only fail when written back) into that message.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["INT32_MAX", "TraceFormatError", "decode_utf8", "line_of_key", "loads", "unicode_problem", "where"]

#: vLLM's model runner holds token counts, sequence lengths and block ids in int32 tensors
#: (``vllm/v1/worker/gpu_model_runner.py``: ``query_start_loc``, ``seq_lens``; ``vllm/v1/worker/block_table.py``)
INT32_MAX = 2**31 - 1


class TraceFormatError(ValueError):
    """Malformed trace input; the message names the file, the line and the field."""


def where(path, line: int | None = None, field: str | None = None) -> str:
    """``path:line: field F`` prefix of an error message (parts that are unknown are left out)."""
    out = str(path)
    if line is not None:
        out += f":{line}"
    if field is not None:
        out += f": field {field}"
    return out


def line_of_key(text: str | None, key: str) -> int | None:
    """Line of the first ``"key":`` in a JSON text (to point an error at it), or ``None``."""
    if not text:
        return None
    needle = json.dumps(key) + ":"
    for i, line in enumerate(text.splitlines(), start=1):
        if needle in line.replace('" :', '":'):
            return i
    return None


def decode_utf8(data: bytes, path, first_line: int = 1) -> str:
    """``data`` as text; binary content raises ``TraceFormatError`` naming the line of the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + data.count(b"\n", 0, e.start)
        raise TraceFormatError(f"{where(path, line)}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                               f"{e.start}); expected a text file of the measured run format") from None


def loads(text: str) -> tuple[Any, str | None, int]:
    """``(object, None, 1)``, or ``(None, problem, line)`` when ``text`` is not JSON the readers can hold (``line``
    counts from 1 within ``text``)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return None, f"invalid JSON at column {e.colno}: {e.msg}", e.lineno
    except RecursionError:
        return None, ("invalid JSON: nested deeper than the JSON parser allows (about 1,000 levels); expected "
                      "flat objects"), 1
    except ValueError as e:  # integers of more than sys.get_int_max_str_digits() digits
        digits = str(e).split("value has ")[-1].split(" digits")[0] if "value has" in str(e) else "too many"
        return None, f"invalid JSON: integer of {digits} digits; expected numbers of ordinary size", 1
    return obj, None, 1


def unicode_problem(obj: Any) -> tuple[str, str] | None:
    """``(path, problem)`` of the first string (key or value) that cannot be written as UTF-8, e.g. a lone
    surrogate ``"\\ud800"`` that ``json.loads`` accepts; ``None`` when every string is valid."""
    stack: list[tuple[str, Any]] = [("", obj)]
    while stack:
        path, x = stack.pop()
        if isinstance(x, dict):
            for k, v in x.items():
                sub = f"{path}.{k}" if path else str(k)
                if _bad_str(k):
                    return sub, "key is not valid Unicode (a lone surrogate?); expected UTF-8 text"
                stack.append((sub, v))
        elif isinstance(x, list):
            stack.extend((f"{path}[{i}]", v) for i, v in enumerate(x))
        elif isinstance(x, str) and _bad_str(x):
            return path, f"not valid Unicode (a lone surrogate in {x.encode('utf-8', 'backslashreplace')!r}); " \
                         "expected UTF-8 text"
    return None


def _bad_str(s: Any) -> bool:
    if not isinstance(s, str):
        return False
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
