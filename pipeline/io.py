"""Atomic writes: a stage's outputs appear whole or not at all, so a killed stage never leaves
a half-written file that DVC or the next stage would take for a result."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file ordinary permissions
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete what a killed :func:`atomic_directory` write of ``path`` left beside it; return what was removed.

    A kill (SIGKILL, power loss) skips the cleanup of the ``with`` block, so ``.<name>.<random>.tmp/``
    (and ``.<name>.old/`` when the kill fell between the two renames) would stay forever. Only names of
    exactly that form are touched, so outputs whose names extend ``path``'s (``distill_0.5`` and
    ``distill_0.55``) never remove each other's files.
    """
    path = Path(path)
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(?:[a-z0-9_]{{8}}\.tmp|old)$")
    removed = []
    if path.parent.is_dir():
        for leftover in path.parent.iterdir():
            if pattern.match(leftover.name) and leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
                removed.append(leftover)
    return removed


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``path`` in one rename.

    On an exception the temporary directory is removed and ``path`` is left as it was; what an
    earlier, killed write of ``path`` left behind is removed first (:func:`remove_stale_temporaries`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
