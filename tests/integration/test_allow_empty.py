"""`replicator allow-empty`: the operator lets the safety guard ship one deliberate emptying
of a dataset's root; the next emptying is guarded again, and an unmount never gets through."""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from replicator.agent import guard
from tests.integration.conftest import Pair, make_pair
from tests.integration.harness import (
    agent_config,
    caught_up,
    get_json,
    snapshot,
    wait_converged,
    wait_for,
)

CONFIRMATION = Path("astate/datasets/docs/allow-empty")


def replicator(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "replicator", *args], capture_output=True,
                          text=True, timeout=60)


def fill(directory: Path, n: int = 20) -> None:
    directory.mkdir()
    for i in range(n):
        (directory / f"f{i}").write_text(str(i))


def guarded(pair: Pair, text: str) -> dict[str, Any]:
    """Waits until the agent reports the dataset in error with `text` in the error."""
    def row() -> dict[str, Any] | None:
        r: dict[str, Any] = get_json(pair.agent_status)["datasets"][0]
        return r if r["state"] == "error" and text in (r.get("error") or "") else None
    return wait_for(row, 30, message=f"the guard's error {text!r}")  # type: ignore[no-any-return]


def applied_lsn(pair: Pair) -> int:
    return int(get_json(pair.receiver_status)["datasets"][0]["applied_lsn"])


def settled(pair: Pair) -> tuple[dict[str, Any], int]:
    """The mirror's snapshot and applied LSN once the agent has seen everything applied
    (files show in the mirror a moment before their LSN counts as applied)."""
    wait_for(lambda: caught_up(pair.agent_status), 30, message="the agent to catch up")
    return snapshot(pair.dst), applied_lsn(pair)


def test_operator_lets_one_emptying_through(pair: Pair) -> None:
    fill(pair.src / "data")
    pair.receiver.start()
    pair.agent.start()
    wait_converged(pair.src, pair.dst)
    before, lsn = settled(pair)
    # emptied in one go: the root's only entry leaves in one rename
    (pair.src / "data").rename(pair.tmp / "trash1")
    row = guarded(pair, "became empty in one go")
    # the guard stops before the first deletion goes out
    assert snapshot(pair.dst) == before and applied_lsn(pair) == lsn
    # the error names the command to run; run it as an operator would paste it
    command = row["error"].split("run: ", 1)[1]
    assert command.startswith("replicator allow-empty --state-dir "), command
    r = replicator(*shlex.split(command)[1:])
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip().splitlines()) == 1 and not r.stderr
    wait_converged(pair.src, pair.dst)
    assert not any(pair.dst.iterdir())
    wait_for(lambda: get_json(pair.agent_status)["datasets"][0]["state"] == "streaming", 30,
             message="the dataset to stream again")
    assert pair.agent.log().count("operator allowed shipping the emptied root") == 1
    assert not (pair.tmp / CONFIRMATION).exists(), "the confirmation is used up"

    # refilled, then emptied again: guarded again, the confirmation was for one emptying
    fill(pair.src / "again")
    wait_converged(pair.src, pair.dst)
    before, lsn = settled(pair)
    (pair.src / "again").rename(pair.tmp / "trash2")
    guarded(pair, "became empty in one go")
    assert snapshot(pair.dst) == before and applied_lsn(pair) == lsn

    # a confirmation given too long ago is void: removed with a log line, the guard holds
    guard.grant((pair.tmp / CONFIRMATION).parent, "docs",
                      now=time.time() - guard.ALLOW_EMPTY_TTL - 60)
    wait_for(lambda: "allow-empty confirmation void" in pair.agent.log(), 30,
             message="the expired confirmation to be noticed")
    assert "expired" in pair.agent.log() and not (pair.tmp / CONFIRMATION).exists()
    assert get_json(pair.agent_status)["datasets"][0]["state"] == "error"
    assert snapshot(pair.dst) == before

    # this time the operator names the agent's configuration
    r = replicator("allow-empty", "--config", str(pair.tmp / "agent.toml"), "--dataset", "docs")
    assert r.returncode == 0, r.stderr
    wait_converged(pair.src, pair.dst)
    assert not any(pair.dst.iterdir())
    assert pair.agent.stop() == 0
    assert pair.receiver.stop() == 0


@pytest.fixture
def mounted_pair(tmp_path: Path, small_fs: Path):  # type: ignore[no-untyped-def]
    """A pair whose source is a tmpfs of its own, so that it can be unmounted."""
    p = make_pair(tmp_path)
    agent_config(tmp_path / "agent.toml", receiver_port=p.receiver_port,
                 state=tmp_path / "astate", source=small_fs, http_port=p.agent_http)
    p.src = small_fs
    yield p
    for d in (p.agent, p.receiver):
        d.kill()


def test_an_unmount_is_never_let_through(mounted_pair: Pair) -> None:
    p = mounted_pair
    fill(p.src / "data")
    p.receiver.start()
    p.agent.start()
    wait_converged(p.src, p.dst)
    before = snapshot(p.dst)
    subprocess.run(["umount", str(p.src)], check=True)  # the bare, empty mount point stays
    guarded(p, "another file system")
    # the command cannot tell an empty mount point from an emptied root; the agent can
    r = replicator("allow-empty", "--config", str(p.tmp / "agent.toml"), "--dataset", "docs")
    assert r.returncode == 0, r.stderr
    row = guarded(p, "allow-empty refused")
    assert "unmount" in row["error"]
    assert "allow-empty refused" in p.agent.log()
    assert not (p.tmp / CONFIRMATION).exists(), "a refused confirmation is removed"
    assert snapshot(p.dst) == before
    # restarted on the empty mount point (a reboot whose mount failed): the device it
    # starts with is the mount point's, but the recorded mount point gives it away
    assert p.agent.stop() == 0
    p.restart_agent()
    guarded(p, "(unmounted?)")
    r = replicator("allow-empty", "--config", str(p.tmp / "agent.toml"), "--dataset", "docs")
    assert r.returncode == 0, r.stderr
    row = guarded(p, "allow-empty refused")
    assert "is on the file system mounted at" in row["error"], row["error"]
    assert snapshot(p.dst) == before
