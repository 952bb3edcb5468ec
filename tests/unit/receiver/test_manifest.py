"""The manifest: entries, trees, pending changes, durability of positions."""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from replicator.receiver.manifest import (
    DEFAULT_EPOCH,
    SCHEMA_VERSION,
    Manifest,
    ManifestEntry,
    ManifestError,
)

PATHS = ["a", "a/b", "a/b/c", "a-b", "a.b", "a0", "a/", "ab", "b", "b/a"]
# What stands in for "a" in the tree tests: itself, a byte that is not UTF-8 (a name as
# os.fsdecode gives it), and a two-byte UTF-8 letter followed by another such byte.
SPELLINGS = ["a", "\udcff", "é\udc80"]


def spell(paths: set[str] | list[str], a: str) -> set[str]:
    return {p.replace("a", a) for p in paths}


def file_entry(path: str, size: int = 3) -> ManifestEntry:
    return ManifestEntry(path, "file", size=size, mode=0o100644, mtime_ns=123_456_789_012,
                         digest=b"d" * 16, hashes=b"h" * 16)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Manifest]:
    m = Manifest(tmp_path / "state" / "manifest.db")
    try:
        yield m
    finally:
        m.close()


def paths(m: Manifest) -> list[str]:
    return [e.path for e in m.entries()]


def test_new_manifest_starts_at_zero(db: Manifest) -> None:
    assert (db.applied_lsn, db.epoch, db.dirty) == (0, DEFAULT_EPOCH, False)
    assert db.get("a") is None
    assert list(db.entries()) == []


@pytest.mark.parametrize("entry", [
    file_entry("dir/f"),
    ManifestEntry("d", "dir", mode=0o40755, mtime_ns=1_700_000_000_123_456_789),
    ManifestEntry("l", "symlink", size=5, mode=0o120777, mtime_ns=7, target="../x"),
    ManifestEntry("empty", "file", size=0, mode=0o100600, mtime_ns=0, digest=b"\0" * 16,
                  hashes=b""),
    ManifestEntry("naïve ☃/ü", "dir", mode=0o40700, mtime_ns=-5),
    file_entry(os.fsdecode(b"\x80dir/\xff\xfe.bin")),
    ManifestEntry(os.fsdecode(b"l\xfa"), "symlink", size=7, mode=0o120777, mtime_ns=1,
                  target=os.fsdecode(b"../\xff\xfe")),
])
def test_entry_round_trips_through_a_reopen(tmp_path: Path, entry: ManifestEntry) -> None:
    m = Manifest(tmp_path / "m.db")
    m.put(entry)
    assert m.get(entry.path) == entry  # pending changes are visible at once
    m.commit(9)
    m.close()
    m = Manifest(tmp_path / "m.db")
    assert m.get(entry.path) == entry
    assert m.applied_lsn == 9
    assert list(m.entries()) == [entry]
    m.close()


def test_put_refuses_an_unknown_kind(db: Manifest) -> None:
    with pytest.raises(ValueError):
        db.put(ManifestEntry("x", "fifo"))  # type: ignore[arg-type]


@pytest.mark.parametrize("a", SPELLINGS)
@pytest.mark.parametrize("root, gone", [
    ("a", {"a", "a/b", "a/b/c", "a/"}),   # "a/" is below "a" by prefix; never a real path
    ("a/b", {"a/b", "a/b/c"}),
    ("a/b/c", {"a/b/c"}),
    ("b", {"b", "b/a"}),
    ("zz", set()),
    ("a-b", {"a-b"}),                    # siblings that sort inside "a/".."a0" stay
])
def test_delete_tree_takes_the_path_and_what_is_below(db: Manifest, root: str,
                                                      gone: set[str], a: str) -> None:
    all_paths = spell(PATHS, a)
    for p in all_paths:
        db.put(file_entry(p))
    assert db.delete_tree(root.replace("a", a)) == len(gone)
    assert {p for p in all_paths if db.get(p) is not None} == all_paths - spell(gone, a)


