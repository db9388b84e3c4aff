"""Reader of the Azure LLM inference traces 2023 (``TIMESTAMP,ContextTokens,GeneratedTokens``).

Data: Azure Public Dataset (Azure/AzurePublicDataset, CC-BY-4.0), released with Splitwise (Patel et al.,
ISCA 2024). Timestamps carry 7 fractional digits (more than ``%f`` accepts), lines end in CRLF and the last
row has no newline; all of that is handled here.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from .errors import TraceFormatError
from .paths import trace_file

__all__ = ["AzureTrace", "TraceFormatError", "read_azure_trace", "azure_trace"]

HEADER = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


@dataclass(frozen=True)
class AzureTrace:
    path: Path
    offsets_s: np.ndarray  # arrival offsets from the first request, seconds
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    start: datetime
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.offsets_s)

    @property
    def duration_s(self) -> float:
        return float(self.offsets_s[-1]) if len(self) else 0.0

    @property
    def rate_per_s(self) -> float:
        return (len(self) - 1) / self.duration_s if self.duration_s > 0 else float("nan")


def _parse_ts(text: str) -> datetime:
    date, _, frac = text.partition(".")
    base = datetime.strptime(date, "%Y-%m-%d %H:%M:%S")
    if frac:
        if not frac.isdigit():
            raise ValueError("fractional seconds must be digits")
        micro = int((frac + "000000")[:6])
        return base.replace(microsecond=micro)
    return base


def read_azure_trace(path: str | Path, *, skip_bad: bool = False, limit: int | None = None) -> AzureTrace:
    """Read one Azure CSV. Bad rows raise ``TraceFormatError`` (file:line:field) unless ``skip_bad``,
    in which case they are counted in ``skipped``. Rows must be in time order."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such trace file") from None
    lines = text.splitlines()
    if not lines or tuple(h.strip() for h in lines[0].split(",")) != HEADER:
        raise TraceFormatError(f"{path}:1: header must be {','.join(HEADER)}, got {lines[0] if lines else '<empty>'!r}")
    times, prompts, outputs, skipped = [], [], [], 0
    prev = None
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = line.split(",")
        try:
            if len(parts) != 3:
                raise ValueError(f"expected 3 fields, got {len(parts)}")
            field = "TIMESTAMP"
            ts = _parse_ts(parts[0].strip())
            field = "ContextTokens"
            p = int(parts[1])
            field = "GeneratedTokens"
            o = int(parts[2])
            if p < 0 or o < 0:
                raise ValueError("token counts must be >= 0")
            if prev is not None and ts < prev:
                field = "TIMESTAMP"
                raise ValueError(f"timestamp goes backwards ({ts} < {prev})")
        except ValueError as e:
            if skip_bad:
                skipped += 1
                continue
            where = f"field {field}" if len(parts) == 3 else "row"
            raise TraceFormatError(f"{path}:{lineno}: {where}: {e}") from None
        prev = ts
        times.append(ts)
        prompts.append(p)
        outputs.append(o)
        if limit is not None and len(times) >= limit:
            break
    if not times:
        raise TraceFormatError(f"{path}: no data rows")
    t0 = times[0]
    offsets = np.array([(t - t0).total_seconds() for t in times])
    return AzureTrace(path, offsets, np.array(prompts, np.int64), np.array(outputs, np.int64), t0, skipped)


def azure_trace(kind: str = "conv", **kwargs) -> AzureTrace:
    """The shared Azure trace of ``kind`` ``"conv"`` or ``"code"``."""
    if kind not in ("conv", "code"):
        raise ValueError(f"Azure trace kind must be 'conv' or 'code', got {kind!r}")
    return read_azure_trace(trace_file("azure2023", f"AzureLLMInferenceTrace_{kind}.csv"), **kwargs)
