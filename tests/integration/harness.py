"""Real processes for integration tests: receiver, agent and mirror daemons, and trees.

Every daemon is `python -m replicator ...` in its own process, on ports chosen free at
start; tests wait on conditions (a deadline, never a bare sleep).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

DEFAULT_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(condition: Callable[[], Any], timeout: float = DEFAULT_TIMEOUT,
             interval: float = 0.05, message: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except Exception as e:  # the condition may fail while things start up
            last_error = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}"
                         + (f" (last error: {last_error!r})" if last_error else ""))


def snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    """Everything the mirror must reproduce: kind, content, mode, mtime, symlink target."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(full), st.st_mtime_ns)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode), st.st_mtime_ns)
            elif stat.S_ISREG(st.st_mode):
                with open(full, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
                out[rel] = ("file", st.st_size, digest, stat.S_IMODE(st.st_mode),
                            st.st_mtime_ns)
    return out


def diff(a: dict[str, tuple[Any, ...]], b: dict[str, tuple[Any, ...]], limit: int = 10) -> str:
    lines = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            lines.append(f"{k}: {a.get(k)} != {b.get(k)}")
    return "\n".join(lines[:limit]) + (f"\n... {len(lines) - limit} more" if len(lines) > limit
                                       else "")


def wait_converged(src: Path, dst: Path, timeout: float = DEFAULT_TIMEOUT) -> None:
    state: dict[str, str] = {}

    def same() -> bool:
        a, b = snapshot(src), snapshot(dst)
        state["diff"] = diff(a, b)
        return a == b

    try:
        wait_for(same, timeout, interval=0.1, message="the mirror to converge")
    except AssertionError:
        raise AssertionError("mirror did not converge:\n" + state.get("diff", "")) from None


def get_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


class Daemon:
    """A replicator subprocess with its stderr in a log file."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.args = args
        self.log_path = log
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Daemon:
        env = dict(os.environ)
        env.update(self.env or {})
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen([sys.executable, "-m", "replicator", *self.args],
                                     stdout=self._log, stderr=self._log, env=env)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(
                    f"{self.args[0]} did not stop on SIGTERM:\n{self.log()}") from None
        self._log.close()
        return int(self.proc.returncode)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def receiver_config(path: Path, *, listen_port: int, state: Path, mirror_root: Path,
                    http_port: int | None = None, extra: str = "") -> Path:
    text = (f'listen = "127.0.0.1:{listen_port}"\nstate_dir = "{state}"\n'
            f'mirror_root = "{mirror_root}"\n')
    if http_port:
        text += f'http = "127.0.0.1:{http_port}"\n'
    path.write_text(text + extra)
    return path


def agent_config(path: Path, *, receiver_port: int, state: Path, source: Path,
                 source_id: str = "app1", dataset: str = "docs", http_port: int | None = None,
                 extra: str = "") -> Path:
    text = (f'source_id = "{source_id}"\nreceiver = "127.0.0.1:{receiver_port}"\n'
            f'state_dir = "{state}"\n')
    if http_port:
        text += f'http = "127.0.0.1:{http_port}"\n'
    text += extra
    text += f'\n[[datasets]]\nname = "{dataset}"\ntype = "directory"\npath = "{source}"\n'
    path.write_text(text)
    return path


@contextlib.contextmanager
def running(*daemons: Daemon) -> Iterator[None]:
    try:
        for d in daemons:
            d.start()
        yield
    finally:
        for d in daemons:
            if d.alive():
                d.kill(signal.SIGKILL)


def status_row(url: str) -> dict[str, Any] | None:
    doc = get_json(url)
    rows = doc.get("datasets") or []
    return rows[0] if rows else None


def caught_up(url: str) -> bool:
    row = status_row(url)
    return bool(row and row["state"] == "streaming" and row["pending_changes"] == 0
                and row["applied_lsn"] == row["written_lsn"])
