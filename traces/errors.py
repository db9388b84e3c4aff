"""Errors shared by the trace readers."""

from __future__ import annotations

import json

__all__ = ["TraceFormatError", "line_of_key", "where"]


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
