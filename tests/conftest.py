import os
from pathlib import Path

import pytest

from .realvllm import real_vllm  # noqa: F401  (the real vLLM CPU engine fixture, session-scoped)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def traces_dir() -> Path:
    """The shared measured traces; a test that needs them fails (never skips) when they are missing."""
    d = Path(os.environ.get("MASLAT_TRACES_DIR", ROOT.parent / "shared" / "traces"))
    if not d.is_dir():
        pytest.fail(f"measured traces not found at {d}: put the shared traces directory there or set MASLAT_TRACES_DIR")
    return d
