"""`replicator status`: the verdict (exit code) and the table, from status documents."""

from __future__ import annotations

from typing import Any

import pytest

from replicator.cli.status import check, render, status_url


def row(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "source": "app1", "dataset": "docs", "type": "directory", "state": "streaming",
        "epoch": 1, "written_lsn": 7, "flushed_lsn": 7, "applied_lsn": 6,
        "write_lag_seconds": 0.0, "flush_lag_seconds": 0.0, "replay_lag_seconds": 0.25,
        "pending_bytes": 4096, "pending_changes": 1, "last_applied_at": 99.0,
        "last_contact_at": 99.5}
    base.update(kw)
    return base


def doc(*rows: dict[str, Any]) -> dict[str, Any]:
    return {"role": "receiver", "version": "0.1.0", "now": 100.0, "datasets": list(rows)}


@pytest.mark.parametrize(("rows", "max_lag", "problems"), [
    ([row()], None, []),
    ([row()], 1.0, []),
    ([row(replay_lag_seconds=1.0)], 1.0, []),                 # at the limit is within it
    ([row(replay_lag_seconds=2.5)], 1.0, ["app1/docs: replay lag 2.5s is above 1.0s"]),
    ([row(state="catching_up", replay_lag_seconds=30.0)], None, []),
    ([row(state="starting")], None, []),
    ([row(state="disconnected", replay_lag_seconds=None)], None, ["app1/docs is disconnected"]),
    ([row(state="error", error="disk full")], None, ["app1/docs is error: disk full"]),
    ([row(state="promoted")], None, ["app1/docs is promoted"]),
    ([row(replay_lag_seconds=None)], None, ["app1/docs: replay lag unknown"]),
    ([row(), row(dataset="db", state="disconnected")], 5.0, ["app1/db is disconnected"]),
    ([], 1.0, []),                                            # nothing to be behind
])
def test_check(rows: list[dict[str, Any]], max_lag: float | None, problems: list[str]) -> None:
    assert check(doc(*rows), max_lag) == problems


def test_table_has_the_columns_and_ages() -> None:
    text = render(doc(row(), row(dataset="db", state="disconnected", replay_lag_seconds=None,
                                 last_contact_at=None)))
    lines = text.splitlines()
    assert lines[0] == "receiver 0.1.0"
    assert lines[1].split() == ["SOURCE", "DATASET", "STATE", "APPLIED", "WRITE", "LAG",
                                "FLUSH", "LAG", "REPLAY", "LAG", "PENDING", "LAST", "CONTACT"]
    assert lines[2].split() == ["app1", "docs", "streaming", "6", "0ms", "0ms", "250ms",
                                "4.0KiB", "/", "1", "500ms", "ago"]
    assert lines[3].split()[:3] == ["app1", "db", "disconnected"]
    assert lines[3].split()[-1] == "never"


def test_no_datasets() -> None:
    assert render(doc()) == "receiver 0.1.0: no datasets"


@pytest.mark.parametrize(("given", "url"), [
    ("http://127.0.0.1:9465", "http://127.0.0.1:9465/status"),
    ("http://127.0.0.1:9465/", "http://127.0.0.1:9465/status"),
    ("127.0.0.1:9464", "http://127.0.0.1:9464/status"),
    ("http://h:1/status", "http://h:1/status"),
])
def test_status_url(given: str, url: str) -> None:
    assert status_url(given) == url
