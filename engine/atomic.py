"""Atomic writes: one file or one whole directory replaced in a single rename, flushed to disk first.

Every file this engine writes that a crash must not leave half-written goes through here: checkpoints and saved
models (`atomic_directory`), reports and run records (`write_json`), and token caches (`atomic_write`). After a
crash the target holds either its previous contents or the complete new ones.

A directory is built in a hidden sibling `.NAME.tmp-<pid>-<tag>`; `stale_temporaries` finds the ones a killed
process left behind.
"""

import contextlib
import ctypes
import ctypes.util
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux renameat2(RENAME_EXCHANGE); False where that is unavailable.

    With it, `path` always names a complete checkpoint, even for a crash between the two renames that a plain
    rename-away/rename-in needs (see `man 2 rename`).
    """
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    rc = renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE)
    return rc == 0  # EINVAL on file systems without exchange support: fall back


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Build a directory atomically: yields an empty temporary sibling to fill; on success it replaces `path`.

    Files are fsynced before the swap and the parent directory after it, so after a crash `path` holds either its
    previous contents or the complete new ones. An existing `path` is swapped out (atomically where the OS
    allows, else renamed away first) and deleted. On an exception inside the block the temporary directory is
    removed and `path` is untouched.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} exists and is not a directory: remove it or choose another output path")
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = path.parent / f".{path.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        for root, _, files in os.walk(tmp):
            for name in files:
                _fsync(Path(root) / name)
            _fsync(Path(root))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        if not _exchange(tmp, path):
            old = path.parent / f".{path.name}.old-{tag}"
            os.rename(path, old)
            os.rename(tmp, path)
            tmp = old
        _fsync(path.parent)
        shutil.rmtree(tmp, ignore_errors=True)  # now the old checkpoint
    else:
        os.rename(tmp, path)
        _fsync(path.parent)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write a file atomically: `write(f)` fills a temporary sibling, which is fsynced and renamed onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync(path.parent)
    return path


def write_json(path: str | Path, obj) -> Path:
    """`obj` as indented JSON, written atomically."""
    data = (json.dumps(obj, indent=2, default=str) + "\n").encode()
    return atomic_write(path, lambda f: f.write(data))
