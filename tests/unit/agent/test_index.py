"""Tests of the agent's index (SQLite) and view (index + records in flight)."""

from __future__ import annotations

import itertools
import os
import random
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from replicator.agent.index import (
    KIND_DIR,
    KIND_FILE,
    KIND_SYMLINK,
    Entry,
    Index,
    Move,
    Mutation,
    Put,
    Remove,
    Sending,
    View,
)

_inos = itertools.count(1000)


def entry(kind: str = KIND_FILE, ino: int | None = None, size: int = 0,
          target: str = "") -> Entry:
    return Entry(kind=kind, size=size, mtime_ns=1_700_000_000_000_000_000 + size,
                 ctime_ns=1_700_000_000_000_000_001, ino=next(_inos) if ino is None else ino,
                 mode=0o100644 if kind == KIND_FILE else 0o40755, uid=1000, gid=1000,
                 target=target, digest=b"d" * 16 if kind == KIND_FILE else b"",
                 stat_ns=1_700_000_000_500_000_000, xattr_digest=b"")


def F(path: str, ino: int, hashes: bytes | None = None) -> Put:  # noqa: N802
    return Put(path, entry(KIND_FILE, ino, size=ino), hashes)


def D(path: str, ino: int) -> Put:  # noqa: N802
    return Put(path, entry(KIND_DIR, ino))


def state(view: View) -> dict[str, tuple[str, int]]:
    out = {}
    for p in view.paths():
        e = view.get(p)
        assert e is not None
        out[p] = (e.kind, e.ino)
    return out


def index_state(index: Index) -> dict[str, tuple[str, int]]:
    return {p: (e.kind, e.ino) for p, e in index.load().items()}


def assert_consistent(view: View) -> None:
    """children() and by_inode() agree with the set of paths."""
    paths = list(view.paths())
    want_children: dict[str, set[str]] = {}
    for p in paths:
        while p:
            parent, _, name = p.rpartition("/")
            want_children.setdefault(parent, set()).add(name)
            p = parent
    for d in {"", *paths, *want_children}:
        got = view.children(d)
        assert len(got) == len(set(got))
        assert set(got) == want_children.get(d, set()), d
    want_inodes: dict[int, set[str]] = {}
    for p in paths:
        e = view.get(p)
        assert e is not None
        want_inodes.setdefault(e.ino, set()).add(p)
    for ino, ps in want_inodes.items():
        assert sorted(view.by_inode(ino)) == sorted(ps)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state" / "docs" / "index.sqlite"


@pytest.fixture
def index(db: Path) -> Iterator[Index]:
    ix = Index(db)
    yield ix
    ix.close()


def reopened(db: Path) -> tuple[dict[str, tuple[str, int]], int]:
    with Index(db) as ix:
        view = View(ix)
        assert_consistent(view)
        return state(view), ix.acked_lsn


# Siblings whose names sort right around the range bounds of "a" ('/' < '0'): subtree
# operations on "a" must never touch them.
SIBLINGS = [F("a.txt", 91), F("a-b", 92), F("a0", 93), F("ab", 94),
            F(os.fsdecode(b"a\xff"), 95)]
SIBLING_STATE = {m.path: (KIND_FILE, m.entry.ino) for m in SIBLINGS}

