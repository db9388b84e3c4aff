"""Atomic file writes: every file a command writes goes through here (``traces`` and ``maslat`` import it).

A file is written to a temporary file in the same directory, flushed and ``fsync``-ed, then renamed over the
target with ``os.replace`` (atomic on POSIX and Windows within one file system). A crash, a full disk or an
exception while writing therefore leaves the old file (or none) or the complete new one, never a truncated
mix; the temporary file is removed. The directory is ``fsync``-ed after the rename where the platform allows,
so the rename itself survives a power cut.

File-system errors become ``OutputError`` (a ``ValueError``: ``maslat`` prints it and exits 2) that names the
path and says what to do: no space left, the output is a directory, a parent is a file, permission denied.
``output_path`` checks an output before any work: its suffix is one the command writes (never silently another
format), it is not a directory, and its folder can be created.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

__all__ = ["OutputError", "atomic_open", "output_dir", "output_path", "write_bytes", "write_text"]


class OutputError(ValueError):
    """An output cannot be written; the message names the path and what to change."""


_HINTS = {
    errno.ENOSPC: "no space left on the device; free some space or choose another --out (the previous file, if "
                  "any, is unchanged)",
    errno.EDQUOT: "disk quota exceeded; free some space or choose another --out (the previous file is unchanged)",
    errno.EISDIR: "is a directory; give a file name",
    errno.ENOTDIR: "a parent of this path is a file, not a directory; choose another path",
    errno.EEXIST: "a parent of this path exists and is not a directory; choose another path",
    errno.EACCES: "permission denied; choose a folder you can write to",
    errno.EPERM: "operation not permitted; choose a folder you can write to",
    errno.EROFS: "read-only file system; choose a folder you can write to",
    errno.ENAMETOOLONG: "file name too long",
}


def _error(path: Path, e: OSError) -> OutputError:
    hint = _HINTS.get(e.errno, e.strerror or str(e))
    return OutputError(f"cannot write {path}: {hint}")


def _mkdir(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError as e:  # a file where a folder should be
        raise _error(folder, OSError(errno.ENOTDIR, e.strerror)) from None
    except OSError as e:
        raise _error(folder, e) from None


def output_path(path: str | Path, suffixes: Iterable[str] | None = None, *, what: str = "output") -> Path:
    """Check an output path before the work that produces it.

    Args:
        path: where the command will write.
        suffixes: the suffixes it can write (``(".csv", ".parquet")``); ``None``: any.
        what: the option's name, for the message (``--timeseries``).

    Raises:
        OutputError: a suffix the command does not write, a directory, or a folder that cannot be created.
    """
    p = Path(path)
    allowed = tuple(suffixes) if suffixes is not None else None
    if allowed is not None and p.suffix.lower() not in allowed:
        raise OutputError(f"{what} {p}: cannot write a {p.suffix or 'suffix-less'} file; use one of "
                          f"{', '.join(allowed)}")
    if p.is_dir():
        raise OutputError(f"{what} {p}: is a directory; give a file name")
    _mkdir(p.parent)
    return p


def output_dir(path: str | Path, *, what: str = "output folder") -> Path:
    """Create an output folder (for plots, checkpoints...); a file in its place is an ``OutputError``."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OutputError(f"{what} {p}: is a file; give a folder")
    _mkdir(p)
    return p


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", *, encoding: str | None = "utf-8",
                newline: str | None = None) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on a clean exit it replaces ``path``, on an error it is removed.

    ``mode`` is ``"w"`` (text) or ``"wb"``. Any ``OSError`` (while writing, flushing or renaming) becomes an
    ``OutputError`` naming ``path``; other exceptions propagate after the clean-up.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode 'w' or 'wb', got {mode!r}")
    target = Path(path)
    if target.is_dir():
        raise OutputError(f"cannot write {target}: is a directory; give a file name")
    _mkdir(target.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as e:
        raise _error(target, e) from None
    try:
        os.chmod(tmp, _mode_of(target))
        kw = {} if "b" in mode else {"encoding": encoding, "newline": newline}
        with os.fdopen(fd, mode, **kw) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise _error(target, e) from None
        raise
    _fsync_dir(target.parent)


def _mode_of(target: Path) -> int:
    """The permissions the new file gets: the old file's, else what ``open`` would give (0o666 less umask);
    ``mkstemp`` alone would leave 0o600."""
    try:
        return target.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0o022)
        os.umask(umask)
        return 0o666 & ~umask


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not supported here (Windows): the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text(path: str | Path, text: str, *, encoding: str = "utf-8", newline: str | None = None) -> Path:
    """Write ``text`` to ``path`` atomically (see the module docstring)."""
    with atomic_open(path, "w", encoding=encoding, newline=newline) as f:
        f.write(text)
    return Path(path)


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)
