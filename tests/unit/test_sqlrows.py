"""Many rows in few statements: every row lands, in order, whatever the count."""

from __future__ import annotations

import sqlite3

import pytest

from replicator.sqlrows import MAX_VARIABLES, execute_values

WIDTH = 3
PER = MAX_VARIABLES // WIDTH  # rows in a full statement


@pytest.fixture
def db() -> sqlite3.Connection:
    db = sqlite3.connect(":memory:", isolation_level=None)
    db.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, a TEXT, b BLOB)")
    return db


@pytest.mark.parametrize("n", [0, 1, PER - 1, PER, PER + 1, 2 * PER + 7])
def test_every_row_lands(db: sqlite3.Connection, n: int) -> None:
    rows = [(i, f"a{i}", bytes([i % 256]) * 3) for i in range(n)]
    statements: list[str] = []
    db.set_trace_callback(statements.append)
    execute_values(db, "INSERT INTO t (k, a, b) VALUES {values}", rows)
    db.set_trace_callback(None)
    assert db.execute("SELECT k, a, b FROM t ORDER BY k").fetchall() == rows
    assert len(statements) == -(-n // PER)  # a statement per PER rows, not one a row


def test_later_rows_replace_earlier_ones_in_order(db: sqlite3.Connection) -> None:
    rows = [(i % 5, f"v{i}", None) for i in range(PER + 12)]  # each key many times
    execute_values(db, "INSERT OR REPLACE INTO t (k, a, b) VALUES {values}", rows)
    expect = {k: a for k, a, _ in rows}  # the last of each key
    assert dict(db.execute("SELECT k, a FROM t").fetchall()) == expect


def test_a_join_with_values(db: sqlite3.Connection) -> None:
    db.executemany("INSERT INTO t (k, a) VALUES (?, ?)", [(1, "one"), (2, "two"), (3, "x")])
    db.execute("CREATE TABLE u (k INTEGER PRIMARY KEY, b BLOB)")
    execute_values(db, "INSERT INTO u (k, b) SELECT t.k, v.column1 FROM (VALUES {values}) "
                   "AS v JOIN t ON t.a = v.column2",
                   [(b"1", "one"), (b"2", "two"), (b"?", "missing")])
    assert db.execute("SELECT k, b FROM u ORDER BY k").fetchall() == [(1, b"1"), (2, b"2")]


def test_rows_of_another_width_are_refused(db: sqlite3.Connection) -> None:
    with pytest.raises(sqlite3.ProgrammingError):
        execute_values(db, "INSERT INTO t (k, a, b) VALUES {values}", [(1, "a", None), (2, "b")])