CASES = [
    pytest.param(
        [], [D("a", 1), D("a/b", 2), F("a/b/f", 3), F("top", 4)],
        {"a": (KIND_DIR, 1), "a/b": (KIND_DIR, 2), "a/b/f": (KIND_FILE, 3),
         "top": (KIND_FILE, 4)}, id="put-nested"),
    pytest.param(
        [D("a", 1), F("a/f", 2), F("a/g", 3)], [Remove("a/f")],
        {"a": (KIND_DIR, 1), "a/g": (KIND_FILE, 3)}, id="remove-file"),
    pytest.param(
        [D("a", 1), D("a/b", 2), F("a/b/f", 3), D("a/b/c", 4), F("a/b/c/g", 5), *SIBLINGS],
        [Remove("a")], SIBLING_STATE, id="remove-nested-dir"),
    pytest.param(
        [F("x", 1)], [Remove("missing"), Remove("x/y")], {"x": (KIND_FILE, 1)},
        id="remove-missing"),
    pytest.param(
        [D("a", 1), F("a/f", 2), D("b", 3)], [Move("a/f", "b/g")],
        {"a": (KIND_DIR, 1), "b": (KIND_DIR, 3), "b/g": (KIND_FILE, 2)}, id="move-file"),
    pytest.param(
        [D("a", 1), D("a/b", 2), F("a/b/f", 3), *SIBLINGS], [Move("a", "z")],
        {"z": (KIND_DIR, 1), "z/b": (KIND_DIR, 2), "z/b/f": (KIND_FILE, 3), **SIBLING_STATE},
        id="move-nested-dir"),
    pytest.param(
        [F("x", 1), F("y", 2)], [Move("x", "y")], {"y": (KIND_FILE, 1)},
        id="move-replaces-file"),
    pytest.param(
        [D("a", 1), F("a/f", 2), D("b", 3), F("b/g", 4), D("b/c", 5), F("b/c/h", 6)],
        [Move("a", "b")], {"b": (KIND_DIR, 1), "b/f": (KIND_FILE, 2)},
        id="move-replaces-subtree"),
    pytest.param(
        [D("a", 1), F("a/f", 2), D("ab", 3), F("ab/g", 4)], [Move("a", "ab")],
        {"ab": (KIND_DIR, 1), "ab/f": (KIND_FILE, 2)}, id="move-onto-prefix-sibling"),
    pytest.param(
        [D("a", 1), F("a/f", 2)], [Move("a", "b"), Move("b", "c")],
        {"c": (KIND_DIR, 1), "c/f": (KIND_FILE, 2)}, id="move-twice"),
    pytest.param(
        [F("x", 1), F("y", 2)], [Move("nope", "y"), Move("x", "x")],
        {"x": (KIND_FILE, 1), "y": (KIND_FILE, 2)}, id="move-missing-or-same"),
    pytest.param(
        [D("a", 1), F("a/f", 2)], [F("a", 7)], {"a": (KIND_FILE, 7)},
        id="file-over-dir-drops-subtree"),
    pytest.param(
        [D("a", 1), F("a/f", 2)], [D("a", 9)], {"a": (KIND_DIR, 9), "a/f": (KIND_FILE, 2)},
        id="dir-over-dir-keeps-children"),
    pytest.param(
        [F("l", 1)], [Put("l", entry(KIND_SYMLINK, 8, target="../x"))],
        {"l": (KIND_SYMLINK, 8)}, id="symlink-over-file"),
    pytest.param(
        [F("p/q/f", 1), F("p/r", 2)], [Remove("p/q")], {"p/r": (KIND_FILE, 2)},
        id="implicit-parents-remove"),
    pytest.param(
        [F("p/q/f", 1)], [Move("p", "s")], {"s/q/f": (KIND_FILE, 1)},
        id="implicit-parents-move"),
    pytest.param(
        [D("a", 1), F("a/f", 2)], [Remove("a"), D("a", 3), F("a/new", 4)],
        {"a": (KIND_DIR, 3), "a/new": (KIND_FILE, 4)}, id="remove-then-recreate"),
]


@pytest.mark.parametrize("one_record", [False, True], ids=["lsn-each", "one-lsn"])
@pytest.mark.parametrize(("setup", "mutations", "want"), CASES)
def test_mutations_in_view_and_after_ack(
    db: Path, setup: list[Mutation], mutations: list[Mutation],
    want: dict[str, tuple[str, int]], one_record: bool,
) -> None:
    with Index(db) as ix:
        view = View(ix)
        view.record(1, setup)
        view.acked(1)
        before = state(view)
        batches = [mutations] if one_record else [[m] for m in mutations]
        for lsn, batch in enumerate(batches, start=2):
            view.record(lsn, batch)
        assert state(view) == want
        assert_consistent(view)
        # nothing in flight reaches the index before its ack
        assert index_state(ix) == before
        assert reopened(db) == (before, 1)
        view.acked(view.last_lsn)
        assert view.in_flight == 0
        assert state(view) == want
        assert_consistent(view)
    assert reopened(db) == (want, len(batches) + 1)


