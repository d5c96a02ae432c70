"""engine.atomic: directories and files replaced in one rename, nothing left behind on success or failure."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from engine import atomic
from engine.atomic import (
    atomic_directory,
    atomic_write,
    explain_write_errors,
    finish_interrupted_swaps,
    stale_temporaries,
    write_json,
)


def _siblings(path: Path):
    return sorted(p.name for p in path.parent.iterdir())


def test_atomic_directory_replaces_and_cleans_up(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_directory(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target and not target.exists()
        (tmp / "a.txt").write_text("one")
    assert (target / "a.txt").read_text() == "one"
    with atomic_directory(target) as tmp:
        (tmp / "b.txt").write_text("two")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert _siblings(target) == ["ckpt"]  # no temporary or old directories left


def test_atomic_directory_without_exchange_support(tmp_path, monkeypatch):
    """The rename-away / rename-in fallback (file systems without renameat2 exchange)."""
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    target = tmp_path / "c"
    for text in ("one", "two"):
        with atomic_directory(target) as tmp:
            (tmp / "f").write_text(text)
    assert (target / "f").read_text() == "two" and _siblings(target) == ["c"]


def test_atomic_directory_refuses_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match="is not a directory"):
        with atomic_directory(tmp_path / "f"):
            pass


def test_atomic_write_and_write_json(tmp_path, monkeypatch):
    target = tmp_path / "report.json"
    write_json(target, {"a": 1, "p": Path("x")})
    assert json.loads(target.read_text()) == {"a": 1, "p": "x"} and _siblings(target) == ["report.json"]

    def crash(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, crash)
    assert json.loads(target.read_text()) == {"a": 1, "p": "x"}  # the old file survives
    assert _siblings(target) == ["report.json"]  # and no temporary is left


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_swap_cut_between_its_renames_is_completed_and_dead_writers_temporaries_found(tmp_path):
    """A kill between the fallback's two renames leaves no `ckpt` but a complete `.ckpt.tmp-*` beside the old
    `.ckpt.old-*`: the new one is put in place. A live writer's temporaries are left alone."""
    pid = _dead_pid()
    for kind in ("old", "tmp"):
        (tmp_path / f".ckpt.{kind}-{pid}-00000001").mkdir()
        (tmp_path / f".ckpt.{kind}-{pid}-00000001" / "which").write_text(kind)
    (tmp_path / f".other.tmp-{os.getpid()}-00000002").mkdir()  # this process's: a live writer
    (tmp_path / f".report.json.tmp-{pid}-00000003").write_text("{")  # a killed atomic_write
    assert finish_interrupted_swaps(tmp_path) == [tmp_path / "ckpt"]
    assert (tmp_path / "ckpt" / "which").read_text() == "tmp"
    assert stale_temporaries(tmp_path) == [tmp_path / f".ckpt.old-{pid}-00000001",
                                           tmp_path / f".report.json.tmp-{pid}-00000003"]  # fmt: skip


@pytest.mark.parametrize(
    "error, full",
    [
        (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"), False),
        (OSError(errno.ENOSPC, "No space left on device"), True),
        (PermissionError(errno.EACCES, "Permission denied"), False),
    ],
)
def test_write_failures_become_one_line(tmp_path, monkeypatch, error, full):
    """torch says a full disk only as an inline_container error: the free space decides (here plenty is free)."""
    with pytest.raises(OSError) as info:
        with explain_write_errors(tmp_path / "x", "the thing", lambda: 1000):
            raise error
    text = str(info.value)
    assert "\n" not in text and str(tmp_path / "x") in text and info.value.__cause__ is error
    if full:
        assert text.startswith("disk full while writing the thing") and info.value.errno == errno.ENOSPC
    else:
        assert text.startswith("could not write the thing to")
        assert (getattr(error, "strerror", None) or "unexpected pos") in text
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda p: SimpleNamespace(free=1))  # 1 B free
    with pytest.raises(OSError, match=r"disk full while writing the thing .* it needs about 1.0 KB and 1 B is free"):
        with explain_write_errors(tmp_path / "x", "the thing", lambda: 1000):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    with pytest.raises(KeyError):  # not a write failure: unchanged
        with explain_write_errors(tmp_path / "x", "the thing"):
            raise KeyError("x")
