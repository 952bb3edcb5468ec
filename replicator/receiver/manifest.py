"""The manifest: what the receiver's mirror of one dataset holds, and how far it is applied.

One SQLite database per dataset (WAL, synchronous=FULL). `files` has one row per entry of
the mirror that a record described: kind, size, mode, mtime, and for regular files the
digest and block hashes (`HASH_SIZE`-byte hashes concatenated), which let the applier
check a patch's base and let GetManifest/verify compare without reading the mirror.
`meta` holds the durable applied LSN and the epoch.

Changes between two commits run inside one open SQLite transaction on the writer's
connection: `get` sees them at once, and `commit(applied_lsn)` makes them durable
together with the applied LSN, so the manifest and the applied position can never
disagree after a crash. `close` without a commit discards them, as a crash would.

Puts are the manifest's share of every small file the applier installs, so they are not
executed one by one: rows and the "everything below this path" deletes of `put_replacing`
collect in memory and go to SQLite before anything reads or commits: the deletes in one
`executemany` call, then the rows, many to a statement (see `sqlrows`). Running every
delete before every insert gives what running them in order gives unless a row lies
below a path whose delete came after it (a file that replaced a directory holding entries
of the same batch); that case flushes first.
A write that fails leaves the transaction in an unknown state (SQLite may have rolled it
back), so from then on every read, write and commit raises that error again: the caller
closes the manifest and opens it again, as after a crash.

Paths and symlink targets are stored as BLOBs of the bytes the mirror holds
(`core.paths.encode_name`, the receiver's one str <-> bytes mapping), because Linux names need
not be UTF-8 and Python's sqlite3 refuses to store the lone surrogates that stand for such
bytes as TEXT. So ordering is bytewise, and the tree of `p` is `p` plus the half-open range
[p + b"/", p + b"0") ('0' is the byte after '/'): deletes and moves of whole trees are range
operations on the primary key. A schema-1 manifest (TEXT, which could only hold UTF-8) is
converted in place when opened: casting valid UTF-8 TEXT to BLOB gives exactly those bytes.

Threads: the applier writes from a worker thread while GetManifest reads from the event
loop, so the writer connection is not bound to a thread, and `entries()` reads through a
connection of its own, which sees the last committed state (a WAL snapshot) and never
blocks the writer.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from replicator.core.paths import decode_name, encode_name
from replicator.sqlrows import execute_values

SCHEMA_VERSION = 2
# The one older schema converted in place; anything else is refused.
_SCHEMA_TEXT_PATHS = 1
DEFAULT_EPOCH = 1
# Rows fetched per round trip by entries(): big enough to amortise the call, small enough
# that a manifest of millions of files streams in bounded memory.
FETCH_ROWS = 1000
# Pending puts go to SQLite when this many rows (or hash bytes) have collected: amortises
# the per-statement cost, keeps memory bounded whatever the group size.
PENDING_ROWS = 1000
PENDING_BYTES = 4 << 20

Kind = Literal["file", "dir", "symlink"]
KINDS: tuple[str, ...] = ("file", "dir", "symlink")

_FILES = """
CREATE TABLE IF NOT EXISTS {name} (
    path BLOB PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('file', 'dir', 'symlink')),
    size INTEGER NOT NULL DEFAULT 0,
    mode INTEGER NOT NULL DEFAULT 0,
    mtime_ns INTEGER NOT NULL DEFAULT 0,
    digest BLOB,
    hashes BLOB,
    target BLOB
) WITHOUT ROWID;
"""
_SCHEMA = _FILES.format(name="files") + """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
"""
_COLUMNS = "path, kind, size, mode, mtime_ns, digest, hashes, target"
# The rows of a path and everything below it: ?1 the path's bytes, ?2 and ?3 the bounds
# from _tree_args. The range uses the primary key index.
_TREE = "(path = ?1 OR (path >= ?2 AND path < ?3))"
# rows in order, a later one replacing an earlier one of the same path (see sqlrows)
_PUT = f"INSERT OR REPLACE INTO files ({_COLUMNS}) VALUES {{values}}"
_DELETE_BELOW = "DELETE FROM files WHERE path >= ? AND path < ?"
# A schema-1 table converted: TEXT that Python's sqlite3 wrote is valid UTF-8, so the
# cast gives exactly the bytes encode_name gives for the same str.
_CONVERT_TEXT_PATHS = _FILES.format(name="files_v2") + f"""
INSERT INTO files_v2 ({_COLUMNS})
    SELECT CAST(path AS BLOB), kind, size, mode, mtime_ns, digest, hashes,
           CAST(target AS BLOB) FROM files;
