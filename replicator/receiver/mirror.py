"""Safe file-system operations inside one dataset's mirror.

Everything the agent sends is untrusted, and the mirror itself holds the primary's
symlinks verbatim: a replicated `a -> /etc` must never turn a later `a/passwd` into
/etc/passwd. So:

- Every path is checked by `split_relpath`, then resolved from an fd of the mirror root one
  component at a time with O_DIRECTORY|O_NOFOLLOW. A symlink (or any non-directory) where a
  directory is needed is refused with PathRefused, never followed. Missing parents are
  created (mode 0o755) by the operations that write.
- The last component is operated on by name relative to its parent's fd, with
  follow_symlinks=False / O_NOFOLLOW; directories are removed with an fd-based walk that
  unlinks symlinks rather than entering them.
- New content is staged in `staging_dir` (on the same file system) and renamed into place,
  so a reader sees the old file or the new one, never a mix. Symlinks are made there too,
  then renamed: a crash never leaves a temporary name inside the mirror. The one
  exception is `open_patch`, for the applier's in-place patches of big files (applier.py).
- Resolving every component for every file is most of the cost of a small file, so the
  fds of recently used parent directories are cached by their relative path. A cached fd
  is only ever a directory reached by the walk above, and the cache is emptied by every
  operation that can remove, replace or move a directory (delete, rename, and an install
  or symlink that replaced a directory), so a path never resolves to a stale directory.
  A path whose parent is cached is resolved without splitting it again: the parent was
  checked when it was cached, so only the last component is checked (anything in doubt
  takes the full check, which says what is wrong). Operations use the cached fd itself
  and never hold it across a call that may close it.
- Names go to the kernel as bytes (UTF-8 with surrogateescape, as on the wire), so the name
  on disk is exactly the one the primary has, whatever the locale.

One writer per dataset (its applier) is assumed: a check such as "is a directory there?"
followed by an action is not atomic against other writers. Path safety does not depend on
that assumption, because resolution never follows a symlink whatever appears meanwhile.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
import os
import secrets
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType

from replicator.core.paths import (
    MAX_NAME_BYTES,
    MAX_PATH_BYTES,
    decode_name,
    encode_name,
    quote_path,
    split_relpath,
)
from replicator.core.records import Attrs
from replicator.errors import ConfigError, PathRefused, ProtocolError
from replicator.receiver.syscalls import Calls

DIR_MODE = 0o755            # directories created for missing parents
STAGING_DIR_MODE = 0o700    # staged files may hold data not yet meant to be visible
STAGED_FILE_MODE = 0o600
STAGED_PREFIX = ".staged-"
# Staged by the session as a big new file arrives: `.incoming-<lsn>-<random>`. Another prefix
# than the applier's, because the applier's own leftovers are always garbage at start-up,
# while an incoming file may be needed by a journaled record not yet applied.
INCOMING_PREFIX = ".incoming-"
COPY_CHUNK = 1 << 20        # read/write fallback when copy_file_range is unavailable
MAX_XATTR_VALUE = 65536     # XATTR_SIZE_MAX on Linux
MAX_ID = 2**32 - 2          # (uid_t)-1 means "leave unchanged" to chown: not a real id
_NS_LIMIT = 2**63           # utimensat's time_t seconds, with room: an int64 of nanoseconds

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO that somehow sits in the mirror must not hang the applier.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_PATCH_FLAGS = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_NOT_SUPPORTED = frozenset({errno.ENOTSUP, errno.EOPNOTSUPP})
# copy_file_range refuses some pairs of files (old kernels, special files): use read/write.
_NO_COPY_RANGE = frozenset({errno.EXDEV, errno.ENOSYS, errno.EINVAL, *_NOT_SUPPORTED})


def _load_syncfs() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    fn = getattr(libc, "syncfs", None)
    if fn is None:
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


_SYNCFS = _load_syncfs()
DIR_CACHE_SIZE = 64         # parent directory fds kept open per mirror
_SYNC_FILE_RANGE_WRITE = 2  # start write-back of dirty pages, do not wait


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), "sync_file_range", None)
    except OSError:
        return None
    if fn is None:
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


_SYNC_FILE_RANGE = _load_sync_file_range()


def start_writeback(fd: int) -> None:
    """Start writing `fd`'s dirty pages to disk without waiting (sync_file_range WRITE).

    Only a head start for a later fdatasync, which is still what makes data durable: a
    staged file written at network speed then leaves little for that fdatasync to do,
    and the kernel never throttles the writer for a gigabyte of dirty pages. Errors are
    ignored here; fdatasync reports them.
    """
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


class Mirror:
    """Safe operations inside one dataset's mirror root; every path is relative.

    Paths are wire paths (see replicator.core.paths); a hostile one, or one that would pass
    through a symlink or a non-directory in the mirror, raises PathRefused and changes
    nothing. Not thread-safe: one caller at a time.
    """

    def __init__(self, root: Path, staging_dir: Path, calls: Calls | None = None) -> None:
        self.root = Path(os.path.abspath(root))
        # what new files are made, written, finished and installed with (see syscalls);
        # the applier writes and closes the staged files it gets through it too
        self.calls = calls or Calls()
        self.staging_dir = Path(os.path.abspath(staging_dir))
        self._staging_prefix = os.fsencode(self.staging_dir)
        self._staging_str = os.fsdecode(self._staging_prefix + b"/")  # staged paths start so
        _makedirs(self.root, DIR_MODE)
        _makedirs(self.staging_dir, STAGING_DIR_MODE)
        self._root_fd = -1
        self._staging_fd = -1
        self._is_root = os.geteuid() == 0
        # relative parent path -> (its O_DIRECTORY fd, its length in bytes + 1 for the '/'),
        # least recently used first
        self._dirs: dict[str, tuple[int, int]] = {}
        # staged names: random per instance, then a counter (O_EXCL still decides)
        self._stage_prefix = b"%s%s-" % (STAGED_PREFIX.encode(), secrets.token_hex(4).encode())
        self._stage_seq = itertools.count()
        try:
            # The root itself comes from configuration, not the wire: it may be a symlink.
            self._root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            self._staging_fd = os.open(
                self.staging_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
            )
            if os.fstat(self._root_fd).st_dev != os.fstat(self._staging_fd).st_dev:
                raise ConfigError(
                    "state_dir and mirror_root must be on one file system: staged files "
                    f"are renamed into place (mirror {self.root}, staging {self.staging_dir})"
                )
            # What a file new_staged makes starts with, so that set_attrs_fd(fresh=True)
            # skips what is already so: no xattrs where the staging dir has none (a default
            # ACL is what it would pass on), and our own uid and gid (unless the staging dir
            # is set-group-ID: the receiver makes it without, and nobody else writes there).
            self._fresh_bare = not _xattr_names(self._staging_fd)
            self._fresh_owner: tuple[int, int] | None = None
            if not os.fstat(self._staging_fd).st_mode & stat.S_ISGID:
                self._fresh_owner = (os.geteuid(), os.getegid())
            self._fresh = -1  # the fd the last new_staged made
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close the root and staging fds. Safe to call twice."""
        self._forget_dirs()
        for fd in (self._root_fd, self._staging_fd):
            if fd >= 0:
                os.close(fd)
        self._root_fd = self._staging_fd = -1

    def __enter__(self) -> Mirror:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- reading ------------------------------------------------------------------------

    def lstat(self, path: str) -> os.stat_result | None:
        """The entry at `path`, not following a final symlink; None if it or a parent is missing."""
        try:
            dfd, name = self._parent(path, create=False)
        except FileNotFoundError:
            return None
        return _lstat_at(dfd, name)

    def open_read(self, path: str) -> int:
        """An O_RDONLY fd of the regular file at `path`; the caller closes it.

        FileNotFoundError if missing; PathRefused if it is a symlink or not a regular file.
        """
        return self._open_regular(path)

    def open_patch(self, path: str) -> int | None:
        """An O_RDWR fd of the regular file at `path`, to patch it in place; the caller
        closes it. None if the file has other hard links (a keep link, say), which an
        in-place write would change too.

        FileNotFoundError if missing; PathRefused if it is a symlink or not a regular file.
        """
        fd = self._open_regular(path, _PATCH_FLAGS)
        if os.fstat(fd).st_nlink != 1:
            os.close(fd)
            return None
        return fd

    def walk(self) -> Iterator[tuple[str, os.stat_result]]:
        """Every entry below the root as (relative path, lstat), parents before children.

        Names are sorted (by their bytes) within a directory; symlinks are reported, never
        entered. Entries that vanish during the walk are skipped.
        """
        stack: list[tuple[int, str, list[bytes]]] = []
        fd = os.dup(self._root_fd)
        try:
            names: list[bytes] = []
            stack.append((fd, "", names))
            names.extend(sorted(os.fsencode(n) for n in os.listdir(fd))[::-1])
            while stack:
                dfd, prefix, names = stack[-1]
                if not names:
                    stack.pop()
                    os.close(dfd)
                    continue
                raw = names.pop()
                st = _lstat_at(dfd, raw)
                if st is None:
                    continue
                rel = prefix + decode_name(raw)
                yield rel, st
                if stat.S_ISDIR(st.st_mode):
                    child = os.open(raw, _DIR_FLAGS, dir_fd=dfd)
                    names = []
                    stack.append((child, rel + "/", names))
                    names.extend(sorted(os.fsencode(n) for n in os.listdir(child))[::-1])
        finally:
            for dfd, _, _ in stack:
                os.close(dfd)

    # -- staging ------------------------------------------------------------------------

    def new_staged(self) -> tuple[int, str]:
        """A new empty file in the staging dir, open O_RDWR: (fd, absolute staged path)."""
        while True:
            name = self._staged_name()
            try:
                fd = self.calls.open_at(
                    self._staging_fd, name,
                    os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                    STAGED_FILE_MODE)
            except FileExistsError:
                continue
            self._fresh = fd
            return fd, self._staging_str + name.decode("ascii")  # names are ASCII

    def stage_copy(self, path: str) -> tuple[int, str]:
        """Like new_staged, but starting as a copy of the regular file at `path`.

        The copy keeps the source's holes and extended attributes (a record that leaves
        xattrs alone must not lose them to the new inode). FileNotFoundError if missing;
        PathRefused if it is a symlink or not a regular file.
        """
        src = self._open_regular(path)
        try:
            size = os.fstat(src).st_size
            fd, staged = self.new_staged()
            try:
                _copy_data(src, fd, size)
                _copy_xattrs(src, fd)
            except BaseException:
                os.close(fd)
                self.discard_staged(staged)
                raise
            return fd, staged
        finally:
            os.close(src)

    def new_incoming(self, lsn: int) -> tuple[int, str]:
        """A new empty file in the staging dir for record `lsn`, open O_RDWR: (fd, path).

        Thread-safe against the other staging-dir calls (it only creates a fresh name), so
        the session may call it while the applier works.
        """
        while True:
            name = b"%s%d-%s" % (INCOMING_PREFIX.encode(), lsn, secrets.token_hex(8).encode())
            try:
                fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                             | os.O_CLOEXEC, STAGED_FILE_MODE, dir_fd=self._staging_fd)
            except FileExistsError:
                continue
            return fd, os.fsdecode(self._staging_prefix + b"/" + name)

    def incoming_path(self, name: bytes) -> str:
        """The staged path of an incoming file's base name (as journaled); ValueError if
        `name` is not one new_incoming could have made."""
        if _incoming_lsn(name) is None:
            raise ValueError(f"not an incoming file name: {name!r}")
        return os.fsdecode(self._staging_prefix + b"/" + name)

    def open_incoming(self, name: bytes) -> int:
        """An O_RDWR fd of the incoming file `name`; FileNotFoundError if it is gone."""
        self.incoming_path(name)
        return os.open(name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._staging_fd)

    def incoming_files(self) -> list[tuple[int, str]]:
        """Every incoming file in the staging dir as (its record's LSN, staged path)."""
        out = []
        for raw in os.listdir(self._staging_fd):
            name = os.fsencode(raw)
            lsn = _incoming_lsn(name)
            if lsn is not None:
                out.append((lsn, os.fsdecode(self._staging_prefix + b"/" + name)))
        return out

    def sync_staging(self) -> None:
        """Make the staging dir's names durable (fsync of the directory)."""
        os.fsync(self._staging_fd)

    def discard_staged(self, staged: str) -> None:
        """Remove a staged file (a path new_staged or stage_copy returned). Missing is fine."""
        _unlink_missing_ok(self._staging_fd, self._staged_basename(staged))

    # -- writing ------------------------------------------------------------------------

    def install(self, staged: str, path: str) -> bool:
        """Rename the staged file to `path` atomically, replacing what is there.

        A directory at `path` is removed recursively first (rename cannot replace a
        directory with a file); True if one was. Missing parents are created, never
        through a symlink.
        """
        src = self._staged_basename(staged)
        dfd, name = self._parent(path, create=True)
        try:
            self.calls.rename_at(self._staging_fd, src, dfd, name)
        except IsADirectoryError:
            # rare: look before leaping would cost every install an lstat
            try:
                _remove_dir_at(dfd, name)
                os.rename(src, name, src_dir_fd=self._staging_fd, dst_dir_fd=dfd)
            finally:
                self._forget_dirs()  # closes dfd too: it is not used after this
            return True
        return False

    def mkdir(self, path: str, attrs: Attrs) -> None:
        """Make `path` a directory with `attrs`: kept if one is there, else replacing what is."""
        _check_attrs(attrs)
        dfd, name = self._parent(path, create=True)
        st = _lstat_at(dfd, name)
        if st is not None and not stat.S_ISDIR(st.st_mode):
            os.unlink(name, dir_fd=dfd)
            st = None
        if st is None:
            os.mkdir(name, DIR_MODE, dir_fd=dfd)
        self._set_attrs_at(dfd, name, attrs)

    def symlink(self, path: str, target: str, attrs: Attrs) -> None:
        """Make `path` a symlink to `target` (stored verbatim, never followed), atomically.

        The link is made and given its owner, xattrs and mtime in the staging dir, then
        renamed over whatever is at `path` (a directory there is removed first).
        """
        raw_target = _check_target(target, path)
        _check_attrs(attrs)
        dfd, name = self._parent(path, create=True)
        while True:
            tmp = self._staged_name()
            try:
                os.symlink(raw_target, tmp, dir_fd=self._staging_fd)
            except FileExistsError:
                continue
            break
        try:
            self._set_attrs_at(self._staging_fd, tmp, attrs)
            replaced_dir = _remove_dir_at(dfd, name)
            os.rename(tmp, name, src_dir_fd=self._staging_fd, dst_dir_fd=dfd)
        except BaseException:
            self._forget_dirs()
            _unlink_missing_ok(self._staging_fd, tmp)
            raise
        if replaced_dir:
            self._forget_dirs()

    def delete(self, path: str) -> None:
        """Remove `path`, recursively if it is a directory; a symlink is unlinked, never
        followed. Missing is fine (a missing parent too)."""
        try:
            dfd, name = self._parent(path, create=False)
        except FileNotFoundError:
            return
        st = _lstat_at(dfd, name)
        if st is None:
            return
        if stat.S_ISDIR(st.st_mode):
            try:
                _rmtree(dfd, name)
            finally:
                self._forget_dirs()
        else:
            _unlink_missing_ok(dfd, name)

    def rename(self, path: str, new_path: str) -> None:
        """Move `path` to `new_path`, replacing what is there (a directory recursively).

        FileNotFoundError if `path` is missing. PathRefused for a move into its own subtree,
        of a directory onto itself, or onto a directory that contains `path` (replacing it
        would destroy the source). A file renamed onto itself is left as it is.
        """
        src = _split(path)
        dst = _split(new_path)
        if len(dst) > len(src) and dst[: len(src)] == src:
            raise PathRefused(
                f"rename refused: {quote_path(new_path)} is inside {quote_path(path)}"
            )
        if len(src) > len(dst) and src[: len(dst)] == dst:
            raise PathRefused(
                f"rename refused: {quote_path(path)} is inside {quote_path(new_path)}, "
                "which it would replace"
            )
        # a copy: resolving the destination's parent may evict it from the cache
        sfd = os.dup(self._parent(path, create=False)[0])
        try:
            return self._rename(sfd, src, dst, path, new_path)
        finally:
            os.close(sfd)
            self._forget_dirs()  # a directory may have moved or gone: no cached path holds

    def _rename(self, sfd: int, src: tuple[bytes, ...], dst: tuple[bytes, ...], path: str,
                new_path: str) -> None:
        sst = _lstat_at(sfd, src[-1])
        if sst is None:
            raise _missing(path)
        if src == dst:
            if stat.S_ISDIR(sst.st_mode):
                raise PathRefused(f"rename refused: directory {quote_path(path)} onto itself")
            return
        dfd, _ = self._parent(new_path, create=True)
        dst_st = _lstat_at(dfd, dst[-1])
        if dst_st is not None:
            if (dst_st.st_dev, dst_st.st_ino) == (sst.st_dev, sst.st_ino):
                # Two hard links to one inode: rename(2) would silently keep both.
                os.unlink(src[-1], dir_fd=sfd)
                return
            if stat.S_ISDIR(dst_st.st_mode):
                _rmtree(dfd, dst[-1])
            elif stat.S_ISDIR(sst.st_mode):
                # rename(2) will not put a directory over a file.
                os.unlink(dst[-1], dir_fd=dfd)
        os.rename(src[-1], dst[-1], src_dir_fd=sfd, dst_dir_fd=dfd)

    def set_attrs(self, path: str, attrs: Attrs) -> None:
        """Set owner (root only), mode (not on symlinks), xattrs, then mtime of `path`.

        Never follows a final symlink. FileNotFoundError if `path` is missing.
        """
        _check_attrs(attrs)
        dfd, name = self._parent(path, create=False)
        self._set_attrs_at(dfd, name, attrs)

    def set_attrs_fd(self, fd: int, attrs: Attrs, *, fresh: bool = False) -> None:
        """set_attrs on an open file (a staged file before install).

        `fresh`: `fd` is the file the last new_staged call made, untouched since but for
        its data (checked: any other fd counts as not fresh). What it has from its making
        (see __init__) is then not set again: the owner when it is ours, no xattrs when the
        record wants none. A syscall or two less for every new file.
        """
        _check_attrs(attrs)
        fresh = fresh and fd == self._fresh
        self._fresh = -1
        if self._is_root and (attrs.uid is not None or attrs.gid is not None) and not (
                fresh and self._fresh_owner is not None
                and attrs.uid in (None, self._fresh_owner[0])
                and attrs.gid in (None, self._fresh_owner[1])):
            os.fchown(fd, _id(attrs.uid), _id(attrs.gid))
        # after a chown, which clears set-ID bits
        self.calls.fchmod(fd, stat.S_IMODE(attrs.mode))
        if attrs.xattrs is not None and (attrs.xattrs or not (fresh and self._fresh_bare)):
            _sync_xattrs(fd, attrs.xattrs, follow=True)
        self.calls.set_mtime(fd, attrs.mtime_ns)

    def sync(self) -> None:
        """Make everything written so far durable: syncfs(2) on the mirror's file system.

        Falls back to sync(2) where syncfs does not exist. A write-back error that syncfs
        reports (EIO, ENOSPC) raises OSError: data thought durable is not.
        """
        if _SYNCFS is not None:
            if _SYNCFS(self._root_fd) == 0:
                return
            err = ctypes.get_errno()
            if err != errno.ENOSYS:
                raise OSError(err, os.strerror(err), str(self.root))
        os.sync()

    # -- internals ----------------------------------------------------------------------

    def _parent(self, path: str, *, create: bool) -> tuple[int, bytes]:
        """(fd of the directory that holds `path`'s last component, that component's bytes).

        The fd is the cache's (or the root's): valid until the next call that resolves a
        path or empties the cache, and never closed by the caller. PathRefused for a path
        that is not safe and canonical; FileNotFoundError (naming `path`) if a parent is
        missing and not `create`.
        """
        parent, slash, leaf = path.rpartition("/")
        if not slash:
            name = _leaf_bytes(leaf, 0)
            if name is not None:
                return self._root_fd, name
        else:
            hit = self._dirs.pop(parent, None)
            if hit is not None:
                self._dirs[parent] = hit  # most recently used last
                name = _leaf_bytes(leaf, hit[1])
                if name is not None:
                    return hit[0], name
        parts = _split(path)  # raises PathRefused, saying why
        if len(parts) == 1:
            return self._root_fd, parts[0]
        cached = self._dirs.get(parent)
        if cached is not None:
            return cached[0], parts[-1]
        fd = os.dup(self._root_fd)
        try:
            for name in parts[:-1]:
                up, fd = fd, -1
                try:
                    fd = _open_child_dir(up, name, path, create=create)
                finally:
                    os.close(up)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise
        if len(self._dirs) >= DIR_CACHE_SIZE:
            os.close(self._dirs.pop(next(iter(self._dirs)))[0])
        self._dirs[parent] = (fd, len(encode_name(parent)) + 1)
        return fd, parts[-1]

    def _forget_dirs(self) -> None:
        """Empty the directory fd cache (a directory may have been removed or moved)."""
        dirs, self._dirs = self._dirs, {}
        for fd, _ in dirs.values():
            os.close(fd)

    def _open_regular(self, path: str, flags: int = _FILE_FLAGS) -> int:
        try:
            dfd, name = self._parent(path, create=False)
        except FileNotFoundError:
            raise _missing(path) from None
        try:
            fd = os.open(name, flags, dir_fd=dfd)
        except FileNotFoundError:
            raise _missing(path) from None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise PathRefused(
                    f"path refused: {quote_path(path)} is a symlink, not a regular file"
                ) from None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise PathRefused(f"path refused: {quote_path(path)} is not a regular file")
        return fd

    def _set_attrs_at(self, dfd: int, name: bytes, attrs: Attrs) -> None:
        # Owner before mode: chown clears set-user-ID and set-group-ID bits.
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        if self._is_root and (attrs.uid is not None or attrs.gid is not None):
            os.chown(name, _id(attrs.uid), _id(attrs.gid), dir_fd=dfd, follow_symlinks=False)
        if not stat.S_ISLNK(st.st_mode):
            _chmod_at(dfd, name, stat.S_IMODE(attrs.mode))
        if attrs.xattrs is not None:
            # The *xattr calls take no dir_fd: name the entry through the parent's fd. The
            # magic link resolves to the already-checked directory; the last component is
            # not followed.
            _sync_xattrs(b"/proc/self/fd/%d/%s" % (dfd, name), attrs.xattrs, follow=False)
        os.utime(name, ns=(attrs.mtime_ns, attrs.mtime_ns), dir_fd=dfd, follow_symlinks=False)

    def _staged_name(self) -> bytes:
        return b"%s%d" % (self._stage_prefix, next(self._stage_seq))

    def _staged_basename(self, staged: str) -> bytes:
        if staged.startswith(self._staging_str):
            name = staged[len(self._staging_str):]
            if name and "/" not in name:
                return os.fsencode(name)
        raise ValueError(f"not in this mirror's staging dir: {staged!r}")