@pytest.mark.parametrize("a", SPELLINGS)
@pytest.mark.parametrize("old, new, expect", [
    ("a", "x", {"x", "x/b", "x/b/c", "x/", "a-b", "a.b", "a0", "ab", "b", "b/a"}),
    ("a/b", "c", {"a", "c", "c/c", "a/", "a-b", "a.b", "a0", "ab", "b", "b/a"}),
    # onto an existing tree: what was there goes, as with rename(2)
    ("a", "b", {"b", "b/b", "b/b/c", "b/", "a-b", "a.b", "a0", "ab"}),
    ("ab", "a0", {"a", "a/b", "a/b/c", "a/", "a-b", "a.b", "a0", "b", "b/a"}),
    ("a", "a", set(PATHS)),
])
def test_move_tree(db: Manifest, old: str, new: str, expect: set[str], a: str) -> None:
    old, new = old.replace("a", a), new.replace("a", a)
    for p in spell(PATHS, a):
        db.put(file_entry(p, size=len(p)))
    db.move_tree(old, new)
    db.commit(1)
    entries = {e.path: e for e in db.entries()}
    assert set(entries) == spell(expect, a)
    # moved rows stay BLOBs: a TEXT path would no longer be found by its bytes
    assert {r[0] for r in db._db.execute("SELECT DISTINCT typeof(path) FROM files")} \
        <= {"blob"}
    assert all(db.get(p) == e for p, e in entries.items())
    # entries keep their data under the new name
    for path, e in entries.items():
        origin = old + path[len(new):] if path == new or path.startswith(new + "/") else path
        assert e.size == len(origin)


def model_apply(ops: list[tuple[str, str]]) -> set[str]:
    """What running `ops` one at a time leaves: the reference for the batched puts."""
    have: set[str] = set()
    for op, path in ops:
        if op == "replacing":
            have = {p for p in have if not p.startswith(path + "/")}
        elif op == "delete":
            have = {p for p in have if p != path and not p.startswith(path + "/")}
        if op != "delete":
            have.add(path)
    return have


@pytest.mark.parametrize("a", SPELLINGS)
@pytest.mark.parametrize("ops", [
    # a file replaces a directory whose entries are in the same batch: they go
    [("put", "a/b/c"), ("put", "a/b"), ("replacing", "a")],
    [("replacing", "a/b/c"), ("replacing", "a")],
    [("replacing", "a/b/c"), ("replacing", "a/b"), ("replacing", "b"), ("replacing", "a")],
    # ... and entries put again after the replacement stay
    [("put", "a/b"), ("replacing", "a"), ("put", "a/b"), ("put", "a/b/c")],
    # a delete below a sibling ("a-b" sorts between "a/" and "a0") or a prefix takes nothing
    [("put", "a-b"), ("put", "ab"), ("put", "a.b"), ("replacing", "a")],
    # pending rows, then a tree delete and move in between
    [("put", "a/b"), ("put", "b/a"), ("delete", "a"), ("replacing", "a/b"), ("put", "a0")],
    # the same path over and over: the last put wins
    [("replacing", "a"), ("put", "a"), ("replacing", "a")],
])
def test_batched_puts_end_as_puts_in_order_do(tmp_path: Path, ops: list[tuple[str, str]],
                                              a: str) -> None:
    ops = [(op, p.replace("a", a)) for op, p in ops]
    m = Manifest(tmp_path / "m.db")
    for op, path in ops:
        if op == "delete":
            m.delete_tree(path)
        elif op == "put":
            m.put(file_entry(path, size=len(ops)))
        else:
            m.put_replacing(file_entry(path, size=len(ops)))
    assert {p for p in model_apply(ops) if m.get(p) is not None} == model_apply(ops)
    m.commit(1)
    m.close()
    m = Manifest(tmp_path / "m.db")
    assert set(paths(m)) == model_apply(ops)
    m.close()