def test_hashes_in_flight_then_acked(index: Index) -> None:
    view = View(index)
    view.record(1, [F("f", 1, b"h1" * 8), D("d", 2), F("nohash", 3)])
    assert view.hashes("f") == b"h1" * 8
    assert index.hashes("f") is None   # in flight only
    view.acked(1)
    assert index.hashes("f") == b"h1" * 8
    assert view.hashes("f") == b"h1" * 8
    assert view.hashes("d") is None
    assert view.hashes("nohash") is None
    assert view.hashes("missing") is None
    # acknowledged hashes are not kept in memory
    assert view._pending == {}
    view.record(2, [F("f", 1, b"h2" * 8)])
    assert view.hashes("f") == b"h2" * 8
    assert index.hashes("f") == b"h1" * 8
    view.acked(2)
    assert index.hashes("f") == b"h2" * 8
    assert view._pending == {}


def test_many_files_in_one_ack_and_a_path_put_twice(db: Path, index: Index) -> None:
    """Acks of many new files go to SQLite many files to a statement (sqlrows): every
    file lands, and of two puts of one path in the same ack the later one counts."""
    view = View(index)
    files = [F(f"d/f{i:04d}", i, b"%08d" % i * 2) for i in range(500)]
    view.record(1, files[:250])
    view.record(2, [F("d/f0007", 9999, b"later" * 3)] + files[250:])
    view.acked(2)
    want = {m.path: (KIND_FILE, m.entry.ino) for m in files} | {"d/f0007": (KIND_FILE, 9999)}
    assert index_state(index) == want
    assert index.hashes("d/f0007") == b"later" * 3
    assert index.hashes("d/f0499") == b"%08d" % 499 * 2
    assert reopened(db) == (want, 2)


@pytest.mark.parametrize(("replacement", "want"), [
    (D("f", 9), None),                      # a dir over the file: no hashes
    (F("f", 9), None),                      # a file put without hashes has none
    (Remove("f"), None),
    (F("f", 9, b"new"), b"new"),
], ids=["dir", "file-none", "remove", "file-new"])
def test_hashes_replaced(index: Index, replacement: Mutation, want: bytes | None) -> None:
    view = View(index)
    view.record(1, [F("f", 1, b"old")])
    view.acked(1)
    view.record(2, [replacement])
    assert view.hashes("f") == want
    view.acked(2)
    assert view.hashes("f") == want
    assert index.hashes("f") == want


def test_hashes_follow_moves(index: Index) -> None:
    view = View(index)
    view.record(1, [D("a", 1), F("a/acked", 2, b"acked"), F("a/inner", 3, b"x")])
    view.acked(1)
    view.record(2, [F("a/inflight", 4, b"inflight"), F("a/inner", 3, b"inner2")])
    view.record(3, [Move("a", "b")])
    assert view.hashes("b/acked") == b"acked"         # read from the index at a/acked
    assert view.hashes("b/inflight") == b"inflight"   # carried in memory
    assert view.hashes("b/inner") == b"inner2"
    assert view.hashes("a/acked") is None
    view.record(4, [Move("b/acked", "c")])
    assert view.hashes("c") == b"acked"
    view.acked(2)
    assert view.hashes("c") == b"acked"
    view.acked(3)
    assert view.hashes("c") == b"acked"                # now read at b/acked
    view.acked(4)
    assert view.hashes("c") == b"acked"
    assert index.hashes("c") == b"acked"
    assert view._pending == {}


def test_hashes_chain_survives_partial_ack(index: Index) -> None:
    """x moves to p, a new x appears, p moves to q: until the last move is acked the
    index holds q's hashes at x, then at p."""
    view = View(index)
    view.record(1, [F("x", 1, b"first")])
    view.acked(1)
    view.record(2, [Move("x", "p")])
    view.record(3, [F("x", 2, b"second")])
    view.record(4, [Move("p", "q")])
    for acked in (1, 2, 3, 4):
        view.acked(acked)
        assert view.hashes("q") == b"first", acked
        assert view.hashes("x") == b"second", acked