# -- helpers ---------------------------------------------------------------------------


def _incoming_lsn(name: bytes) -> int | None:
    prefix = INCOMING_PREFIX.encode()
    if not name.startswith(prefix) or b"/" in name:
        return None
    lsn, dash, token = name[len(prefix):].partition(b"-")
    if not dash or not lsn.isdigit() or not token.isalnum():
        return None
    return int(lsn)


def _split(path: str) -> tuple[bytes, ...]:
    return tuple(encode_name(part) for part in split_relpath(path))


def _leaf_bytes(leaf: str, prefix_bytes: int) -> bytes | None:
    """The bytes of `leaf` if it is a valid last component of a path whose checked parent
    and '/' take `prefix_bytes` bytes; None when in doubt (split_relpath then says why).
    `leaf` holds no '/': it is what follows a path's last one."""
    if leaf in ("", ".", "..") or "\0" in leaf:
        return None
    try:
        raw = encode_name(leaf)
    except UnicodeEncodeError:
        return None
    if len(raw) > MAX_NAME_BYTES or prefix_bytes + len(raw) > MAX_PATH_BYTES:
        return None
    return raw


def _missing(path: str) -> FileNotFoundError:
    return FileNotFoundError(errno.ENOENT, "not in the mirror", path)


def _makedirs(path: Path, mode: int) -> None:
    try:
        os.makedirs(path, mode)
    except FileExistsError:
        return
    os.chmod(path, mode)  # the umask may have narrowed the mode makedirs asked for


