"""Checkpoints that cannot run code: written as tensors, numpy arrays and plain values, read with
``torch.load(..., weights_only=True)``.

``torch.load(weights_only=False)`` unpickles anything, so a crafted ``.pt`` runs code on the machine that loads
it (a ``__reduce__`` calling ``os.system``). ``load_checkpoint_file`` uses PyTorch's restricted unpickler,
which builds only tensors, containers and plain values, plus the numpy globals that rebuild arrays and
scalars (the allowlist PyTorch documents for numpy: ``_reconstruct``, ``ndarray``, ``dtype``, ``scalar``;
under both their numpy 2 names and the numpy 1 names older pickles carry). Anything else is refused with
the globals it asked for, unless the caller passes ``trust=True`` (``--trust-checkpoint``: the user vouches for
the file). Checkpoints written by every ``maslat train`` so far (LAMaS/MaAS ``controller.pt``: tensors and
plain metadata; CMDP ``policy.pt``: tensors, numpy arrays and dicts of plain values) load under the allowlist.

``save_checkpoint`` writes only what the restricted reader accepts (numpy scalars become Python numbers,
dataclasses dicts, tuples lists stay as they are), through a temporary file renamed into place, and checks
that the written file loads with ``weights_only=True``, so a trainer can never write a checkpoint that its
own evaluator would refuse.

Every trainer's checkpoint carries a header under ``"maslat_checkpoint"``: ``{"format": "maslat-checkpoint",
"version": 1, "method": <registry name>, "args": <the method's Args as a dict>}`` (``save_checkpoint(...,
method=..., args=...)``), beside the payload keys it always had, so older readers still find theirs.
``read_checkpoint`` is the one place that reads it: it checks the format and version (a newer version is
refused with what to do) and gives files written before the header (``controller.pt`` with
``args.method``, ``policy.pt`` with ``kind``) the header they would have had.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import re
import warnings
from pathlib import Path

from traces.atomic import write_bytes

__all__ = ["FORMAT", "HEADER_KEY", "VERSION", "Checkpoint", "CheckpointHeader", "UnsafeCheckpointError",
           "load_checkpoint_file", "read_checkpoint", "save_checkpoint"]

TRUST_FLAG = "--trust-checkpoint"
FORMAT = "maslat-checkpoint"
VERSION = 1
HEADER_KEY = "maslat_checkpoint"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointHeader:
    """What a checkpoint holds: ``method`` (an ``agents.registry`` name, hyphenated) trained with ``args``."""

    format: str = FORMAT
    version: int = VERSION
    method: str
    args: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.format != FORMAT:
            raise ValueError(f"checkpoint header format {self.format!r} is not {FORMAT!r}")
        if not isinstance(self.version, int) or not 1 <= self.version <= VERSION:
            raise ValueError(f"checkpoint format version {self.version!r}: this maslat reads versions 1..{VERSION}"
                             f" (a newer maslat wrote it: upgrade maslatency)")


@dataclasses.dataclass(frozen=True, slots=True)
class Checkpoint:
    """A read checkpoint: its header (given or reconstructed for an old file) and the payload dict."""

    header: CheckpointHeader
    payload: dict
    legacy: bool


class UnsafeCheckpointError(ValueError):
    """The file needs more than tensors, numpy arrays and plain values to load (it could run code)."""


def _numpy_safe_globals() -> list:
    import numpy as np

    core = np._core.multiarray  # numpy >= 2; numpy 1 pickles name the same functions under numpy.core
    out = [np.ndarray, np.dtype, core._reconstruct, core.scalar,
           (core._reconstruct, "numpy.core.multiarray._reconstruct"), (core.scalar, "numpy.core.multiarray.scalar")]
    out += [type(np.dtype(c)) for c in "?bBhHiIlLqQefdgFDG"]  # numpy.dtypes.Float64DType, ... (dtype pickles)
    return out


def load_checkpoint_file(path: str | os.PathLike | io.BytesIO, *, trust: bool = False):
    """The object saved in ``path``, read with ``weights_only=True`` (tensors, numpy arrays, plain values).

    Raises:
        UnsafeCheckpointError: the file asks for other globals (named in the message); pass ``trust=True``
            only for a file you trust.
        ValueError: the file is not a readable torch checkpoint.
    """
    import torch

    path = Path(path) if isinstance(path, (str, os.PathLike)) else path  # or an open binary file
    if trust:
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Detected pickle protocol 4": the refusal below says what matters
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        try:
            wanted = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # noqa: BLE001 - not a zip checkpoint: read the name from the unpickler's message
            wanted = re.findall(r"GLOBAL (\S+)", str(e))[:1]
        detail = re.search(r"WeightsUnpickler error: \s*(.+)", str(e))
        what = (", ".join(wanted) if wanted else "objects other than tensors and plain values"
                + (f" ({detail.group(1).strip()})" if detail else ""))
        raise UnsafeCheckpointError(
            f"{path}: refused: loading it needs {what}, which could run code on this machine (maslat "
            f"checkpoints hold only tensors, numpy arrays and plain values). If you wrote this file or trust "
            f"it, pass {TRUST_FLAG}.") from None
    except Exception as e:  # noqa: BLE001 - truncated, not a zip, not a pickle: one clear error
        raise ValueError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from None


def _plain(obj):
    """``obj`` with numpy scalars as Python numbers and dataclasses as dicts (what weights_only reads)."""
    import numpy as np

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def save_checkpoint(obj, path: str | os.PathLike, *, method: str | None = None, args=None) -> Path:
    """Write ``obj`` (made plain) to ``path`` atomically; raise ``ValueError`` if it would not load back with
    ``weights_only=True`` (the old file, if any, is then left as it was). With ``method`` (a dict ``obj``),
    the versioned header with ``method`` and ``args`` (a dataclass or dict) goes in first."""
    import torch

    if method is not None:
        if not isinstance(obj, dict):
            raise TypeError("a checkpoint with a header is a dict")
        head = CheckpointHeader(method=method.replace("_", "-"), args=_plain(args) if args is not None else {})
        obj = {HEADER_KEY: dataclasses.asdict(head), **obj}
    buf = io.BytesIO()
    torch.save(_plain(obj), buf)
    try:  # checked before anything is written: a refused checkpoint leaves the old file as it was
        load_checkpoint_file(io.BytesIO(buf.getvalue()))
    except UnsafeCheckpointError as e:
        raise ValueError(f"{path}: the checkpoint holds objects a safe reader refuses: {e}") from None
    return write_bytes(path, buf.getvalue())  # atomic: temporary file, fsync, rename


def read_checkpoint(path: str | os.PathLike, *, trust: bool = False) -> Checkpoint:
    """The checkpoint in ``path``: header and payload (``load_checkpoint_file`` reads it safely).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a maslat checkpoint, or a header this version cannot read (the message says which).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    ck = load_checkpoint_file(path, trust=trust)
    if not isinstance(ck, dict):
        raise ValueError(f"{path}: not a maslat checkpoint (a {type(ck).__name__}, expected a dict)")
    if HEADER_KEY in ck:
        head = ck[HEADER_KEY]
        if not isinstance(head, dict) or "method" not in head:
            raise ValueError(f"{path}: checkpoint header {HEADER_KEY!r} is not a dict with a 'method'")
        try:
            header = CheckpointHeader(**{k: head[k] for k in ("format", "version", "method", "args") if k in head})
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        return Checkpoint(header, {k: v for k, v in ck.items() if k != HEADER_KEY}, legacy=False)
    if ck.get("kind") in ("ppo_lagrangian", "masrouter") and "state" in ck:  # policy.pt before the header
        args = ck.get("args") if isinstance(ck.get("args"), dict) else {}
        return Checkpoint(CheckpointHeader(method=ck["kind"].replace("_", "-"), args=args), ck, legacy=True)
    if isinstance(ck.get("args"), dict) and "method" in ck["args"] and "state_dict" in ck:  # controller.pt before
        return Checkpoint(CheckpointHeader(method=str(ck["args"]["method"]).replace("_", "-"), args=ck["args"]), ck,
                          legacy=True)
    raise ValueError(f"{path}: not a maslat checkpoint (no {HEADER_KEY!r} header, and neither a `maslat train` "
                     f"controller (args + state_dict) nor a CMDP policy (kind + state))")
