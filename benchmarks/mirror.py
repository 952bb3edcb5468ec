"""`replicator mirror` as a child process, and what the benchmarks read from it.

A mirror has caught up when every dataset in its `/status` is `streaming` with no pending
changes and `applied_lsn == written_lsn` (CONTRACT.md). Right after a start the status may
not yet know about changes the agent has not scanned, so callers also pass a cheap check
of the destination (size and mtime of the file they expect), evaluated only once the
status says caught up.
"""

from __future__ import annotations

import http.client
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.util import free_port

STOP_TIMEOUT = 30.0
HTTP_TIMEOUT = 2.0
ERROR_GRACE = 5.0  # a dataset in `error` this long is not going to catch up
REPLICATOR = [sys.executable, "-m", "replicator"]
# `python -m` puts the working directory first on sys.path: run from the checkout so that
# the package imported is this one, whatever the caller's directory holds
REPO_ROOT = Path(__file__).resolve().parent.parent

# replicator_bytes_total{...,stage="wire",...} 1234.0
_SAMPLE = re.compile(r"^replicator_bytes_total\{([^}]*)\}\s+([0-9.eE+-]+)", re.MULTILINE)
_WIRE = re.compile(r'\bstage="wire"')


class MirrorFailed(RuntimeError):
    """The mirror exited, or reported a dataset in `error`, instead of catching up."""


class MirrorUnavailable(MirrorFailed):
    """`replicator mirror` exited on its own."""


def is_caught_up(doc: dict[str, Any] | None) -> bool:
    if not doc or not doc.get("datasets"):
        return False
    return all(d.get("state") == "streaming" and d.get("pending_changes") == 0
               and d.get("applied_lsn") == d.get("written_lsn")
               for d in doc["datasets"])


def parse_wire_bytes(metrics: str) -> int | None:
    """replicator_bytes_total with stage="wire", or None when the metric is absent.

    A mirror process holds both the agent and the receiver; if both export the counter
    (under some distinguishing label) each sees the same bytes, so the largest series is
    taken rather than the sum."""
    values = [float(v) for labels, v in _SAMPLE.findall(metrics) if _WIRE.search(labels)]
    return int(max(values)) if values else None