def _open_child_dir(dfd: int, name: bytes, path: str, *, create: bool) -> int:
    try:
        return _open_existing_dir(dfd, name, path)
    except FileNotFoundError:
        if not create:
            raise _missing(path) from None
    # Appeared meanwhile: the open below decides whether it is usable.
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, DIR_MODE, dir_fd=dfd)
    return _open_existing_dir(dfd, name, path)


def _open_existing_dir(dfd: int, name: bytes, path: str) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dfd)
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
    st = _lstat_at(dfd, name)
    kind = "a symlink" if st is not None and stat.S_ISLNK(st.st_mode) else "not a directory"
    raise PathRefused(
        f"path refused: {quote_path(path)}: component {quote_path(decode_name(name))} "
        f"is {kind}; the mirror never resolves through one"
    )


def _lstat_at(dfd: int, name: bytes) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _unlink_missing_ok(dfd: int, name: bytes) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dfd)


def _remove_dir_at(dfd: int, name: bytes) -> bool:
    """Remove `name` if it is a directory (rename cannot put a non-directory over one);
    True if it was one."""
    st = _lstat_at(dfd, name)
    if st is not None and stat.S_ISDIR(st.st_mode):
        _rmtree(dfd, name)
        return True
    return False


def _list_dir(fd: int) -> list[tuple[bytes, bool]]:
    with os.scandir(fd) as it:
        return [(os.fsencode(e.name), e.is_dir(follow_symlinks=False)) for e in it]


