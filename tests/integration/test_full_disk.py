"""A receiver whose disk fills up says so, loses nothing, and goes on by itself once there is
room again: no restart."""

from __future__ import annotations

import errno
import os
import urllib.request
from pathlib import Path

from tests.integration.conftest import make_pair
from tests.integration.harness import (
    Daemon,
    agent_config,
    caught_up,
    get_json,
    receiver_config,
    wait_converged,
    wait_for,
)
from tests.integration.test_mirror_basic import start_mirror


def _full_disk_reported(url: str) -> bool:
    rows = get_json(url)["datasets"]
    return bool(rows) and "No space left on device" in (rows[0].get("error") or "")


def _fill(path: Path) -> None:
    """Writes `path` until the file system is full."""
    chunk = os.urandom(1 << 20)
    with open(path, "wb") as f:
        try:
            while True:
                f.write(chunk)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
            f.truncate(f.tell())  # what did fit stays: the disk stays full
    assert os.statvfs(path.parent).f_bavail < 64  # pages of 4 KiB


def _stop(mirror: Daemon) -> None:
    assert mirror.alive(), "the receiver must not need a restart"
    assert mirror.stop() == 0, mirror.log()


def test_full_disk_is_reported_and_nothing_is_lost(tmp_path: Path, small_fs: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(40 << 20))  # staged file: bigger than the disk
    (src / "small").write_text("small")
    mirror, url = start_mirror(tmp_path, src, small_fs / "dst", "--state-dir",
                               str(small_fs / "state"))
    try:
        wait_for(lambda: _full_disk_reported(url), 30, message="the full disk in /status")
        assert get_json(url)["datasets"][0]["state"] == "error"
        # the operator makes room (here: the big file goes): everything converges
        (src / "big").unlink()
        wait_converged(src, small_fs / "dst")
    finally:
        _stop(mirror)


def _journal_bytes(state: Path) -> int:
    return sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(state)
               if os.path.basename(d) == "journal" for n in names)


def test_journal_churn_on_a_small_disk_is_reclaimed_as_it_goes(tmp_path: Path,
                                                               small_fs: Path) -> None:
    """More small-file changes than the disk holds go through the journal: its segments fit
    the disk and applied ones are released as they go, so the disk never fills (with 64 MiB
    segments the applied records stayed on disk until it was full, and for good)."""
    src = tmp_path / "src"
    src.mkdir()
    dst = small_fs / "dst"
    mirror, url = start_mirror(tmp_path, src, dst, "--state-dir", str(small_fs / "state"))
    try:
        sizes = []
        for _ in range(8):  # 8 x 4 MiB through the journal: more than the 24 MiB disk
            for i in range(8):
                (src / f"f{i}").write_bytes(os.urandom(512 << 10))
            wait_converged(src, dst, timeout=60)
            assert not get_json(url)["datasets"][0].get("error")
            sizes.append(_journal_bytes(small_fs / "state"))
        # caught up: less than the 1 MiB floor of applied records, plus one record
        assert max(sizes) < (1 << 20) + (600 << 10), sizes
    finally:
        _stop(mirror)


def test_journal_on_a_full_disk_recovers_once_there_is_room(tmp_path: Path,
                                                            small_fs: Path) -> None:
    # receiver and agent apart, as on two hosts: only the receiver's disk fills up
    p = make_pair(tmp_path)
    receiver_config(tmp_path / "receiver.toml", listen_port=p.receiver_port,
                    state=small_fs / "rstate", mirror_root=small_fs / "mirror",
                    http_port=p.receiver_http)
    dst = small_fs / "mirror" / "app1" / "docs"
    (p.src / "before").write_text("before")
    try:
        p.receiver.start()
        p.agent.start()
        wait_converged(p.src, dst)
        pid = p.receiver.pid
        ballast = small_fs / "ballast"
        _fill(ballast)
        for i in range(40):  # small files: they go through the journal
            (p.src / f"f{i:02d}").write_bytes(os.urandom(100_000))
        wait_for(lambda: _full_disk_reported(p.receiver_status), 30,
                 message="the full disk in /status")
        ballast.unlink()  # the operator makes room
        wait_converged(p.src, dst, timeout=90)
        wait_for(lambda: not get_json(p.receiver_status)["datasets"][0].get("error"), 30,
                 message="the error to clear")
        assert p.receiver.pid == pid
        _stop(p.receiver)
    finally:
        p.agent.kill()
        p.receiver.kill()


def _agent_state_error(url: str) -> str:
    row = get_json(url)["datasets"][0]
    return str(row.get("error") or "") if row["state"] == "error" else ""


def test_agent_state_on_a_full_disk_pauses_and_recovers(tmp_path: Path,
                                                        small_fs: Path) -> None:
    # only the agent's state_dir is on the small disk: its index cannot be written
    p = make_pair(tmp_path)
    agent_config(tmp_path / "agent.toml", receiver_port=p.receiver_port,
                 state=small_fs / "astate", source=p.src, http_port=p.agent_http)
    (p.src / "before").write_text("before")
    try:
        p.receiver.start()
        p.agent.start()
        wait_converged(p.src, p.dst)
        pid = p.agent.pid
        _fill(small_fs / "ballast")
        for i in range(3000):  # enough index rows that the index must grow
            (p.src / f"f{i:04d}-{'x' * 100}").write_bytes(os.urandom(64))
        reason = wait_for(lambda: _agent_state_error(p.agent_status), 60,
                          message="the agent's full disk in /status")
        assert "cannot save agent state" in reason and "full" in reason, reason
        assert "\n" not in reason
        metrics = urllib.request.urlopen(
            f"http://127.0.0.1:{p.agent_http}/metrics", timeout=5).read().decode()
        assert 'kind="state"' in metrics, metrics
        assert p.agent.alive() and p.agent.pid == pid
        (small_fs / "ballast").unlink()  # the operator makes room
        wait_converged(p.src, p.dst, timeout=90)
        wait_for(lambda: caught_up(p.agent_status), 30, message="the agent to stream again")
        assert not get_json(p.agent_status)["datasets"][0].get("error")
        (p.src / "after").write_text("after")  # and it goes on as before
        wait_converged(p.src, p.dst)
        assert p.agent.pid == pid
        log = p.agent.log()
        assert "Traceback" not in log and "Exception in callback" not in log, log[-4000:]
        assert "agent state writable again" in log
        _stop(p.agent)
    finally:
        p.agent.kill()
        p.receiver.kill()