def test_ack_commits_up_to_lsn_only(db: Path, index: Index) -> None:
    view = View(index)
    view.record(1, [F("one", 1)])
    view.record(2, [F("two", 2)])
    view.record(3, [Remove("one")])
    assert view.in_flight == 3
    view.acked(2)
    assert view.in_flight == 1
    assert index.acked_lsn == 2
    assert reopened(db) == ({"one": (KIND_FILE, 1), "two": (KIND_FILE, 2)}, 2)
    view.acked(1)   # stale: nothing happens
    assert index.acked_lsn == 2
    assert view.in_flight == 1
    # an ack above anything recorded (records of an earlier run) moves acked_lsn
    view.acked(7)
    assert index.acked_lsn == 7
    assert view.in_flight == 0
    assert reopened(db) == ({"two": (KIND_FILE, 2)}, 7)
    with pytest.raises(ValueError):
        view.record(7, [])
    view.record(8, [])


def test_rewind_drops_in_flight_and_restores_index_state(db: Path, index: Index) -> None:
    view = View(index)
    view.record(1, [D("a", 1), F("a/f", 2, b"f1")])
    view.acked(1)
    view.record(2, [F("a/g", 3, b"g")])
    view.record(3, [Move("a", "b"), F("b/f", 2, b"f2")])
    view.record(4, [Remove("b/g")])
    view.rewind(2)
    assert view.in_flight == 0
    assert index.acked_lsn == 2
    assert view.last_lsn == 2
    want = {"a": (KIND_DIR, 1), "a/f": (KIND_FILE, 2), "a/g": (KIND_FILE, 3)}
    assert state(view) == want
    assert_consistent(view)
    assert view.hashes("a/f") == b"f1"
    assert view.hashes("a/g") == b"g"
    assert view.hashes("b/f") is None
    assert view._pending == {}
    assert reopened(db) == (want, 2)
    view.record(3, [Remove("a/g")])   # LSNs continue from the flushed one
    assert "a/g" not in state(view)


def test_rewind_on_a_full_disk_keeps_the_flushed_records_in_flight(
        db: Path, index: Index, monkeypatch: pytest.MonkeyPatch) -> None:
    view = View(index)
    view.record(1, [D("a", 1), F("a/f", 2, b"f1")])
    view.acked(1)
    view.record(2, [F("a/g", 3, b"g")])
    view.record(3, [Move("a", "b")])
    view.save()

    def full(*args: object) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(index, "commit", full)
    with pytest.raises(sqlite3.OperationalError):
        view.rewind(2)
    # rewound in memory all the same: record 2 (flushed) stays in flight, 3 is gone
    want = {"a": (KIND_DIR, 1), "a/f": (KIND_FILE, 2), "a/g": (KIND_FILE, 3)}
    assert state(view) == want
    assert (view.in_flight, view.last_lsn, index.acked_lsn) == (1, 2, 1)
    assert view.hashes("a/g") == b"g"
    assert_consistent(view)
    monkeypatch.undo()
    view.acked(2)  # space again: the later commit writes what was flushed
    assert (index_state(index), index.acked_lsn) == (want, 2)
    # record 3's saved row is harmless: a restarted agent rewinds before it sends, and a
    # new record 3 replaces it
    view.rewind(2)
    assert reopened(db) == (want, 2)


def test_rewind_below_acked_keeps_the_index(index: Index) -> None:
    view = View(index)
    view.record(1, [F("f", 1)])
    view.record(2, [F("g", 2)])
    view.acked(2)
    view.record(3, [F("h", 3)])
    view.rewind(1)
    assert index.acked_lsn == 2
    assert state(view) == {"f": (KIND_FILE, 1), "g": (KIND_FILE, 2)}


def test_acked_lsn_and_epoch_persist(db: Path) -> None:
    with Index(db) as ix:
        assert (ix.acked_lsn, ix.epoch) == (0, 0)
        ix.commit(41, [F("f", 1)])
        ix.set_epoch(3)
    with Index(db) as ix:
        assert (ix.acked_lsn, ix.epoch) == (41, 3)
        assert View(ix).last_lsn == 41


