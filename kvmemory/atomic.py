"""Files written whole or not at all: a temporary name in the same folder, fsync, rename."""

from __future__ import annotations

import contextlib
import os
import uuid


def fsync_dir(path: str) -> None:
    """Make a rename inside ``path`` durable (best effort: some file systems refuse)."""
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


@contextlib.contextmanager
def atomic_open(path, mode: str = "wb"):
    """Open a file that replaces ``path`` only when the block ends without an exception.

    The data goes to ``<path>.tmp-<pid>-<random>`` beside it, is fsynced, and is
    renamed over ``path``; on an exception the temporary file is removed and
    ``path`` is untouched, so a crash never leaves a half-written file under it.
    """
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fsync_dir(os.path.dirname(os.path.abspath(path)))
