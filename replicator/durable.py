"""Writing files that must survive a crash: the few primitives every state file shares.

`write_atomic` is the one way a small state file is replaced (temp file, fsync, rename,
fsync of the directory): a reader finds the old file or the new one, never half of one,
and after `write_atomic` returns the new one survives a power cut. `fsync_dir` makes
names durable; `pwrite_all` finishes a write that the kernel took only in part.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    """Makes the names in `directory` (created, renamed, removed) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """Writes all of `data` at `offset`; raises OSError as os.pwrite does."""
    n = os.pwrite(fd, data, offset)
    if n == len(data):
        return  # almost always: a file write is short only on a signal or a full disk
    view = memoryview(data)[n:]
    offset += n
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replaces `path` with `data`, durably and all at once (see the module doc). The
    file gets exactly `mode`, whatever the umask. Raises OSError; the temp file is then
    removed and `path` is as it was."""
    directory = path.parent
    tmp = directory / f".{path.name}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        try:
            os.fchmod(fd, mode)
            pwrite_all(fd, data, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(directory)