def test_reset(db: Path, index: Index) -> None:
    index.set_epoch(2)
    view = View(index)
    view.record(1, [D("a", 1), F("a/f", 2, b"h")])
    view.acked(1)
    view.record(2, [F("b", 3)])
    view.reset()
    assert (view.in_flight, view.last_lsn, len(view)) == (0, 0, 0)
    assert view.children("") == []
    assert view.by_inode(2) == []
    assert index.hashes("a/f") is None
    assert reopened(db) == ({}, 0)
    assert index.epoch == 2
    view.record(1, [F("c", 4)])
    assert state(view) == {"c": (KIND_FILE, 4)}


def test_unknown_format_is_rebuilt(db: Path) -> None:
    with Index(db) as ix:
        ix.commit(5, [F("f", 1)])
        ix._db.execute("UPDATE meta SET value = 999 WHERE key = 'format'")
    with Index(db) as ix:
        assert ix.acked_lsn == 0
        assert ix.load() == {}
        ix.commit(1, [F("g", 2)])
    assert reopened(db) == ({"g": (KIND_FILE, 2)}, 1)


@pytest.mark.parametrize("content", [b"not a database at all" * 100, b""],
                         ids=["garbage", "empty"])
def test_unreadable_file_is_rebuilt(db: Path, content: bytes) -> None:
    db.parent.mkdir(parents=True)
    db.write_bytes(content)
    with Index(db) as ix:
        assert ix.acked_lsn == 0
        ix.commit(1, [F("f", 1)])
    assert reopened(db) == ({"f": (KIND_FILE, 1)}, 1)


def test_foreign_database_is_rebuilt(db: Path) -> None:
    db.parent.mkdir(parents=True)
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE other (x)")
    con.commit()
    con.close()
    with Index(db) as ix:
        ix.commit(1, [F("f", 1)])
    assert reopened(db) == ({"f": (KIND_FILE, 1)}, 1)


@pytest.mark.parametrize(("lsn", "mutations"), [
    (1, []),                                    # not above the last lsn
    (2, [Put("", entry(KIND_DIR, 1))]),
    (2, [Remove("/abs")]),
    (2, [Remove("a//b")]),
    (2, [Remove("a/")]),
    (2, [Remove("a\0b")]),
    (2, [Put("x", entry("fifo", 1))]),
    (2, [Put("d2", entry(KIND_DIR, 1), b"hashes")]),
    (2, [Move("a", "a/b/c")]),                  # into its own subtree
    (2, [Move("a/b", "a")]),                    # over its own ancestor
    (2, [F("new", 7), Move("a", "a/x")]),       # an invalid mutation after a valid one
], ids=["lsn", "root", "absolute", "empty-name", "trailing-slash", "nul", "kind",
        "dir-hashes", "into-self", "over-ancestor", "partly-valid"])
def test_record_refuses_and_changes_nothing(
    index: Index, lsn: int, mutations: Sequence[Mutation],
) -> None:
    view = View(index)
    view.record(1, [D("a", 1), D("a/b", 2)])
    before = state(view)
    with pytest.raises(ValueError):
        view.record(lsn, mutations)
    assert state(view) == before
    assert view.in_flight == 1
    assert view.last_lsn == 1


def test_index_commit_is_one_transaction(db: Path, index: Index) -> None:
    index.commit(1, [F("f", 1)])
    with pytest.raises(ValueError):
        index.commit(2, [F("g", 2), Remove("f"), Move("x", "x/y")])
    assert index.acked_lsn == 1
    assert reopened(db) == ({"f": (KIND_FILE, 1)}, 1)


def test_entry_fields_round_trip(db: Path) -> None:
    big_ino = (1 << 64) - 5   # st_ino is unsigned 64-bit
    e = Entry(kind=KIND_SYMLINK, size=11, mtime_ns=1_234_567_890_123_456_789,
              ctime_ns=1_234_567_890_999_999_999, ino=big_ino, mode=0o120777, uid=0,
              gid=65534, target=os.fsdecode(b"../t\xe9rget"), digest=b"",
              stat_ns=1_234_567_891_000_000_000, xattr_digest=b"x" * 16)
    with Index(db) as ix:
        ix.commit(1, [Put("l", e)])
    with Index(db) as ix:
        assert ix.load() == {"l": e}
        assert View(ix).by_inode(big_ino) == ["l"]