def _rmtree(parent_fd: int, name: bytes) -> None:
    """Remove directory `name` below `parent_fd` with everything in it, never following a
    symlink. Iterative, so depth is bounded by open fds rather than Python's stack."""
    top = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    entries: list[tuple[bytes, bool]] = []
    stack: list[tuple[int, bytes, list[tuple[bytes, bool]]]] = [(top, name, entries)]
    try:
        entries.extend(_list_dir(top))
        while stack:
            fd, dname, entries = stack[-1]
            if entries:
                child, is_dir = entries.pop()
                if is_dir:
                    cfd = os.open(child, _DIR_FLAGS, dir_fd=fd)
                    sub: list[tuple[bytes, bool]] = []
                    stack.append((cfd, child, sub))
                    sub.extend(_list_dir(cfd))
                else:
                    _unlink_missing_ok(fd, child)
                continue
            stack.pop()
            os.close(fd)
            os.rmdir(dname, dir_fd=stack[-1][0] if stack else parent_fd)
    finally:
        for fd, _, _ in stack:
            os.close(fd)


def _chmod_at(dfd: int, name: bytes, mode: int) -> None:
    try:
        os.chmod(name, mode, dir_fd=dfd, follow_symlinks=False)
    except (NotImplementedError, ValueError):
        # glibc before 2.32 cannot fchmodat(AT_SYMLINK_NOFOLLOW). The caller has just seen
        # that `name` is not a symlink, and nobody else writes the mirror.
        os.chmod(name, mode, dir_fd=dfd)


