"""Files written whole or not at all, and named by their content."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import IO, Callable


def atomic_write(target: Path, write: Callable[[IO[bytes]], object], *, durable: bool = True) -> None:
    """Write via a temp file and rename: a reader (another client, a restarted server)
    sees the old file or the new one, never half of one, even if the writer is killed.
    ``durable``: synced to disk before and after the rename, so that holds after a power
    cut too (what a simulation, with no power to lose, can skip)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        _sync_dir(target.parent)


def _sync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (where the platform can)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def file_sha256(path: Path) -> str:
    """The file's sha256: exports and enrolments name the model they were made with by it."""
    return hashlib.sha256(path.read_bytes()).hexdigest()