def test_hard_links_by_inode(index: Index) -> None:
    view = View(index)
    view.record(1, [F("x", 5), F("y", 5), F("z", 5)])
    assert sorted(view.by_inode(5)) == ["x", "y", "z"]
    view.record(2, [Remove("x"), Move("y", "w")])
    assert sorted(view.by_inode(5)) == ["w", "z"]
    view.record(3, [F("z", 6)])
    assert view.by_inode(5) == ["w"]
    assert view.by_inode(6) == ["z"]
    view.record(4, [Remove("w")])
    assert view.by_inode(5) == []
    assert_consistent(view)


def test_paths_is_a_snapshot(index: Index) -> None:
    view = View(index)
    view.record(1, [F(f"f{i}", i) for i in range(10)])
    seen = []
    for lsn, p in enumerate(view.paths(), start=2):
        seen.append(p)
        view.record(lsn, [Remove(p), F(p + ".new", 100 + lsn)])
    assert sorted(seen) == [f"f{i}" for i in range(10)]


NON_UTF8 = [os.fsdecode(b"caf\xe9"), os.fsdecode(b"\xff\xfe"), "日本語", "sp ace", "nl\nx"]


def test_non_utf8_names(db: Path) -> None:
    top = os.fsdecode(b"d\xe9r")
    with Index(db) as ix:
        view = View(ix)
        view.record(1, [D(top, 1)] + [F(f"{top}/{n}", 10 + i, os.fsencode(n) * 2)
                                      for i, n in enumerate(NON_UTF8)])
        view.acked(1)
        view.record(2, [Move(top, os.fsdecode(b"n\xeaw"))])
        view.acked(2)
    new = os.fsdecode(b"n\xeaw")
    with Index(db) as ix:
        view = View(ix)
        assert sorted(view.children(new)) == sorted(NON_UTF8)
        assert view.children("") == [new]
        for i, n in enumerate(NON_UTF8):
            got = view.get(f"{new}/{n}")
            assert got is not None and got.ino == 10 + i
            assert view.hashes(f"{new}/{n}") == os.fsencode(n) * 2
        # stored as the file system's bytes
        raw = {bytes(r[0]) for r in ix._db.execute("SELECT path FROM files")}
        assert b"n\xeaw/caf\xe9" in raw
        view.record(3, [Remove(new)])
        view.acked(3)
    assert reopened(db) == ({}, 3)


def test_move_of_10000_entries_is_fast(db: Path) -> None:
    n = 10_000
    with Index(db) as ix:
        view = View(ix)
        puts: list[Mutation] = [D("big", 1)]
        puts += [D(f"big/d{i}", 10 + i) for i in range(100)]
        puts += [F(f"big/d{i % 100}/f{i}", 1000 + i, b"h" * 32) for i in range(n - 101)]
        puts += [F("big.txt", 2), F("big0", 3)]
        view.record(1, puts)
        view.acked(1)

        t0 = time.perf_counter()
        view.record(2, [Move("big", "moved/here")])
        t_view = time.perf_counter() - t0
        t0 = time.perf_counter()
        view.acked(2)
        t_sql = time.perf_counter() - t0
        print(f"\nmove of {n} entries: view {t_view * 1000:.1f} ms, "
              f"sqlite commit {t_sql * 1000:.1f} ms")
        assert t_view < 2.0
        assert t_sql < 2.0
        assert len(view.children("moved/here")) == 100
        assert view.hashes("moved/here/d7/f107") == b"h" * 32
        assert view.get("big") is None

        t0 = time.perf_counter()
        view.record(3, [Remove("moved")])
        view.acked(3)
        t_rm = time.perf_counter() - t0
        print(f"remove of {n} entries: {t_rm * 1000:.1f} ms")
        assert t_rm < 2.0
        assert state(view) == {"big.txt": (KIND_FILE, 2), "big0": (KIND_FILE, 3)}
    assert reopened(db)[0] == {"big.txt": (KIND_FILE, 2), "big0": (KIND_FILE, 3)}


# -- a random walk checked against a plain dict model ------------------------------------

Model = dict[str, tuple[Entry, bytes | None]]


def _in_subtree(p: str, root: str) -> bool:
    return p == root or p.startswith(root + "/")