def test_put_file_is_put_replacing_of_a_file(db: Manifest) -> None:
    db.put(file_entry("a/b"))
    db.put_file("a", 3, 0o100644, 123_456_789_012, b"d" * 16, b"h" * 16)
    assert paths(db) == [] and db.get("a/b") is None
    assert db.get("a") == file_entry("a")


def test_pending_puts_stay_bounded(db: Manifest) -> None:
    from replicator.receiver.manifest import PENDING_ROWS

    for i in range(PENDING_ROWS * 2 + 5):
        db.put_file(f"d/{i}", 3, 0o100644, 1, b"d" * 16, b"h" * 16)
        assert len(db._rows) < PENDING_ROWS
    db.commit(1)
    assert len(paths(db)) == PENDING_ROWS * 2 + 5


def test_of_puts_of_one_path_in_a_batch_the_last_counts(db: Manifest) -> None:
    # rows go to SQLite many to a statement (sqlrows): more than one statement's worth
    for i in range(400):
        db.put_file(f"d/{i % 7}", i, 0o100644, 1, b"d" * 16, b"h" * 16)
    db.commit(1)
    for k in range(7):
        entry = db.get(f"d/{k}")
        assert entry is not None and entry.size == max(i for i in range(400) if i % 7 == k)


def test_a_failed_write_makes_commit_refuse(tmp_path: Path) -> None:
    m = Manifest(tmp_path / "m.db")
    m.put(file_entry("kept"))
    m.commit(1)
    pages = m._db.execute("PRAGMA page_count").fetchone()[0]
    m._db.execute(f"PRAGMA max_page_count = {pages + 1}")  # the database is full
    with pytest.raises(sqlite3.OperationalError):
        for i in range(10_000):
            m.put_file(f"big/{i:05d}", 3, 0o100644, 1, b"d" * 16, b"h" * 4096)
        m.get("x")
    # what the transaction holds is unknown (SQLite may have rolled it back, and a write
    # would then autocommit): nothing may be written, read or committed over it
    m._db.execute("PRAGMA max_page_count = 1000000")  # room again: refused all the same
    for attempt in (lambda: m.commit(2), lambda: m.put(file_entry("late")),
                    lambda: m.put_file("late", 1, 0o100644, 1, b"d" * 16, b""),
                    lambda: m.delete_tree("kept"), lambda: m.get("kept"), lambda: m.commit(2)):
        with pytest.raises(sqlite3.OperationalError):
            attempt()
    m.close()
    m = Manifest(tmp_path / "m.db")
    assert (m.applied_lsn, paths(m)) == (1, ["kept"])
    m.close()


@pytest.mark.parametrize("old, new", [("a", "a/b"), ("a/b", "a")])
def test_move_tree_into_itself_is_refused(db: Manifest, old: str, new: str) -> None:
    with pytest.raises(ValueError):
        db.move_tree(old, new)


def test_entries_are_in_byte_order(db: Manifest) -> None:
    # str order would put "ü" (U+00FC) before the escaped bytes (U+DC80, U+DCFF)
    names = [b"a", b"\x80", "ü".encode(), b"\xff", b"\xff/x"]
    for raw in reversed(names):
        db.put(file_entry(os.fsdecode(raw)))
    db.commit(1)
    assert [os.fsencode(p) for p in paths(db)] == names


def test_set_attrs_updates_only_mode_and_mtime(db: Manifest) -> None:
    db.put(file_entry("f"))
    got = db.set_attrs("f", 0o100600, 42)
    assert got == ManifestEntry("f", "file", size=3, mode=0o100600, mtime_ns=42,
                                digest=b"d" * 16, hashes=b"h" * 16)
    assert db.get("f") == got
    assert db.set_attrs("missing", 0o600, 1) is None


