from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.harness import Daemon, agent_config, free_port, receiver_config


@dataclass
class Pair:
    """A receiver and an agent as separate processes, with their paths and ports."""

    tmp: Path
    src: Path
    mirror_root: Path
    receiver: Daemon
    agent: Daemon
    receiver_port: int
    receiver_http: int
    agent_http: int

    @property
    def dst(self) -> Path:
        return self.mirror_root / "app1" / "docs"

    @property
    def receiver_status(self) -> str:
        return f"http://127.0.0.1:{self.receiver_http}/status"

    @property
    def agent_status(self) -> str:
        return f"http://127.0.0.1:{self.agent_http}/status"

    def restart_receiver(self) -> None:
        self.receiver = Daemon(self.receiver.args, self.receiver.log_path).start()

    def restart_agent(self) -> None:
        self.agent = Daemon(self.agent.args, self.agent.log_path).start()


def make_pair(tmp: Path, *, agent_target_port: int | None = None, agent_extra: str = "") -> Pair:
    src = tmp / "src"
    src.mkdir(exist_ok=True)
    mirror_root = tmp / "mirror"
    rport, rhttp, ahttp = free_port(), free_port(), free_port()
    rconf = receiver_config(tmp / "receiver.toml", listen_port=rport, state=tmp / "rstate",
                            mirror_root=mirror_root, http_port=rhttp)
    aconf = agent_config(tmp / "agent.toml", receiver_port=agent_target_port or rport,
                         state=tmp / "astate", source=src, http_port=ahttp, extra=agent_extra)
    receiver = Daemon(["receiver", "--config", str(rconf), "--log-level", "debug"],
                      tmp / "receiver.log")
    agent = Daemon(["agent", "--config", str(aconf), "--log-level", "debug"], tmp / "agent.log")
    return Pair(tmp, src, mirror_root, receiver, agent, rport, rhttp, ahttp)


@pytest.fixture
def pair(tmp_path: Path):  # type: ignore[no-untyped-def]
    p = make_pair(tmp_path)
    yield p
    for d in (p.agent, p.receiver):
        d.kill()


@pytest.fixture
def small_fs(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A 24 MiB tmpfs of its own at tmp_path/small (root only): to fill up, or unmount."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)],
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
