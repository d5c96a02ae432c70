"""engine.atomic: directories and files replaced in one rename, nothing left behind on success or failure."""

import json
from pathlib import Path

import pytest

from engine import atomic
from engine.atomic import atomic_directory, atomic_write, write_json


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
