"""The guard's files: the allow-empty confirmation (written durably, read back, void when
expired or not one) and the root's mount point."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from replicator.agent import guard
from replicator.agent.guard import (
    ALLOW_EMPTY_TTL,
    CONFIRMATION_FILE,
    BadConfirmation,
    Confirmation,
    discard,
    grant,
    mount_point,
    read,
    record_mount_point,
    recorded_mount_point,
)

T0 = 1_764_000_000.0


def test_grant_then_read_gives_it_back(tmp_path: Path) -> None:
    c = grant(tmp_path, "docs", now=T0)
    assert read(tmp_path) == c == Confirmation("docs", T0)
    assert stat.S_IMODE(os.stat(tmp_path / CONFIRMATION_FILE).st_mode) == guard.FILE_MODE
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIRMATION_FILE], "no temp file left"


def test_a_newer_grant_replaces_the_older(tmp_path: Path) -> None:
    grant(tmp_path, "docs", now=T0)
    grant(tmp_path, "docs", now=T0 + 5)
    assert read(tmp_path) == Confirmation("docs", T0 + 5)


def test_none_and_discard(tmp_path: Path) -> None:
    assert read(tmp_path) is None
    discard(tmp_path)  # missing is fine
    grant(tmp_path, "docs", now=T0)
    discard(tmp_path)
    assert read(tmp_path) is None


def test_grant_into_a_missing_directory_fails_and_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        grant(tmp_path / "missing", "docs")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(("age", "fresh"), [
    (0.0, True),
    (ALLOW_EMPTY_TTL - 1, True),
    (ALLOW_EMPTY_TTL, True),                # at the limit is within it
    (ALLOW_EMPTY_TTL + 0.5, False),         # expired
    (10 * ALLOW_EMPTY_TTL, False),
    (-5.0, True),                           # the clock stepped back a little
    (-ALLOW_EMPTY_TTL - 1, False),          # "from the future": the clock cannot be trusted
])
def test_a_confirmation_expires(tmp_path: Path, age: float, fresh: bool) -> None:
    grant(tmp_path, "docs", now=T0)
    c = read(tmp_path)
    assert c is not None and c.age(T0 + age) == pytest.approx(age)
    assert c.fresh(T0 + age) is fresh


@pytest.mark.parametrize(("content", "message"), [
    (b"", "not JSON"),
    (b"{", "not JSON"),
    (b"[]", "not an allow-empty"),
    (json.dumps({"kind": "other", "version": 1}).encode(), "not an allow-empty"),
    (json.dumps({"kind": guard.KIND, "version": 2, "dataset": "docs",
                 "granted_at": T0}).encode(), "version 2"),
    (json.dumps({"kind": guard.KIND, "version": 1, "granted_at": T0}).encode(),
     "missing"),
    (json.dumps({"kind": guard.KIND, "version": 1, "dataset": "docs",
                 "granted_at": "now"}).encode(), "missing"),
    (json.dumps({"kind": guard.KIND, "version": 1, "dataset": "docs",
                 "granted_at": True}).encode(), "missing"),
    (b" " * (guard.MAX_FILE_BYTES + 1), "bytes"),
])
def test_what_is_not_a_confirmation_is_refused(tmp_path: Path, content: bytes,
                                               message: str) -> None:
    (tmp_path / CONFIRMATION_FILE).write_bytes(content)
    with pytest.raises(BadConfirmation, match=message):
        read(tmp_path)


def test_the_mount_point_holds_the_root_on_its_file_system(tmp_path: Path) -> None:
    root = tmp_path / "a" / "b"
    root.mkdir(parents=True)
    mount = mount_point(root)
    real = os.path.realpath(os.fsencode(root))
    assert real == mount or real.startswith(mount.rstrip(b"/") + b"/")
    assert os.stat(mount).st_dev == os.stat(root).st_dev
    parent = os.path.dirname(mount)
    assert parent == mount or os.stat(parent).st_dev != os.stat(mount).st_dev
    assert mount_point(tmp_path / "a") == mount


def test_proc_is_its_own_mount_point() -> None:
    if not os.path.ismount("/proc"):
        pytest.skip("no /proc mount here")
    assert mount_point(Path("/proc/self/..")) == b"/proc"


@pytest.mark.parametrize(("content", "expected"), [
    (None, None),
    (b"/srv", b"/srv"),
    (b"/srv/\xff", b"/srv/\xff"),          # a path is bytes
    (b"", None),
    (b"relative", None),
    (b"/" * (guard.MAX_FILE_BYTES + 1), None),
])
def test_recorded_mount_point(tmp_path: Path, content: bytes | None,
                              expected: bytes | None) -> None:
    if content is not None:
        (tmp_path / guard.ROOT_MOUNT_FILE).write_bytes(content)
    assert recorded_mount_point(tmp_path) == expected


def test_record_mount_point_replaces_it(tmp_path: Path) -> None:
    record_mount_point(tmp_path, b"/srv")
    record_mount_point(tmp_path, b"/")
    assert recorded_mount_point(tmp_path) == b"/"
    assert sorted(p.name for p in tmp_path.iterdir()) == [guard.ROOT_MOUNT_FILE]
