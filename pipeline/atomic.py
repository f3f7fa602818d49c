"""Stage outputs that a kill cannot leave half-written.

Every file a stage writes goes to a temporary name beside its destination and is renamed over it
only once complete (``rename`` is atomic on one file system); a stage that writes a whole folder
builds it beside the old one and swaps the two in one step. A process killed at any moment leaves
either the old complete output or the new complete one, plus at most a temporary entry whose name
says what it is, removed by the next run.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_TMP_MARK = ".tmp-"
_OLD_MARK = ".old-"
_RENAME_EXCHANGE = 2  # renameat2() flag of Linux: swap two paths atomically
_AT_FDCWD = -100


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without error the file written
    there replaces ``path`` in one rename, otherwise it is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}{_TMP_MARK}", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, document: Any) -> None:
    """Write ``document`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(document, indent=2) + "\n")


def _libc_renameat2() -> Any | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        function = ctypes.CDLL(name, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return function


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False
    where the system or file system cannot, and nothing was changed."""
    function = _libc_renameat2()
    if function is None:
        return False
    result = function(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return result == 0


def clean_leftovers(folder: Path) -> None:
    """Remove the temporary entries an interrupted run left beside ``folder``."""
    parent = folder.parent
    if not parent.is_dir():
        return
    for entry in parent.glob(f".{folder.name}{_TMP_MARK}*"):
        shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
    old = sorted(parent.glob(f".{folder.name}{_OLD_MARK}*"))
    if old and not folder.exists():
        # killed between the two renames of the fallback swap: the old output is the complete one
        os.replace(old[-1], folder)
        old = old[:-1]
    for entry in old:
        shutil.rmtree(entry, ignore_errors=True)


@contextmanager
def atomic_dir(folder: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``folder``; when the block ends without error it
    takes ``folder``'s place in one step (the old contents are then removed), otherwise it is
    removed and ``folder`` is untouched."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}{_TMP_MARK}", dir=folder.parent))
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())
        _swap_in(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(new: Path, folder: Path) -> None:
    """Put ``new`` where ``folder`` is; afterwards ``new`` holds the old contents (or nothing)."""
    if not folder.exists():
        os.replace(new, folder)
    elif folder.is_dir() and exchange(new, folder):
        pass
    else:
        # Without an atomic exchange: two renames. A kill between them leaves the old output under
        # a marked name, which clean_leftovers() puts back before anything else reads the folder.
        old = Path(tempfile.mkdtemp(prefix=f".{folder.name}{_OLD_MARK}", dir=folder.parent))
        old.rmdir()
        os.replace(folder, old)
        os.replace(new, folder)
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(folder.parent)
