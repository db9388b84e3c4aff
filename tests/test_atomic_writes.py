"""Files the commands write (issue 19, part 5): atomic (old file or new, never a truncated mix), clear errors
(exit 2, no traceback) for a full disk, an output that is a directory, a parent that is a file; suffixes honoured
or refused."""

from __future__ import annotations

import errno
import json
import os

import pandas as pd
import pytest

import sim
import traces.atomic as atomic
from maslat.cli import main
from tests import hostile
from traces.atomic import OutputError, atomic_open, write_text


class _DiskFullAfter:
    """A file object whose writes fail with ENOSPC once ``limit`` bytes went through (a full disk)."""

    def __init__(self, f, limit: int):
        self.f, self.left = f, limit

    def write(self, data):
        n = len(data)
        if n > self.left:
            self.f.write(data[: self.left])
            self.left = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.left -= n
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.f.__exit__(*exc)


@pytest.fixture
def disk_full(monkeypatch):
    """Every atomic write fails with ENOSPC after 4 KiB."""
    real = os.fdopen
    monkeypatch.setattr(atomic.os, "fdopen", lambda fd, *a, **k: _DiskFullAfter(real(fd, *a, **k), 4096))


def _leftovers(d):
    return [p.name for p in d.iterdir() if p.name.endswith(".tmp")]


def test_full_disk_leaves_the_old_file_intact(tmp_path, disk_full):
    path = tmp_path / "profile.json"
    old = sim.load_profile("h100-llama-3.1-8b").to_json()
    path.write_text(old)
    with pytest.raises(OutputError, match="no space left on the device"):
        write_text(path, "x" * 100_000)
    assert path.read_text() == old and _leftovers(tmp_path) == []
    with pytest.raises(OutputError, match="no space left"), atomic_open(tmp_path / "new.bin", "wb") as f:
        f.write(b"y" * 10_000)
    assert not (tmp_path / "new.bin").exists() and _leftovers(tmp_path) == []


def test_an_exception_while_writing_keeps_the_old_file(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("old\n")
    with pytest.raises(RuntimeError), atomic_open(path) as f:
        f.write("new, half")
        raise RuntimeError("the writer crashed")
    assert path.read_text() == "old\n" and _leftovers(tmp_path) == []
    path.chmod(0o640)
    write_text(path, "new\n")
    assert path.read_text() == "new\n" and path.stat().st_mode & 0o777 == 0o640  # the old file's permissions
    umask = os.umask(0o022)
    os.umask(umask)
    write_text(tmp_path / "fresh.txt", "x")
    assert (tmp_path / "fresh.txt").stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would, not mkstemp's 0600


def _calibrate(capsys, run, out, *extra):
    rc = main(["calibrate", str(run), "--out", str(out), "--max-evals", "5", *extra])
    return rc, capsys.readouterr()


def test_calibrate_on_a_full_disk_keeps_the_good_profile(tmp_path, capsys, monkeypatch):
    run = hostile.write(tmp_path / "run")
    good = tmp_path / "good.json"
    rc, cap = _calibrate(capsys, run, good)
    assert rc == 0, cap.err
    before = good.read_bytes()
    assert len(before) > 4096  # a truncated write would show
    real = os.fdopen
    monkeypatch.setattr(atomic.os, "fdopen", lambda fd, *a, **k: _DiskFullAfter(real(fd, *a, **k), 4096))
    rc, cap = _calibrate(capsys, run, good, "--seed", "1")
    assert rc == 2 and "no space left on the device" in cap.err and "Traceback" not in cap.err
    assert good.read_bytes() == before and _leftovers(tmp_path) == []
    sim.load_profile(good)  # still loads


def test_outputs_that_are_directories_or_under_files_are_refused_before_the_work(tmp_path, capsys):
    run = hostile.write(tmp_path / "run")
    (tmp_path / "dir.json").mkdir()
    (tmp_path / "file").write_text("x")
    for out, needle in ((tmp_path / "dir.json", "is a directory"), (tmp_path / "file" / "p.json", "is a file"),
                        (tmp_path / "p.yaml", "cannot write a .yaml file; use one of .json")):
        rc, cap = _calibrate(capsys, run, out)
        assert rc == 2 and needle in cap.err and "Traceback" not in cap.err, cap.err
        assert "refining" not in cap.out and "coefficients" not in cap.out  # refused before the work


def _simulate(capsys, *extra):
    rc = main(["simulate", "--rate", "2", "--duration", "5", "--prompt-tokens", "50", "--output-tokens", "5",
               *extra])
    return rc, capsys.readouterr()


def test_simulate_output_suffixes_are_honoured_or_refused(tmp_path, capsys):
    rc, cap = _simulate(capsys, "--timeseries", str(tmp_path / "ts.jsonl"), "--records", str(tmp_path / "r.json"))
    assert rc == 0, cap.err
    rows = [json.loads(line) for line in (tmp_path / "ts.jsonl").read_text().splitlines()]
    assert rows and "t_s" in rows[0]  # JSON lines, not CSV
    assert isinstance(json.loads((tmp_path / "r.json").read_text()), list)
    rc, cap = _simulate(capsys, "--records", str(tmp_path / "r.parquet"), "--timeseries", str(tmp_path / "t.csv"))
    assert rc == 0 and len(pd.read_parquet(tmp_path / "r.parquet")) > 0
    assert pd.read_csv(tmp_path / "t.csv").columns[0] == "t_s"
    rc, cap = _simulate(capsys, "--timeseries", str(tmp_path / "ts.txt"))
    assert rc == 2 and "--timeseries" in cap.err and "use one of .csv, .parquet, .jsonl, .json" in cap.err
    (tmp_path / "d.csv").mkdir()
    rc, cap = _simulate(capsys, "--records", str(tmp_path / "d.csv"))
    assert rc == 2 and "is a directory" in cap.err