def model_apply(model: Model, m: Mutation) -> None:
    if isinstance(m, Put):
        if m.entry.kind != KIND_DIR:
            for p in [p for p in model if p.startswith(m.path + "/")]:
                del model[p]
        model[m.path] = (m.entry, m.hashes)
    elif isinstance(m, Remove):
        for p in [p for p in model if _in_subtree(p, m.path)]:
            del model[p]
    else:
        moved = {p: v for p, v in model.items() if _in_subtree(p, m.old)}
        if m.old == m.new or not moved:
            return
        for p in [p for p in model if _in_subtree(p, m.new) or p in moved]:
            del model[p]
        for p, v in moved.items():
            model[m.new + p[len(m.old):]] = v


NAMES = ["a", "b", "a0", os.fsdecode(b"\xe9")]
PATHS = ["/".join(c) for d in (1, 2, 3) for c in itertools.product(NAMES, repeat=d)]


def random_mutation(rng: random.Random, serial: Iterator[int]) -> Mutation:
    r = rng.random()
    path = rng.choice(PATHS)
    if r < 0.35:
        i = next(serial)
        return Put(path, entry(KIND_FILE, i, size=i), rng.choice([None, b"h%d" % i]))
    if r < 0.6:
        return Put(path, entry(KIND_DIR, next(serial)))
    if r < 0.65:
        return Put(path, entry(KIND_SYMLINK, next(serial), target="t"))
    if r < 0.75:
        return Remove(path)
    new = rng.choice(PATHS)
    if _in_subtree(new, path) or _in_subtree(path, new):
        return Remove(path)
    return Move(path, new)


def assert_matches(view: View, model: Model) -> None:
    assert {p: view.get(p) for p in view.paths()} == {p: e for p, (e, _) in model.items()}
    for p, (e, h) in model.items():
        assert view.hashes(p) == (h if e.kind == KIND_FILE else None), p
    assert_consistent(view)


@pytest.mark.parametrize("seed", range(8))
def test_random_walk_against_model(db: Path, seed: int) -> None:
    rng = random.Random(seed)
    serial = itertools.count(1)
    with Index(db) as ix:
        view = View(ix)
        model: Model = {}
        history: dict[int, Model] = {0: {}}
        for _ in range(300):
            r = rng.random()
            if r < 0.7:
                lsn = view.last_lsn + 1
                batch = [random_mutation(rng, serial) for _ in range(rng.randint(0, 3))]
                view.record(lsn, batch)
                for m in batch:
                    model_apply(model, m)
                history[lsn] = dict(model)
            elif r < 0.95:
                view.acked(rng.randint(ix.acked_lsn, view.last_lsn))
                assert {p: e for p, (e, _) in history[ix.acked_lsn].items()} == ix.load()
            else:
                view.rewind(rng.randint(ix.acked_lsn, view.last_lsn))
                model = dict(history[ix.acked_lsn])
                history = {k: v for k, v in history.items() if k <= ix.acked_lsn}
            assert_matches(view, model)
        view.acked(view.last_lsn)
        assert_matches(view, model)
        assert view._pending == {}
    with Index(db) as ix:
        assert_matches(View(ix), model)


# ---- in-flight records saved before they are sent ----


def test_saved_inflight_records_survive_a_crash_and_commit_on_rewind(tmp_path: Path) -> None:
    path = tmp_path / "index.db"
    index = Index(path)
    view = View(index)
    view.record(1, [D("d", 1)])
    view.record(2, [F("d/a\udcff", 2, b"h" * 16)])
    view.record(3, [Move("d", "e")])
    view.save()
    view.record(4, [F("never-sent", 4)])   # recorded, not saved: never went on the wire
    index.close()                            # the agent dies; no ack arrived

    index = Index(path)
    view = View(index)
    assert index.acked_lsn == 0
    assert view.in_flight == 3
    assert view.get("e/a\udcff") is not None and view.get("never-sent") is None
    assert view.hashes("e/a\udcff") == b"h" * 16
    view.rewind(2)                           # the receiver flushed 1 and 2 only
    assert index.acked_lsn == 2
    assert sorted(view.paths()) == ["d", "d/a\udcff"]
    index.close()

    index = Index(path)
    view = View(index)                       # what was dropped stays dropped
    assert view.in_flight == 0
    assert sorted(view.paths()) == ["d", "d/a\udcff"]
    assert index.hashes("d/a\udcff") == b"h" * 16


