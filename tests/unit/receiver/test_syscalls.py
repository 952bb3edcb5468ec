"""Both ways of making the applier's quick calls do the same, and fail the same."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from replicator import mounts
from replicator.mounts import local_fs
from replicator.receiver.syscalls import Calls, HeldCalls, make_calls

KINDS = [Calls, HeldCalls]
FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


@pytest.fixture(params=KINDS, ids=lambda k: k.__name__)
def calls(request: pytest.FixtureRequest) -> Calls:
    kind: type[Calls] = request.param
    return kind()


@pytest.fixture
def dir_fd(tmp_path: Path):  # type: ignore[no-untyped-def]
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    yield fd
    os.close(fd)


def test_make_calls(tmp_path: Path) -> None:
    assert type(make_calls(False, tmp_path)) is Calls
    assert local_fs(tmp_path)  # a test directory is local
    assert type(make_calls(True, tmp_path)) is HeldCalls
    assert type(make_calls(True, tmp_path / "not" / "made" / "yet")) is HeldCalls


def test_no_held_calls_where_mounts_cannot_be_read(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mounts, "MOUNTINFO", str(tmp_path / "missing"))
    assert not local_fs(tmp_path)
    assert type(make_calls(True, tmp_path)) is Calls


def test_held_calls_only_on_a_local_file_system(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    mountinfo = tmp_path / "mountinfo"
    root = os.path.realpath(tmp_path)
    mountinfo.write_text(f"27 1 254:0 / / rw - ext4 /dev/vda rw\n"
                         f"40 27 0:50 / {root} rw - nfs4 nas:/dr rw\n")
    monkeypatch.setattr(mounts, "MOUNTINFO", str(mountinfo))
    assert not local_fs(tmp_path / "mirror")
    assert type(make_calls(True, tmp_path / "mirror")) is Calls


def test_create_write_finish_rename(calls: Calls, dir_fd: int, tmp_path: Path) -> None:
    fd = calls.open_at(dir_fd, b"staged", FLAGS, 0o600)
    try:
        assert stat.S_IMODE(os.fstat(fd).st_mode) == 0o600 & ~_umask()
        calls.pwrite_all(fd, b"hello", 0)
        calls.pwrite_all(fd, memoryview(b"--world--")[2:7], 6)
        calls.pwrite_all(fd, b"", 100)  # writes nothing, grows nothing
        calls.fchmod(fd, 0o4751)
        calls.set_mtime(fd, 1_700_000_000_123_456_789)
    finally:
        calls.close(fd)
    sub = tmp_path / "sub"
    sub.mkdir()
    sub_fd = os.open(sub, os.O_RDONLY | os.O_DIRECTORY)
    try:
        calls.rename_at(dir_fd, b"staged", sub_fd, "n\u00e4me".encode())
    finally:
        os.close(sub_fd)
    st = os.lstat(sub / "n\u00e4me")
    assert (sub / "n\u00e4me").read_bytes() == b"hello\0world"
    assert stat.S_IMODE(st.st_mode) == 0o4751
    assert st.st_mtime_ns == st.st_atime_ns == 1_700_000_000_123_456_789
    assert not (tmp_path / "staged").exists()


def test_fds_are_not_inherited(calls: Calls, dir_fd: int) -> None:
    fd = calls.open_at(dir_fd, b"f", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        assert not os.get_inheritable(fd)  # no O_CLOEXEC asked for: there all the same
    finally:
        calls.close(fd)


def test_offsets_past_4_gib(calls: Calls, dir_fd: int, tmp_path: Path) -> None:
    fd = calls.open_at(dir_fd, b"sparse", FLAGS, 0o600)
    try:
        calls.pwrite_all(fd, b"far", 5 << 30)  # a hole before it: nothing allocated
    finally:
        calls.close(fd)
    with open(tmp_path / "sparse", "rb") as f:
        assert os.fstat(f.fileno()).st_size == (5 << 30) + 3
        f.seek(5 << 30)
        assert f.read() == b"far"


def test_times_before_1970(calls: Calls, dir_fd: int, tmp_path: Path) -> None:
    fd = calls.open_at(dir_fd, b"old", FLAGS, 0o600)
    try:
        calls.set_mtime(fd, -1_500_000_001)  # 1969-12-31T23:59:58.499999999
    finally:
        calls.close(fd)
    assert os.lstat(tmp_path / "old").st_mtime_ns == -1_500_000_001


def test_errors_are_the_os_ones(calls: Calls, dir_fd: int, tmp_path: Path) -> None:
    (tmp_path / "there").write_bytes(b"x")
    with pytest.raises(FileExistsError) as e:
        calls.open_at(dir_fd, b"there", FLAGS, 0o600)
    assert e.value.errno == errno.EEXIST and e.value.filename == b"there"
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError):
        calls.rename_at(dir_fd, b"there", dir_fd, b"d")
    with pytest.raises(FileNotFoundError) as e:
        calls.rename_at(dir_fd, b"missing", dir_fd, b"other")
    assert (e.value.filename, e.value.filename2) == (b"missing", b"other")
    closed = os.open(os.devnull, os.O_RDONLY)
    os.close(closed)
    for bad in (lambda: calls.fchmod(closed, 0o600), lambda: calls.set_mtime(closed, 0),
                lambda: calls.pwrite_all(closed, b"x", 0), lambda: calls.close(closed)):
        with pytest.raises(OSError) as e:
            bad()
        assert e.value.errno == errno.EBADF
    # a NUL would cut the name short in C: refused before any call, as os.open does
    with pytest.raises(ValueError):
        calls.open_at(dir_fd, b"a\0b", FLAGS, 0o600)
    with pytest.raises(ValueError):
        calls.rename_at(dir_fd, b"there", dir_fd, b"x\0y")
    assert not (tmp_path / "a").exists() and (tmp_path / "there").exists()


def test_full_disk_is_an_error(calls: Calls) -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    fd = os.open("/dev/full", os.O_WRONLY)
    try:
        with pytest.raises(OSError) as e:
            calls.pwrite_all(fd, b"x" * 4096, 0)
        assert e.value.errno == errno.ENOSPC
    finally:
        os.close(fd)


def test_held_calls_keep_the_lock(tmp_path: Path) -> None:
    """The point of HeldCalls: no other thread runs Python during the call. An open of a
    FIFO for writing waits until another process opens it for reading; meanwhile a thread
    of ours counts. With the plain call it keeps counting, with the held one it cannot."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    dir_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        plain = _ticks_while_blocked(Calls(), dir_fd, fifo)
        held = _ticks_while_blocked(HeldCalls(), dir_fd, fifo)
    finally:
        os.close(dir_fd)
    assert plain > 10_000
    assert held < plain / 10  # a switch interval of counting, at most, before it waits


def _ticks_while_blocked(calls: Calls, dir_fd: int, fifo: Path) -> int:
    """How far a spinning thread counts while `calls` waits in an open of `fifo`."""
    for _ in range(5):  # the reader must open only once we wait: else try again
        reader = subprocess.Popen(["sh", "-c", f"sleep 0.3; exec cat '{fifo}' >/dev/null"])
        ticks = 0
        stop = threading.Event()

        def spin(stop: threading.Event = stop) -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1

        spinner = threading.Thread(target=spin)
        spinner.start()
        try:
            before, started = ticks, time.monotonic()
            fd = calls.open_at(dir_fd, fifo.name.encode(), os.O_WRONLY | os.O_CLOEXEC, 0)
            waited, counted = time.monotonic() - started, ticks - before
            calls.close(fd)
        finally:
            stop.set()
            spinner.join()
            try:  # cat exits once the FIFO is closed; if the open failed, it never will
                reader.wait(timeout=10)
            except subprocess.TimeoutExpired:
                reader.kill()
                reader.wait()
        if waited >= 0.1:
            return counted
    raise AssertionError("the FIFO was opened before the call waited in it")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
