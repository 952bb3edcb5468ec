"""The applier's quick file-system calls, made with or without letting go of the
interpreter lock.

CPython lets go of the interpreter lock around every system call, and the calling thread
must win it back afterwards. Where other threads of the process keep the lock busy, that
costs far more than the call: the thread sleeps until the holder lets go, and the
hand-over between two CPUs costs a wake-up of its own. A small new file costs the applier
six such calls (create, write, chmod, utimes, close, rename), each of which returns in a
few microseconds when it only touches the page cache and the dentry cache.

`replicator mirror` runs the agent, gRPC, the session's ingest and the applier in one
process, so there most of those calls waited for the lock: 20,000 new 4 KiB files
took about 22,000 voluntary context switches and 4.3 s (two cores). `HeldCalls` makes the
same calls through libc with ctypes.PyDLL, which keeps the lock during the call: 7,500
switches and 3.6 s, and a fifth less CPU. A receiver in a process of its own has little
to gain (its other threads seldom want the lock at that moment: about 1,100 switches for
the same files), and there the held calls took about 10% more CPU for the same wall time,
so it keeps `Calls`.

What a held call costs: nothing else in the process runs until it returns. A write into
the page cache can be made to wait when the disk falls behind (dirty-page throttling), and
then the whole process waits too; in `mirror` the agent would be held back by that disk
anyway. Only these quick calls are held: fsyncs, copies and reads of big files let go of
the lock as usual. A mirror on a network or FUSE file system is another matter: a server
that stops answering would freeze every thread, /status and the signal handlers with it,
where a plain call freezes the applier alone while /status shows the lag growing. So
`make_calls` holds the lock only on a local file system (`mounts.local_fs`).

Both classes raise what the os functions raise (OSError and its subclasses, with the
file name; ValueError for a name holding NUL).
"""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path
from typing import Any

from replicator.durable import pwrite_all
from replicator.mounts import local_fs


class Calls:
    """The plain os functions: the lock is let go during each call."""

    def open_at(self, dir_fd: int, name: bytes, flags: int, mode: int) -> int:
        return os.open(name, flags, mode, dir_fd=dir_fd)

    def pwrite_all(self, fd: int, data: bytes | memoryview, offset: int) -> None:
        pwrite_all(fd, data, offset)

    def fchmod(self, fd: int, mode: int) -> None:
        os.fchmod(fd, mode)

    def set_mtime(self, fd: int, mtime_ns: int) -> None:
        """Sets both atime and mtime of `fd` to `mtime_ns`."""
        os.utime(fd, ns=(mtime_ns, mtime_ns))

    def close(self, fd: int) -> None:
        os.close(fd)

    def rename_at(self, src_dir_fd: int, src: bytes, dst_dir_fd: int, dst: bytes) -> None:
        os.rename(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)


class _Timespecs(ctypes.Structure):
    """struct timespec[2] of futimens(3): atime, then mtime."""

    _fields_ = [("atime_s", ctypes.c_long), ("atime_ns", ctypes.c_long),
                ("mtime_s", ctypes.c_long), ("mtime_ns", ctypes.c_long)]


def _fn(libc: ctypes.PyDLL, name: str, restype: type, *argtypes: type) -> Any:
    f = getattr(libc, name)
    f.argtypes = list(argtypes)
    f.restype = restype
    return f


def _check_name(name: bytes) -> None:
    if b"\0" in name:  # c_char_p would cut the name at it; os.open refuses it so
        raise ValueError("embedded null byte")


def _error(name: bytes | None = None, name2: bytes | None = None) -> OSError:
    """The OSError (of the errno's subclass) that the os function would raise."""
    e = ctypes.get_errno()
    return OSError(e, os.strerror(e), name, None, name2)  # None: winerror


class HeldCalls(Calls):
    """The same calls through libc, keeping the lock (see the module doc). One instance
    per thread: `set_mtime` reuses one buffer. Data that is not `bytes` (a memoryview) is
    written the plain way."""

    def __init__(self) -> None:
        libc = ctypes.PyDLL(None, use_errno=True)  # PyDLL: the call keeps the lock
        c_int, c_uint, c_char_p = ctypes.c_int, ctypes.c_uint, ctypes.c_char_p
        self._openat = _fn(libc, "openat", c_int, c_int, c_char_p, c_int, c_uint)
        # pwrite64: a 64-bit offset on 32-bit glibc too; musl has only pwrite, whose
        # offset is always 64 bits
        pwrite = "pwrite64" if hasattr(libc, "pwrite64") else "pwrite"
        self._pwrite = _fn(libc, pwrite, ctypes.c_ssize_t, c_int, c_char_p, ctypes.c_size_t,
                           ctypes.c_int64)
        self._fchmod = _fn(libc, "fchmod", c_int, c_int, c_uint)
        self._futimens = _fn(libc, "futimens", c_int, c_int, ctypes.POINTER(_Timespecs))
        self._close = _fn(libc, "close", c_int, c_int)
        self._renameat = _fn(libc, "renameat", c_int, c_int, c_char_p, c_int, c_char_p)
        self._times = _Timespecs()
        self._times_ref = ctypes.byref(self._times)

    def open_at(self, dir_fd: int, name: bytes, flags: int, mode: int) -> int:
        _check_name(name)
        flags |= os.O_CLOEXEC  # as os.open does: no fd leaks into a child (PEP 446)
        while (fd := self._openat(dir_fd, name, flags, mode)) < 0:
            if ctypes.get_errno() != errno.EINTR:
                raise _error(name)
        return fd

    def pwrite_all(self, fd: int, data: bytes | memoryview, offset: int) -> None:
        if type(data) is not bytes:
            pwrite_all(fd, data, offset)
            return
        while (n := self._pwrite(fd, data, len(data), offset)) < 0:
            if ctypes.get_errno() != errno.EINTR:
                raise _error()
        if n < len(data):  # short: a full disk, most likely; the plain way says which
            pwrite_all(fd, memoryview(data)[n:], offset + n)

    def fchmod(self, fd: int, mode: int) -> None:
        while self._fchmod(fd, mode) < 0:
            if ctypes.get_errno() != errno.EINTR:
                raise _error()

    def set_mtime(self, fd: int, mtime_ns: int) -> None:
        t = self._times
        seconds, ns = divmod(mtime_ns, 1_000_000_000)  # ns in 0..999999999, as timespec wants
        t.atime_s = t.mtime_s = seconds
        t.atime_ns = t.mtime_ns = ns
        while self._futimens(fd, self._times_ref) < 0:
            if ctypes.get_errno() != errno.EINTR:
                raise _error()

    def close(self, fd: int) -> None:
        if self._close(fd) < 0:  # never retried: on Linux the fd is gone after EINTR
            raise _error()

    def rename_at(self, src_dir_fd: int, src: bytes, dst_dir_fd: int, dst: bytes) -> None:
        _check_name(src)
        _check_name(dst)
        while self._renameat(src_dir_fd, src, dst_dir_fd, dst) < 0:
            if ctypes.get_errno() != errno.EINTR:
                raise _error(src, dst)


def make_calls(hold_lock: bool, root: Path) -> Calls:
    """HeldCalls where asked for, `root` is on a local file system and libc has the calls;
    else Calls."""
    if hold_lock and local_fs(root):
        try:
            return HeldCalls()
        except (OSError, AttributeError):  # no libc to load, or a call missing from it
            pass
    return Calls()