def test_acked_records_leave_the_inflight_table(tmp_path: Path) -> None:
    index = Index(tmp_path / "index.db")
    view = View(index)
    view.record(1, [F("a", 1)])
    view.save()
    view.acked(1)
    view.record(2, [Remove("a")])
    view.acked(2)                            # acked before it was ever saved
    view.save()
    assert index.load_inflight() == []
    assert view.in_flight == 0 and list(view.paths()) == []


# ---- the big file being sent ---------------------------------------------------------

BIG_INO = (1 << 64) - 5  # above SQLite's signed 64-bit range


def sending(lsn: int, path: str = "big\udcff.bin") -> Sending:
    return Sending(lsn, path, 80 << 20, 1_700_000_000_123_456_789, 1_700_000_000_987_654_321,
                   BIG_INO, BIG_INO - 1, 1_700_000_000.25)


def test_the_file_being_sent_survives_a_restart(db: Path) -> None:
    index = Index(db)
    index.save_sending(sending(3))
    index.save_sending(sending(5, "other"))  # one at a time: the later replaces it
    index.close()
    index = Index(db)
    got = index.load_sending()
    assert got == sending(5, "other") and got is not None
    assert (got.ino, got.dev, got.first_seen) == (BIG_INO, BIG_INO - 1, 1_700_000_000.25)
    index.close()


SENDING_FORGOTTEN = {
    # (what happens after the save of LSN 5, still remembered?)
    "its record is acknowledged": (lambda v: (v.record(5, [F("a", 1)]), v.acked(5)), False),
    "a later one is": (lambda v: (v.record(6, [F("a", 1)]), v.acked(6)), False),
    "an earlier one is": (lambda v: (v.record(4, [F("a", 1)]), v.acked(4)), True),
    "a rewind to before it": (lambda v: v.rewind(4), True),
    "a rewind past it": (lambda v: v.rewind(5), False),
    "a reset": (lambda v: v.reset(), False),
}


@pytest.mark.parametrize(("then", "kept"), SENDING_FORGOTTEN.values(),
                         ids=SENDING_FORGOTTEN.keys())
def test_the_file_being_sent_is_forgotten_once_its_record_is_acknowledged(
        db: Path, then: Callable[[View], object], kept: bool) -> None:
    index = Index(db)
    view = View(index)
    index.save_sending(sending(5))
    then(view)
    assert (index.load_sending() == sending(5)) is kept
    index.close()
    index = Index(db)
    assert (index.load_sending() == sending(5)) is kept
    index.close()


def test_an_index_from_before_the_sending_table_is_kept(db: Path) -> None:
    index = Index(db)
    view = View(index)
    view.record(1, [F("a", 1, b"h" * 16)])
    view.acked(1)
    index.close()
    with sqlite3.connect(db) as conn:
        conn.execute("DROP TABLE sending")  # as an agent of the previous release left it
    conn.close()
    index = Index(db)
    assert index.acked_lsn == 1 and index.hashes("a") == b"h" * 16  # not rebuilt
    assert index.load_sending() is None
    index.save_sending(sending(2))
    assert index.load_sending() == sending(2)
    index.close()


def test_new_files_cost_no_subtree_delete_and_a_file_over_a_directory_does(
        db: Path, index: Index) -> None:
    view = View(index)
    view.record(1, [Put("d", entry(KIND_DIR)), F("d/x", 1), Put("d/sub", entry(KIND_DIR)),
                    F("d/sub/y", 2)])
    view.acked(1)
    statements: list[str] = []
    index._db.set_trace_callback(statements.append)
    view.record(2, [F(f"new{i}", i) for i in range(5)])
    view.acked(2)
    # per new file: the row and its hashes, no search below it
    assert not [s for s in statements if s.startswith("DELETE FROM files")]
    view.record(3, [F("d", 9)])    # a file where a directory with a subtree was
    view.acked(3)
    index._db.set_trace_callback(None)
    assert reopened(db)[0] == {**{f"new{i}": (KIND_FILE, i) for i in range(5)},
                               "d": (KIND_FILE, 9)}