class MirrorProcess:
    """One `replicator mirror SRC DST --http 127.0.0.1:PORT --state-dir DIR` process.

    Its stderr goes to `log_path`; `stop()` sends SIGTERM and waits."""

    role = "mirror"  # the command of the process that serves /status

    def __init__(self, src: Path, dst: Path, state_dir: Path, log_path: Path,
                 command: list[str] | None = None) -> None:
        self.src, self.dst, self.state_dir, self.log_path = src, dst, state_dir, log_path
        self.command = command or REPLICATOR
        self.port = 0
        self.started_at = 0.0
        self.answered = False  # it served a status document at least once
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: http.client.HTTPConnection | None = None

    def start(self) -> None:
        """Spawn the process (returns at once; `started_at` is the perf_counter time)."""
        self.port = free_port()
        self.dst.mkdir(parents=True, exist_ok=True)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        cmd = [*self.command, "mirror", str(self.src), str(self.dst),
               "--http", f"127.0.0.1:{self.port}", "--state-dir", str(self.state_dir)]
        with open(self.log_path, "ab") as log:
            self.started_at = time.perf_counter()
            self._proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log,
                                          cwd=REPO_ROOT)

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        # drop the frame lines of printed exception groups: nothing but | + - and spaces
        kept = [ln.strip(" |") for ln in text.splitlines() if ln.strip(" |+-")]
        return " | ".join(kept[-lines:])

    def check_alive(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            raise MirrorUnavailable(f"replicator {self.role} exited {self._proc.returncode}: "
                                    f"{self.log_tail()}")

    def _get(self, path: str) -> str | None:
        """GET over one kept-alive connection; None when the daemon does not answer."""
        for _ in range(2):  # one retry: the server may have closed an idle connection
            if self._conn is None:
                self._conn = http.client.HTTPConnection("127.0.0.1", self.port,
                                                        timeout=HTTP_TIMEOUT)
            try:
                self._conn.request("GET", path)
                resp = self._conn.getresponse()
                body = resp.read().decode()
                return body if resp.status == 200 else None
            except (OSError, http.client.HTTPException):
                self._conn.close()
                self._conn = None
        return None

    def status(self) -> dict[str, Any] | None:
        body = self._get("/status")
        if body is None:
            return None
        try:
            doc = json.loads(body)
        except ValueError:
            return None
        if not isinstance(doc, dict):
            return None
        self.answered = True
        return doc

    def dataset(self) -> dict[str, Any] | None:
        """The first dataset's status object (a mirror has one)."""
        doc = self.status()
        return doc["datasets"][0] if doc and doc.get("datasets") else None

    def wire_bytes(self) -> int | None:
        body = self._get("/metrics")
        return parse_wire_bytes(body) if body is not None else None

    def wait_caught_up(self, timeout: float, interval: float = 0.01,
                       dst_ready: Callable[[], bool] | None = None) -> float:
        """Poll until caught up (and `dst_ready()`, if given); return the perf_counter time
        it was first seen. Raises MirrorUnavailable if the process dies, TimeoutError."""
        end = time.perf_counter() + timeout
        error_since: float | None = None
        while True:
            self.check_alive()
            doc = self.status()
            if is_caught_up(doc) and (dst_ready is None or dst_ready()):
                return time.perf_counter()
            now = time.perf_counter()
            if doc and any(d.get("state") == "error" for d in doc.get("datasets", [])):
                error_since = error_since or now
                if now - error_since > ERROR_GRACE:
                    raise MirrorFailed(f"dataset in error for {ERROR_GRACE:.0f}s: "
                                       f"{self.log_tail(3)}")
            else:
                error_since = None
            if now > end:
                raise TimeoutError(f"replicator mirror not caught up after {timeout:.0f}s; "
                                   f"status={doc}; log: {self.log_tail(3)}")
            time.sleep(interval)

    def stop(self) -> None:
        """SIGTERM and wait; SIGKILL if it does not stop in time. Safe to call twice."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        _stop(self._proc)
        self._proc = None


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM, then SIGKILL if it has not exited within STOP_TIMEOUT."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


SPLIT_SOURCE = "bench"
SPLIT_DATASET = "data"


class SplitProcess(MirrorProcess):
    """The deployed topology on one machine: `replicator receiver --config` and `replicator
    agent --config` as two processes over loopback gRPC, instead of one `mirror` process.

    `dst` is the receiver's mirror_root; the tree lands in `dst/bench/data` (`mirrored`).
    Both configs go to `state_dir`; `/status` and `/metrics` are the receiver's. Both
    processes log to `log_path`."""

    role = "receiver"

    def __init__(self, src: Path, dst: Path, state_dir: Path, log_path: Path,
                 command: list[str] | None = None) -> None:
        super().__init__(src, dst, state_dir, log_path, command)
        self._agent: subprocess.Popen[bytes] | None = None

    @staticmethod
    def tree_in(mirror_root: Path) -> Path:
        """Where the mirrored tree lands under a mirror root."""
        return mirror_root / SPLIT_SOURCE / SPLIT_DATASET

    @property
    def mirrored(self) -> Path:
        return self.tree_in(self.dst)

    def _configs(self) -> tuple[Path, Path]:
        grpc_port = free_port()
        receiver = self.state_dir / "receiver.toml"
        receiver.write_text(
            f'listen = "127.0.0.1:{grpc_port}"\n'
            f"state_dir = {json.dumps(str(self.state_dir / 'receiver'))}\n"
            f"mirror_root = {json.dumps(str(self.dst))}\n"
            f'http = "127.0.0.1:{self.port}"\n')
        agent = self.state_dir / "agent.toml"
        agent.write_text(
            f'source_id = "{SPLIT_SOURCE}"\n'
            f'receiver = "127.0.0.1:{grpc_port}"\n'
            f"state_dir = {json.dumps(str(self.state_dir / 'agent'))}\n"
            f'[[datasets]]\nname = "{SPLIT_DATASET}"\ntype = "directory"\n'
            f"path = {json.dumps(str(self.src))}\n")
        return receiver, agent

    def start(self) -> None:
        self.port = free_port()
        self.dst.mkdir(parents=True, exist_ok=True)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        receiver, agent = self._configs()
        with open(self.log_path, "ab") as log:
            self.started_at = time.perf_counter()
            self._proc = subprocess.Popen([*self.command, "receiver", "--config", str(receiver)],
                                          stdout=subprocess.DEVNULL, stderr=log, cwd=REPO_ROOT)
            self._agent = subprocess.Popen([*self.command, "agent", "--config", str(agent)],
                                           stdout=subprocess.DEVNULL, stderr=log, cwd=REPO_ROOT)

    def check_alive(self) -> None:
        super().check_alive()
        if self._agent is not None and self._agent.poll() is not None:
            raise MirrorUnavailable(f"replicator agent exited {self._agent.returncode}: "
                                    f"{self.log_tail()}")

    def stop(self) -> None:
        """The agent first, as an operator would stop a primary's agent, then the receiver."""
        _stop(self._agent)
        self._agent = None
        super().stop()
