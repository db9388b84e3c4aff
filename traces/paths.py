"""Where the shared measured traces live: ``$MASLAT_TRACES_DIR``, default ``../shared/traces``."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["TracesNotFound", "traces_dir", "trace_file"]

ENV_VAR = "MASLAT_TRACES_DIR"


class TracesNotFound(FileNotFoundError):
    pass


def _repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def traces_dir() -> Path:
    """The traces directory; raises ``TracesNotFound`` saying where to put it."""
    env = os.environ.get(ENV_VAR)
    d = Path(env) if env else _repo_root().parent / "shared" / "traces"
    if not d.is_dir():
        raise TracesNotFound(
            f"measured traces not found at {d}. Put the shared traces directory there (it holds vllm/, "
            f"azure2023/, splitwise/ and SOURCES.md) or set {ENV_VAR} to its path."
        )
    return d


def trace_file(*parts: str) -> Path:
    """A file under the traces directory, e.g. ``trace_file("azure2023", "AzureLLMInferenceTrace_conv.csv")``."""
    p = traces_dir().joinpath(*parts)
    if not p.exists():
        raise TracesNotFound(f"{p} is missing from the traces directory {traces_dir()} ({ENV_VAR})")
    return p
