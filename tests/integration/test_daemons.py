"""The daemons as systemd runs them: READY=1, clean stops, one-line errors."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.harness import Daemon, agent_config, free_port, receiver_config


def notify_socket(tmp_path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(tmp_path / "notify.sock"))
    s.settimeout(30)
    return s


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_receiver_notifies_ready_and_stops_cleanly(tmp_path: Path, sig: int) -> None:
    sock = notify_socket(tmp_path)
    conf = receiver_config(tmp_path / "r.toml", listen_port=free_port(), state=tmp_path / "s",
                           mirror_root=tmp_path / "m")
    d = Daemon(["receiver", "--config", str(conf)], tmp_path / "r.log",
               env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock")}).start()
    try:
        assert sock.recv(1024) == b"READY=1"
        d.kill(sig)
        assert d.proc is not None and d.proc.returncode == 0, d.log()
        assert sock.recv(1024) == b"STOPPING=1"
    finally:
        d.kill()


def test_agent_notifies_ready_even_without_a_receiver(tmp_path: Path) -> None:
    sock = notify_socket(tmp_path)
    (tmp_path / "src").mkdir()
    conf = agent_config(tmp_path / "a.toml", receiver_port=free_port(), state=tmp_path / "s",
                        source=tmp_path / "src")
    d = Daemon(["agent", "--config", str(conf)], tmp_path / "a.log",
               env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock")}).start()
    try:
        assert sock.recv(1024) == b"READY=1"
        assert d.stop() == 0, d.log()
    finally:
        d.kill()


def test_second_daemon_on_the_same_state_dir_is_refused(tmp_path: Path) -> None:
    sock = notify_socket(tmp_path)
    conf = receiver_config(tmp_path / "r.toml", listen_port=free_port(), state=tmp_path / "s",
                           mirror_root=tmp_path / "m")
    d = Daemon(["receiver", "--config", str(conf)], tmp_path / "r.log",
               env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock")}).start()
    try:
        assert sock.recv(1024) == b"READY=1"
        r = subprocess.run([sys.executable, "-m", "replicator", "receiver", "--config",
                            str(conf)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2
        assert "in use" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    finally:
        d.kill()


@pytest.mark.parametrize("command", ["receiver", "agent"])
def test_bad_config_exits_2_naming_file_and_key(tmp_path: Path, command: str) -> None:
    conf = tmp_path / "bad.toml"
    conf.write_text('listen = 5\nsource_id = "a b"\n')
    r = subprocess.run([sys.executable, "-m", "replicator", command, "--config", str(conf)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert str(conf) in lines[0]
    assert ("listen" in lines[0]) if command == "receiver" else ("source_id" in lines[0])


def test_unusable_state_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """An index that cannot be opened at start (here a directory where the database should
    be) stops the agent with one line naming it, not a traceback."""
    (tmp_path / "src").mkdir()
    (tmp_path / "s" / "datasets" / "docs" / "index.db").mkdir(parents=True)  # not a file
    conf = agent_config(tmp_path / "a.toml", receiver_port=free_port(), state=tmp_path / "s",
                        source=tmp_path / "src")
    r = subprocess.run([sys.executable, "-m", "replicator", "agent", "--config", str(conf)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("replicator agent: dataset docs: cannot open the agent index"), \
        r.stderr
    assert "Traceback" not in r.stderr


def _dataset_with_mirror_under_a_file(tmp_path: Path) -> None:
    """A dataset the receiver opens at start, whose mirror_root is a file: the config is
    valid, but the mirror's directory cannot be made."""
    (tmp_path / "m").write_text("not a directory")


def _dataset_with_a_corrupt_record(tmp_path: Path) -> None:
    (tmp_path / "s" / "sources" / "app1" / "docs" / "dataset.json").write_text("{torn")


UNEXPECTED = {
    "mirror_root is a file": (_dataset_with_mirror_under_a_file, "NotADirectoryError"),
    "dataset.json is corrupt": (_dataset_with_a_corrupt_record, "JSONDecodeError"),
}


@pytest.mark.parametrize("debug", [False, True], ids=["info", "debug"])
@pytest.mark.parametrize(("provoke", "error"), UNEXPECTED.values(), ids=UNEXPECTED.keys())
def test_unexpected_error_is_one_line_and_exit_2(tmp_path: Path,
                                                 provoke: Callable[[Path], None], error: str,
                                                 debug: bool) -> None:
    """An error no named error covers reaches the CLI's last handler: exit 2 and one line;
    the traceback only at --log-level debug, before that line."""
    conf = receiver_config(tmp_path / "r.toml", listen_port=free_port(), state=tmp_path / "s",
                           mirror_root=tmp_path / "m")
    meta = tmp_path / "s" / "sources" / "app1" / "docs" / "dataset.json"
    meta.parent.mkdir(parents=True)
    meta.write_text('{"source": "app1", "dataset": "docs", "type": "directory"}')
    provoke(tmp_path)
    level = ["--log-level", "debug"] if debug else []
    r = subprocess.run([sys.executable, "-m", "replicator", "receiver", "--config", str(conf),
                        *level], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith(f"replicator receiver: unexpected error: {error}: "), r.stderr
    if debug:
        assert "Traceback (most recent call last):" in r.stderr
        assert "--log-level debug" not in lines[-1]
    else:
        assert len(lines) == 1, r.stderr
        assert lines[0].endswith("(run with --log-level debug for the traceback)")


def test_with_json_logs_the_traceback_is_one_json_line(tmp_path: Path) -> None:
    """A log shipper reading --log-format json gets one object per line, the traceback
    included; the last line is still the contract's one-line reason."""
    conf = receiver_config(tmp_path / "r.toml", listen_port=free_port(), state=tmp_path / "s",
                           mirror_root=tmp_path / "m")
    meta = tmp_path / "s" / "sources" / "app1" / "docs" / "dataset.json"
    meta.parent.mkdir(parents=True)
    _dataset_with_a_corrupt_record(tmp_path)
    r = subprocess.run([sys.executable, "-m", "replicator", "receiver", "--config", str(conf),
                        "--log-level", "debug", "--log-format", "json"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    *logs, last = r.stderr.strip().splitlines()
    assert last.startswith("replicator receiver: unexpected error: JSONDecodeError: ")
    docs = [json.loads(line) for line in logs]  # every line before it is JSON
    tb = [d for d in docs if "traceback" in d]
    assert len(tb) == 1 and tb[0]["traceback"][0] == "Traceback (most recent call last):"
    assert tb[0]["traceback"][-1].startswith("json.decoder.JSONDecodeError")
