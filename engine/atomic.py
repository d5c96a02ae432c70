"""Atomic writes: one file or one whole directory replaced in a single rename, flushed to disk first.

Every file this engine writes that a crash must not leave half-written goes through here: checkpoints and saved
models (`atomic_directory`), reports and run records (`write_json`), and token caches (`atomic_write`). After a
crash the target holds either its previous contents or the complete new ones.

A directory is built in a hidden sibling `.NAME.tmp-<pid>-<tag>` (a file in `.NAME.tmp-<pid>-<tag>` too). After a
`kill -9`, `finish_interrupted_swaps` completes a replacement cut between its two renames (file systems without an
atomic exchange) and `stale_temporaries` finds the temporaries that a dead process left behind. `explain_write_errors`
turns the many shapes of a failed write (OSError, torch's `inline_container` RuntimeError, safetensors'
SafetensorError) into one OSError that says what was written where, and for a full disk how much space it needs.
"""

import contextlib
import ctypes
import ctypes.util
import errno
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO


def _tag() -> str:
    """`<pid>-<8 hex>`: the pid tells a dead writer's leftovers from a live one's."""
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}"


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
    tag = _tag()
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
    tmp = path.parent / f".{path.name}.tmp-{_tag()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
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


# ---- after a crash ---------------------------------------------------------------------------------------------------

_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old|replaced)-(?P<pid>\d+)-(?P<id>[0-9a-f]{8})$")


def process_alive(pid: int) -> bool:
    """Whether `pid` is a running process (a zombie, killed but not yet reaped, counts as dead)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] != "Z"
    except OSError:
        return True


def temporaries(folder: str | Path, kinds=("tmp", "old"), own: bool = False) -> list[tuple[Path, re.Match]]:
    """Hidden `.NAME.<kind>-<pid>-<id>` entries of `folder` whose writer is dead (or, with `own`, this process),
    with their parsed names."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in sorted(folder.iterdir()):
        m = _TEMPORARY.match(p.name)
        if m and m["kind"] in kinds:
            pid = int(m["pid"])
            if (own and pid == os.getpid()) or not process_alive(pid):
                found.append((p, m))
    return found


def finish_interrupted_swaps(folder: str | Path) -> list[Path]:
    """Complete the replacements in `folder` that a dead process left between its two renames.

    Without an atomic exchange, `atomic_directory` renames `NAME` to `.NAME.old-<tag>` and then the finished
    `.NAME.tmp-<tag>` to `NAME`; a crash between the two leaves no `NAME`. The old one is renamed away only once the
    new one is complete and flushed, so the new one is put in place (the old one where the new one is missing).

    Returns:
        the paths put back.
    """
    done = []
    for old, m in temporaries(folder, kinds=("old",)):
        target = old.parent / m["name"]
        if target.exists():
            continue
        new = old.parent / f".{m['name']}.tmp-{m['pid']}-{m['id']}"
        os.rename(new if new.is_dir() else old, target)
        _fsync(old.parent)
        done.append(target)
    return done


def stale_temporaries(folder: str | Path) -> list[Path]:
    """The temporary files and directories in `folder` that a killed writer left (each can be a whole checkpoint).

    Call `finish_interrupted_swaps` first: it may still need one of them.
    """
    return [p for p, _ in temporaries(folder)]


def remove(path: Path) -> None:
    """Delete a file or a directory tree."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def tensor_bytes(obj) -> int:
    """Bytes of all tensors in a nested dict/list (what saving `obj` writes, near enough)."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _is_write_failure(e: BaseException) -> bool:
    return (
        isinstance(e, OSError)
        or (isinstance(e, RuntimeError) and ("inline_container" in str(e) or "write failed" in str(e)))
        or type(e).__name__ == "SafetensorError"
    )


@contextlib.contextmanager
def explain_write_errors(path: str | Path, what: str, needed: Callable[[], int] | None = None) -> Iterator[None]:
    """Re-raise a failed write inside the block as one OSError that names `what` and `path`.

    A full disk (ENOSPC, "No space left" in a library's message, or less free space than `needed()` bytes) says
    how much space the write needs and how much is free; torch reports a full disk only as an `inline_container`
    RuntimeError ("unexpected pos …"), safetensors as a SafetensorError. Other exceptions pass through unchanged.
    """
    try:
        yield
    except BaseException as e:
        if not _is_write_failure(e) or getattr(e, "explained", False):  # an inner block said it already
            raise
        path = Path(path)
        folder = next((p for p in (path, *path.parents) if p.exists()), Path("."))
        free = shutil.disk_usage(folder).free
        need = needed() if needed is not None else 0
        text = " ".join(str(e).split())
        full = getattr(e, "errno", None) == errno.ENOSPC or "No space left" in text or "StorageFull" in text
        if full or (need and free < need):
            need_text = f"about {_size(need)}" if need else "more space"
            err = OSError(
                f"disk full while writing {what} to {path}: it needs {need_text} and {_size(free)} is free there; "
                "free some space (or choose another --out) and run again with --resume"
            )
            err.errno = errno.ENOSPC
        else:
            err = OSError(f"could not write {what} to {path}: {text}")
            err.errno = getattr(e, "errno", None) or errno.EIO
        err.explained = True
        raise err from e
