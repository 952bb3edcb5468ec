"""Small helpers shared by the benchmark modules: ports, waiting, the page cache, trees."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

DROP_CACHES = Path("/proc/sys/vm/drop_caches")
COMPARE_CHUNK = 8 * 1024 * 1024


def free_port() -> int:
    """A loopback port that was free a moment ago, for daemons that cannot bind port 0
    and report it back."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def wait_until(cond: Callable[[], bool], timeout: float, interval: float, what: str) -> float:
    """Poll `cond` every `interval` seconds until true; return the perf_counter time at
    which it was first seen true. Raises TimeoutError naming `what`."""
    end = time.perf_counter() + timeout
    while True:
        if cond():
            return time.perf_counter()
        if time.perf_counter() > end:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def drop_caches() -> bool:
    """Write back dirty pages and drop the page cache, so that the next run reads from disk
    like the first one after a reboot. False when not allowed (not root, container)."""
    os.sync()
    try:
        DROP_CACHES.write_text("3\n")
    except OSError:
        return False
    return True


def files_equal(a: Path, b: Path) -> bool:
    try:
        if a.stat().st_size != b.stat().st_size:
            return False
        with open(a, "rb") as fa, open(b, "rb") as fb:
            while True:
                ca, cb = fa.read(COMPARE_CHUNK), fb.read(COMPARE_CHUNK)
                if ca != cb:
                    return False
                if not ca:
                    return True
    except OSError:
        return False


def tree_files(root: Path) -> list[Path]:
    """Relative paths of every regular file under root, sorted."""
    out = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            out.append(Path(dirpath, name).relative_to(root))
    return sorted(out)


def count_files(root: Path) -> int:
    return sum(len(names) for _, _, names in os.walk(root))


def file_stamps(root: Path) -> dict[Path, tuple[int, int]]:
    """(size, mtime_ns) of every regular file under root, by relative path."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath, name)
            try:
                st = path.lstat()
            except OSError:
                continue
            out[path.relative_to(root)] = (st.st_size, st.st_mtime_ns)
    return out


def trees_equal(a: Path, b: Path) -> bool:
    """Same regular files with the same contents (modes and times are not compared)."""
    files = tree_files(a)
    return files == tree_files(b) and all(files_equal(a / f, b / f) for f in files)