def _xattr_names(fd: int) -> list[str]:
    """The xattr names of `fd`; none where the file system has no xattrs."""
    try:
        return os.listxattr(fd)
    except OSError as e:
        if e.errno in _NOT_SUPPORTED:
            return []
        raise


def _sync_xattrs(target: int | bytes, wanted: dict[bytes, bytes], *, follow: bool) -> None:
    """Make the xattrs of `target` exactly `wanted`; nothing where the fs has no xattrs.

    Names are bytes throughout: os.listxattr decodes them with surrogateescape, and
    os.fsencode gives back the exact bytes the file system holds, UTF-8 or not.
    """
    try:
        present = [os.fsencode(n) for n in os.listxattr(target, follow_symlinks=follow)]
    except OSError as e:
        if e.errno in _NOT_SUPPORTED:
            return
        raise
    for key in present:
        if key in wanted:
            continue
        try:
            os.removexattr(target, key, follow_symlinks=follow)
        except OSError as e:
            if e.errno not in _NOT_SUPPORTED and e.errno != errno.ENODATA:
                raise
    for key, value in wanted.items():
        try:
            os.setxattr(target, key, value, follow_symlinks=follow)
        except OSError as e:
            if e.errno not in _NOT_SUPPORTED:
                raise


def _copy_xattrs(src: int, dst: int) -> None:
    try:
        names = [os.fsencode(n) for n in os.listxattr(src)]  # exact bytes, as in _sync_xattrs
    except OSError as e:
        if e.errno in _NOT_SUPPORTED:
            return
        raise
    for key in names:
        try:
            os.setxattr(dst, key, os.getxattr(src, key))
        except OSError as e:
            # Gone meanwhile, or a namespace we may read but not write: best effort.
            if e.errno not in _NOT_SUPPORTED and e.errno not in (errno.ENODATA, errno.EPERM):
                raise