DROP TABLE files;
ALTER TABLE files_v2 RENAME TO files;
"""


class ManifestError(Exception):
    """The manifest database is not one this version understands."""


@dataclass(frozen=True, slots=True)
class ManifestEntry:
    """One mirror entry as the last applied record described it.

    `digest` and `hashes` are set for regular files only, `target` for symlinks only.
    """

    path: str
    kind: Kind
    size: int = 0
    mode: int = 0
    mtime_ns: int = 0
    digest: bytes | None = None
    hashes: bytes | None = None
    target: str | None = None


def _tree_args(path: str) -> tuple[bytes, bytes, bytes]:
    raw = encode_name(path)
    return raw, raw + b"/", raw + b"0"


def _entry(row: tuple[object, ...]) -> ManifestEntry:
    path, kind, size, mode, mtime_ns, digest, hashes, target = row
    return ManifestEntry(
        path=decode_name(path), kind=kind,  # type: ignore[arg-type]
        size=int(size), mode=int(mode), mtime_ns=int(mtime_ns),  # type: ignore[call-overload]
        digest=bytes(digest) if digest is not None else None,  # type: ignore[call-overload]
        hashes=bytes(hashes) if hashes is not None else None,  # type: ignore[call-overload]
        target=decode_name(target) if target is not None else None,  # type: ignore[arg-type]
    )


class Manifest:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: transactions are begun and ended here, explicitly
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        version = int(meta.get("schema", SCHEMA_VERSION))
        if version == _SCHEMA_TEXT_PATHS:
            self._convert_text_paths()
        elif version != SCHEMA_VERSION:
            self._db.close()
            raise ManifestError(f"manifest {path} has schema {version}, "
                                f"this version reads {SCHEMA_VERSION}")
        if "schema" not in meta:
            self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
        self._applied_lsn = int(meta.get("applied_lsn", 0))
        self._epoch = int(meta.get("epoch", DEFAULT_EPOCH))
        self._in_tx = False
        # puts not yet executed (see the module doc): rows, below-path deletes, and the
        # proper ancestors of the rows' paths, which a later below-path delete must not hit
        self._rows: list[tuple[object, ...]] = []
        self._below: list[tuple[bytes, bytes]] = []
        self._row_parents: set[bytes] = set()
        self._pending_bytes = 0
        self._failed: Exception | None = None

    def _convert_text_paths(self) -> None:
        """Schema 1 -> 2 in one transaction: a crash leaves schema 1, converted again."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for statement in _CONVERT_TEXT_PATHS.split(";"):
                if statement.strip():
                    self._db.execute(statement)
            self._db.execute("UPDATE meta SET value = ? WHERE key = 'schema'",
                             (SCHEMA_VERSION,))
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            self._db.close()
            raise

    # ---- positions ----

    @property
    def applied_lsn(self) -> int:
        """The durable applied LSN: the last one `commit` wrote (0 for a new dataset)."""
        return self._applied_lsn

    @property
    def epoch(self) -> int:
        """The dataset's durable epoch (DEFAULT_EPOCH until a commit sets another)."""
        return self._epoch

    @property
    def dirty(self) -> bool:
        """True while there are changes that no commit has made durable yet."""
        return self._in_tx

    # ---- reads ----

    def get(self, path: str) -> ManifestEntry | None:
        """The entry for `path`, pending changes included; None if there is none."""
        self._flush()
        row = self._db.execute(f"SELECT {_COLUMNS} FROM files WHERE path = ?",
                               (encode_name(path),)).fetchone()
        return _entry(row) if row is not None else None

    def entries(self) -> Iterator[ManifestEntry]:
        """Every committed entry in path order, streamed from a snapshot.

        Pending changes are not included: this is the durable state (what GetManifest and
        verify may rely on). Safe to call from any thread while the writer works.
        """
        db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, isolation_level=None,
                             check_same_thread=False)
        try:
            # one read transaction: a consistent snapshot however long the caller takes
            db.execute("BEGIN")
            cur = db.execute(f"SELECT {_COLUMNS} FROM files ORDER BY path")
            while rows := cur.fetchmany(FETCH_ROWS):
                for row in rows:
                    yield _entry(row)
        finally:
            db.close()

    # ---- pending changes ----

    def _begin(self) -> None:
        if self._failed is not None:
            # SQLite may have rolled the transaction back: a write now would autocommit
            raise self._failed
        if not self._in_tx:
            self._db.execute("BEGIN IMMEDIATE")
            self._in_tx = True

    def _write(self, sql: str, args: tuple[object, ...]) -> int:
        """Executes one change (after the pending puts); returns the rows it touched."""
        self._flush()
        try:
            return self._db.execute(sql, args).rowcount
        except sqlite3.Error as e:
            self._failed = e
            raise

    def _flush(self) -> None:
        """Executes the pending puts (see the module doc)."""
        if self._failed is not None:
            raise self._failed
        if not self._rows and not self._below:
            return
        rows, below = self._rows, self._below
        self._rows, self._below = [], []
        self._row_parents.clear()
        self._pending_bytes = 0
        try:
            if below:
                self._db.executemany(_DELETE_BELOW, below)
            if rows:
                execute_values(self._db, _PUT, rows)
        except sqlite3.Error as e:
            self._failed = e
            raise

    def _add_row(self, raw: bytes, row: tuple[object, ...], size: int) -> None:
        self._rows.append(row)
        at = raw.rfind(b"/")
        while at > 0:  # every proper ancestor: a delete below one of them comes too late
            parent = raw[:at]
            if parent in self._row_parents:
                break  # and so are its own ancestors
            self._row_parents.add(parent)
            at = raw.rfind(b"/", 0, at)
        self._pending_bytes += size
        if len(self._rows) >= PENDING_ROWS or self._pending_bytes >= PENDING_BYTES:
            self._flush()

    def put(self, entry: ManifestEntry) -> None:
        """Sets the entry for `entry.path`, replacing any (pending until `commit`).

        It does not touch entries below the path: a caller replacing a directory with a
        file calls `delete_tree` first.
        """
        if entry.kind not in KINDS:
            raise ValueError(f"manifest entry kind {entry.kind!r}")
        self._begin()
        raw = encode_name(entry.path)
        self._add_row(raw, (raw, entry.kind, entry.size, entry.mode, entry.mtime_ns,
                            entry.digest, entry.hashes,
                            encode_name(entry.target) if entry.target is not None else None),
                      len(entry.hashes or b""))

    def put_replacing(self, entry: ManifestEntry) -> None:
        """`put`, after removing every entry below the path: a file or symlink that
        replaced a directory. Cheaper than `get` and `delete_tree` for the usual case, a
        path with nothing below it."""
        if entry.kind not in KINDS:
            raise ValueError(f"manifest entry kind {entry.kind!r}")
        self._begin()
        raw = encode_name(entry.path)
        self._delete_below(raw)
        self._add_row(raw, (raw, entry.kind, entry.size, entry.mode, entry.mtime_ns,
                            entry.digest, entry.hashes,
                            encode_name(entry.target) if entry.target is not None else None),
                      len(entry.hashes or b""))

    def put_file(self, path: str, size: int, mode: int, mtime_ns: int, digest: bytes,
                 hashes: bytes, *, replacing: bool = True) -> None:
        """`put_replacing` (or with `replacing=False`, `put`) of a regular file from its
        fields: the applier calls it for every file it installs, and a ManifestEntry
        would only be taken apart again."""
        self._begin()
        raw = encode_name(path)
        if replacing:
            self._delete_below(raw)
        self._add_row(raw, (raw, "file", size, mode, mtime_ns, digest, hashes, None),
                      len(hashes))

    def _delete_below(self, raw: bytes) -> None:
        if raw in self._row_parents:
            self._flush()  # a pending row lies below: it must go before this delete runs
        self._below.append((raw + b"/", raw + b"0"))

    def set_attrs(self, path: str, mode: int, mtime_ns: int) -> ManifestEntry | None:
        """Updates mode and mtime of an existing entry; returns it, or None if there is none."""
        old = self.get(path)
        if old is None:
            return None
        new = replace(old, mode=mode, mtime_ns=mtime_ns)
        self.put(new)
        return new

    def delete_tree(self, path: str) -> int:
        """Removes `path` and every entry below it (pending); returns how many went."""
        self._begin()
        return self._write(f"DELETE FROM files WHERE {_TREE}", _tree_args(path))

    def move_tree(self, old: str, new: str) -> int:
        """Moves `old` and everything below it to `new`, replacing what was at `new`.

        Mirrors rename(2): whatever was at or below `new` is gone afterwards. Returns how
        many entries moved. Moving a tree into itself is refused with ValueError, as the
        kernel refuses it.
        """
        if old == new:
            return 0
        if new.startswith(old + "/") or old.startswith(new + "/"):
            raise ValueError(f"cannot move {old!r} to {new!r}: one is inside the other")
        self.delete_tree(new)
        src = _tree_args(old)
        # `||` yields TEXT; the cast gives back the bytes unchecked and keeps every path a
        # BLOB (BLOBs and TEXT never compare equal, and sort apart)
        return self._write(
            f"UPDATE files SET path = CAST(?4 || substr(path, ?5) AS BLOB) WHERE {_TREE}",
            (*src, encode_name(new), len(src[0]) + 1))

    # ---- durability ----

    def commit(self, applied_lsn: int, *, epoch: int | None = None) -> None:
        """Makes every pending change durable with `applied_lsn` (and `epoch`), atomically.

        Safe to call with nothing pending: it then only records the positions. After a
        write that failed it raises that error again (and discards the pending changes):
        what the transaction holds is unknown, so only a reopen goes on from here.
        """
        if applied_lsn < 0 or (epoch is not None and epoch < 0):
            raise ValueError(f"applied_lsn {applied_lsn} / epoch {epoch}")
        try:
            self._begin()
            self._flush()
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('applied_lsn', ?)",
                             (applied_lsn,))
            if epoch is not None:
                self._db.execute("INSERT OR REPLACE INTO meta VALUES ('epoch', ?)", (epoch,))
            self._db.execute("COMMIT")
        except BaseException:
            self.rollback()
            raise
        self._in_tx = False
        self._applied_lsn = applied_lsn
        if epoch is not None:
            self._epoch = epoch

    def rollback(self) -> None:
        """Discards every pending change."""
        self._rows, self._below = [], []
        self._row_parents.clear()
        self._pending_bytes = 0
        if self._in_tx:
            self._in_tx = False
            # SQLite may have rolled back already (after SQLITE_FULL, say)
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")

    def close(self) -> None:
        """Closes the database; pending changes are discarded, as a crash would."""
        self.rollback()
        self._db.close()