def test_close_without_commit_discards_pending_changes(tmp_path: Path) -> None:
    m = Manifest(tmp_path / "m.db")
    m.put(file_entry("kept"))
    m.commit(3)
    m.put(file_entry("lost"))
    m.delete_tree("kept")
    assert m.dirty
    m.close()
    m = Manifest(tmp_path / "m.db")
    assert paths(m) == ["kept"]
    assert m.applied_lsn == 3
    m.close()


def test_rollback_discards_pending_changes(db: Manifest) -> None:
    db.put(file_entry("a"))
    db.commit(1)
    db.put(file_entry("b"))
    db.rollback()
    assert db.get("b") is None and db.get("a") is not None and not db.dirty


def test_commit_sets_epoch_and_lsn_durably(tmp_path: Path) -> None:
    m = Manifest(tmp_path / "m.db")
    m.commit(5, epoch=3)
    m.commit(7)
    assert (m.applied_lsn, m.epoch) == (7, 3)
    m.close()
    m = Manifest(tmp_path / "m.db")
    assert (m.applied_lsn, m.epoch) == (7, 3)
    m.close()


def test_entries_see_the_committed_state_only(db: Manifest) -> None:
    db.put(file_entry("a"))
    db.commit(1)
    db.put(file_entry("b"))
    assert paths(db) == ["a"]
    db.commit(2)
    assert paths(db) == ["a", "b"]


def test_entries_stream_a_snapshot_while_the_writer_commits(db: Manifest) -> None:
    n = 2500  # more than one fetch
    for i in range(n):
        db.put(file_entry(f"d/{i:05d}"))
    db.commit(1)
    it = db.entries()
    first = next(it)
    # another thread writes and commits while the reader is half way
    def write() -> None:
        db.delete_tree("d")
        db.commit(2)

    t = threading.Thread(target=write)
    t.start()
    t.join(timeout=10)
    assert not t.is_alive()
    rest = list(it)
    assert len(rest) + 1 == n and first.path == "d/00000"
    assert paths(db) == []


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    m = Manifest(tmp_path / "m.db")
    m._db.execute("UPDATE meta SET value = 99 WHERE key = 'schema'")
    m.close()
    with pytest.raises(ManifestError, match="schema 99"):
        Manifest(tmp_path / "m.db")


SCHEMA_1 = """
CREATE TABLE files (
    path TEXT PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('file', 'dir', 'symlink')),
    size INTEGER NOT NULL DEFAULT 0,
    mode INTEGER NOT NULL DEFAULT 0,
    mtime_ns INTEGER NOT NULL DEFAULT 0,
    digest BLOB,
    hashes BLOB,
    target TEXT
) WITHOUT ROWID;
CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
INSERT INTO meta VALUES ('schema', 1), ('applied_lsn', 41), ('epoch', 3);
"""


def test_a_schema_1_manifest_is_converted_in_place(tmp_path: Path) -> None:
    old = [file_entry("d/ü"), file_entry("d-x"),
           ManifestEntry("d", "dir", mode=0o40755, mtime_ns=5),
           ManifestEntry("d/l", "symlink", size=5, mode=0o120777, mtime_ns=6, target="../☃")]
    db = sqlite3.connect(tmp_path / "m.db")
    db.executescript(SCHEMA_1)
    db.executemany("INSERT INTO files VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                   [(e.path, e.kind, e.size, e.mode, e.mtime_ns, e.digest, e.hashes, e.target)
                    for e in old])
    db.commit()
    db.close()
    m = Manifest(tmp_path / "m.db")
    try:
        assert (m.applied_lsn, m.epoch) == (41, 3)
        assert list(m.entries()) == sorted(old, key=lambda e: e.path.encode())
        assert m.delete_tree("d") == 3  # the tree range works on the converted rows
        m.commit(42)
    finally:
        m.close()
    m = Manifest(tmp_path / "m.db")
    try:
        assert paths(m) == ["d-x"]
        schema = m._db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()[0]
        assert schema == SCHEMA_VERSION
    finally:
        m.close()
