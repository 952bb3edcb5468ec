"""A real rsync daemon on a loopback port, and timed `rsync -a` runs against it.

The daemon serves one read-write module from a temporary directory, without chroot, as
the current user. Clients push with plain `rsync -a --no-whole-file --stats`: what an
operator would type, and the same with `--fsync` for a durable, like-for-like baseline.
(Whole-file is already off for a daemon destination; the option is
spelled out so the delta algorithm is used even if rsync's heuristics change.)
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from benchmarks.util import free_port, port_open, wait_until

RSYNC = "/usr/bin/rsync"
MODULE = "bench"
START_TIMEOUT = 10.0
START_ATTEMPTS = 3  # the free port may be taken between probing and binding
SYNC_TIMEOUT = 600.0

_STAT = re.compile(r"^Total bytes (sent|received):\s*([\d,.]+)", re.MULTILINE)


@dataclass(frozen=True)
class RsyncResult:
    seconds: float
    bytes_sent: int
    bytes_received: int

    @property
    def wire_bytes(self) -> int:
        return self.bytes_sent + self.bytes_received


def parse_stats(output: str) -> tuple[int, int]:
    """(bytes sent, bytes received) from `rsync --stats` output, thousands separators and
    all. Raises ValueError when either line is missing."""
    found = {kind: int(re.sub(r"[^\d]", "", num)) for kind, num in _STAT.findall(output)}
    if set(found) != {"sent", "received"}:
        raise ValueError("rsync --stats output lacks 'Total bytes sent/received'")
    return found["sent"], found["received"]


class RsyncDaemon:
    """`rsync --daemon` serving `root` as module MODULE on 127.0.0.1:<port>."""

    def __init__(self, root: Path, conf_dir: Path, rsync: str = RSYNC) -> None:
        self.root = root
        self.conf_dir = conf_dir
        self.rsync = rsync
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    def _write_conf(self) -> Path:
        conf = self.conf_dir / "rsyncd.conf"
        conf.write_text(
            f"pid file = {self.conf_dir / 'rsyncd.pid'}\n"
            f"log file = {self.conf_dir / 'rsyncd.log'}\n"
            "use chroot = no\n"
            f"uid = {os.getuid()}\n"
            f"gid = {os.getgid()}\n"
            "numeric ids = yes\n"
            f"[{MODULE}]\n"
            f"    path = {self.root}\n"
            "    read only = false\n")
        return conf

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.conf_dir.mkdir(parents=True, exist_ok=True)
        conf = self._write_conf()
        for _ in range(START_ATTEMPTS):
            self.port = free_port()
            proc = subprocess.Popen(
                [self.rsync, "--daemon", "--no-detach", f"--config={conf}",
                 "--address=127.0.0.1", f"--port={self.port}"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            def up_or_dead(proc: subprocess.Popen[bytes] = proc) -> bool:
                return proc.poll() is not None or port_open(self.port)

            try:
                wait_until(up_or_dead, START_TIMEOUT, 0.02, "the rsync daemon")
            except TimeoutError:
                proc.kill()
                proc.wait()
                raise
            if proc.poll() is None:
                self._proc = proc
                return
        raise RuntimeError(f"rsync daemon would not start; see {self.conf_dir / 'rsyncd.log'}")

    def url(self, subpath: str) -> str:
        return f"rsync://127.0.0.1:{self.port}/{MODULE}/{subpath.strip('/')}/"

    def sync(self, src: Path, subpath: str, *, fsync: bool = False) -> RsyncResult:
        """Push the contents of directory `src` into module/subpath; timed, wall clock.

        `fsync`: with `--fsync`, so that the daemon fsyncs every file it writes before
        rsync exits: durable, like replicator's "applied"."""
        cmd = [self.rsync, "-a", "--no-whole-file", "--stats", *(["--fsync"] if fsync else []),
               f"{src}/", self.url(subpath)]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=SYNC_TIMEOUT)
        seconds = time.perf_counter() - t0
        if r.returncode != 0:
            raise RuntimeError(f"rsync exited {r.returncode}: {r.stderr.strip()[-500:]}")
        sent, received = parse_stats(r.stdout)
        return RsyncResult(seconds, sent, received)

    def stop(self) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def __enter__(self) -> RsyncDaemon:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None,
                 exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
