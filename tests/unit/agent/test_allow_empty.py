"""The allow-empty confirmation file: written durably, read back, void when expired or not
one, used up once."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from replicator.agent import allow_empty
from replicator.agent.allow_empty import (
    ALLOW_EMPTY_TTL,
    FILE_NAME,
    BadConfirmation,
    Confirmation,
    discard,
    grant,
    read,
)

T0 = 1_764_000_000.0


def test_grant_then_read_gives_it_back(tmp_path: Path) -> None:
    c = grant(tmp_path, "docs", now=T0)
    assert read(tmp_path) == c == Confirmation("docs", T0)
    assert stat.S_IMODE(os.stat(tmp_path / FILE_NAME).st_mode) == allow_empty.FILE_MODE
    assert sorted(p.name for p in tmp_path.iterdir()) == [FILE_NAME], "no temp file left"


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
    (json.dumps({"kind": allow_empty.KIND, "version": 2, "dataset": "docs",
                 "granted_at": T0}).encode(), "version 2"),
    (json.dumps({"kind": allow_empty.KIND, "version": 1, "granted_at": T0}).encode(),
     "missing"),
    (json.dumps({"kind": allow_empty.KIND, "version": 1, "dataset": "docs",
                 "granted_at": "now"}).encode(), "missing"),
    (json.dumps({"kind": allow_empty.KIND, "version": 1, "dataset": "docs",
                 "granted_at": True}).encode(), "missing"),
    (b" " * (allow_empty.MAX_FILE_BYTES + 1), "bytes"),
])
def test_what_is_not_a_confirmation_is_refused(tmp_path: Path, content: bytes,
                                               message: str) -> None:
    (tmp_path / FILE_NAME).write_bytes(content)
    with pytest.raises(BadConfirmation, match=message):
        read(tmp_path)
