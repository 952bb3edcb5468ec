"""Walk a dataset's tree: every entry below the root with its lstat, parents first.

Blocking; the agent runs it in a worker thread. It is how changes are found at start, after
a reconnect, after the watcher lost events and on periodic rescans, so it must be cheap
and must never step outside the dataset:

- Symlinks are never followed. Each directory is opened with O_NOFOLLOW and its identity
  (st_dev, st_ino) is checked against the lstat that was reported for it, so a directory
  swapped for a symlink (or for another directory) between listing and descending is not
  walked: its listing could describe a tree outside the dataset.
- Entries are read with os.scandir on the directory's fd; the d_type that scandir caches
  decides exclusion before any stat, then `entry.stat(follow_symlinks=False)` is one
  fstatat per entry. Each directory is listed completely (and closed) before its entries
  are handed out, so at most one directory fd is open at a time.
- With `one_file_system`, a mount point is reported (as the directory it is) but not
  descended into, like `find -xdev`.
- Entries that vanish during the walk are skipped: the watcher reports their removal.
  A directory that cannot be read (EACCES) is logged once per process and skipped.
- Names that are not valid UTF-8 come out through surrogateescape (os.fsdecode).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from replicator.agent.excludes import Excludes

log = logging.getLogger(__name__)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# Errors that mean "it is gone or is no longer a directory": skipped silently.
_VANISHED = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ESTALE})
# Unreadable directories are warned about once per process; the set is capped so that a
# tree with millions of them cannot grow it without bound.
_MAX_WARNED = 10_000
_warned: set[tuple[str, str]] = set()

Entry = tuple[str, os.stat_result]


def scan(
    root: str | Path, excludes: Excludes, *, one_file_system: bool = True
) -> Iterator[Entry]:
    """Every entry below `root` (not root itself) as (relative '/'-separated path, lstat).

    Parents come before their children. Excluded entries are skipped and excluded
    directories are not descended into. Raises OSError (on the first iteration) if `root`
    itself cannot be opened.
    """
    return scan_subtree(root, "", excludes, one_file_system=one_file_system)


def scan_subtree(
    root: str | Path, relpath: str, excludes: Excludes, *, one_file_system: bool = True
) -> Iterator[Entry]:
    """As `scan`, but only the entries below the directory `relpath` (not relpath itself).

    Yields nothing if `relpath` is missing, not a directory (a symlink to one included),
    excluded, or on another file system than root when `one_file_system` is set. Lazy: the
    root is opened (and OSError raised for it) on the first iteration.
    """
    root_s = os.fspath(root)
    relpath = relpath.strip("/")
    fd = os.open(root_s, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        root_dev = os.fstat(fd).st_dev
        if relpath and excludes.match(relpath, True):
            return
        for part in relpath.split("/") if relpath else ():
            if part in (".", ".."):
                raise ValueError(f"not a relative path below the root: {relpath!r}")
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in _VANISHED:
                    return
                if exc.errno == errno.EACCES:
                    _warn_unreadable(root_s, relpath, exc)
                    return
                raise
            os.close(fd)
            fd = child
        st = os.fstat(fd)
        if one_file_system and st.st_dev != root_dev:
            return
        # _walk owns the fd from here on
        first_fd, fd = fd, -1
        yield from _walk(
            root_s, first_fd, (relpath, st.st_dev, st.st_ino), root_dev, excludes, one_file_system
        )
    finally:
        if fd != -1:
            os.close(fd)


def _walk(
    root: str,
    first_fd: int,
    start: tuple[str, int, int],
    root_dev: int,
    excludes: Excludes,
    one_file_system: bool,
) -> Iterator[Entry]:
    # Depth first with an explicit stack of directories still to list, each with the
    # identity it had when it was reported.
    stack: list[tuple[str, int, int]] = [start]
    fd: int | None = first_fd
    try:
        while stack:
            rel, dev, ino = stack.pop()
            if fd is None:
                fd = _open_checked(root, rel, dev, ino)
                if fd is None:
                    continue
            try:
                entries = _list(root, fd, rel, excludes)
            finally:
                os.close(fd)
                fd = None
            subdirs: list[tuple[str, int, int]] = []
            for child_rel, st in entries:
                yield child_rel, st
                if stat.S_ISDIR(st.st_mode) and not (one_file_system and st.st_dev != root_dev):
                    subdirs.append((child_rel, st.st_dev, st.st_ino))
            # reversed, so that the stack pops them in name order
            stack.extend(reversed(subdirs))
    finally:
        if fd is not None:
            os.close(fd)


def _open_checked(root: str, rel: str, dev: int, ino: int) -> int | None:
    """Open directory `rel` without following a final symlink; None if it is not (any
    more) the directory that was reported."""
    try:
        fd = os.open(os.path.join(root, rel), _DIR_FLAGS)
    except OSError as exc:
        if exc.errno in _VANISHED:
            return None
        if exc.errno == errno.EACCES:
            _warn_unreadable(root, rel, exc)
            return None
        raise
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != (dev, ino):
        # replaced since it was listed (or reached through a swapped-in symlink higher
        # up): the new one is reported by the watcher or the next scan
        os.close(fd)
        return None
    return fd


def _list(root: str, fd: int, rel: str, excludes: Excludes) -> list[Entry]:
    """The entries of the open directory `fd`, sorted by name, excluded ones left out."""
    prefix = f"{rel}/" if rel else ""
    out: list[Entry] = []
    try:
        with os.scandir(fd) as it:
            for entry in it:
                child = prefix + entry.name
                try:
                    is_dir = entry.is_dir(follow_symlinks=False)
                except OSError:
                    continue
                if excludes.match_entry(child, is_dir):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError as exc:
                    if exc.errno in _VANISHED:
                        continue
                    raise
                # d_type may have said otherwise (a race, an unusual file system): the
                # directory rules apply to what lstat says
                if not is_dir and stat.S_ISDIR(st.st_mode) and excludes.match_entry(child, True):
                    continue
                out.append((child, st))
    except OSError as exc:
        if exc.errno in _VANISHED:
            return out
        if exc.errno == errno.EACCES:
            _warn_unreadable(root, rel, exc)
            return out
        raise
    out.sort(key=lambda e: e[0])
    return out


def _warn_unreadable(root: str, rel: str, exc: OSError) -> None:
    key = (root, rel)
    if key in _warned:
        log.debug("scan skipped unreadable directory root=%s path=%s", root, rel or ".")
        return
    if len(_warned) < _MAX_WARNED:
        _warned.add(key)
    log.warning(
        "scan cannot read directory, skipped root=%s path=%s error=%s",
        root,
        rel or ".",
        exc.strerror or exc,
    )