def _data_ranges(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """The (start, end) ranges of `fd` below `size` that hold data, holes skipped."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
            end = os.lseek(fd, start, os.SEEK_HOLE)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return  # only a hole remains
            if e.errno != errno.EINVAL:
                raise
            start, end = offset, size  # no SEEK_DATA here: copy the rest whole
        end = min(end, size)
        if start >= end:
            return
        yield start, end
        offset = end


def _copy_data(src: int, dst: int, size: int) -> None:
    # Truncating first makes every range not copied a hole, as in the source.
    os.ftruncate(dst, size)
    use_copy_range = True
    for start, end in _data_ranges(src, size):
        pos = start
        while pos < end:
            if use_copy_range:
                try:
                    n = os.copy_file_range(src, dst, end - pos, pos, pos)
                except OSError as e:
                    if e.errno not in _NO_COPY_RANGE:
                        raise
                    use_copy_range = False
                    continue
            else:
                chunk = os.pread(src, min(COPY_CHUNK, end - pos), pos)
                n = len(chunk)
                view = memoryview(chunk)
                at = pos
                while view:
                    written = os.pwrite(dst, view, at)
                    view = view[written:]
                    at += written
            if n == 0:
                return  # the source is shorter than it was: the rest stays zeros
            pos += n


def _check_target(target: str, path: str) -> bytes:
    """The bytes of a symlink target from the wire; PathRefused if no symlink can hold it."""
    if not target:
        raise PathRefused(f"symlink refused: {quote_path(path)} has an empty target")
    if "\0" in target:
        raise PathRefused(f"symlink refused: target of {quote_path(path)} contains NUL")
    try:
        raw = encode_name(target)
    except UnicodeEncodeError:
        raise PathRefused(
            f"symlink refused: target of {quote_path(path)} holds a lone surrogate"
        ) from None
    if len(raw) >= MAX_PATH_BYTES:
        raise PathRefused(
            f"symlink refused: target of {quote_path(path)} is {len(raw)} bytes, "
            f"over {MAX_PATH_BYTES - 1}"
        )
    return raw


def _check_attrs(attrs: Attrs) -> None:
    """Refuse attribute values from the wire that the kernel would misread or reject."""
    for label, value in (("uid", attrs.uid), ("gid", attrs.gid)):
        if value is not None and not 0 <= value <= MAX_ID:
            raise ProtocolError(f"attributes refused: {label} {value} out of range")
    if not -_NS_LIMIT <= attrs.mtime_ns < _NS_LIMIT:
        raise ProtocolError(f"attributes refused: mtime_ns {attrs.mtime_ns} out of range")
    for key, val in (attrs.xattrs or {}).items():
        if not key or b"\0" in key or len(key) > MAX_NAME_BYTES:
            raise ProtocolError(f"attributes refused: xattr name {quote_path(decode_name(key))}")
        if len(val) > MAX_XATTR_VALUE:
            raise ProtocolError(
                f"attributes refused: xattr {quote_path(decode_name(key))} value of "
                f"{len(val)} bytes"
            )


def _id(value: int | None) -> int:
    return -1 if value is None else value
