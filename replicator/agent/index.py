"""The agent's index of what the receiver holds for one directory dataset, and its view.

Design
------
The agent keeps nothing it cannot rebuild (DESIGN 3). `Index` is a SQLite file holding, per
path, what the receiver has *acknowledged*; anything else is found again by comparing the
file system with it. If the file is lost, unreadable or of an unknown format it is simply
rebuilt empty and the caller rescans, so WAL with synchronous=NORMAL is enough.

The agent ships record N+1 before N is acknowledged, so it works against a `View`: the index
in memory plus the mutations of the records in flight, remembered per LSN. An ack for LSN F
commits the mutations of every LSN <= F to the index in one transaction together with
acked_lsn = F; a rewind to the receiver's flushed LSN forgets the rest and reloads.

Paths are '/'-separated and relative; names that are not UTF-8 arrive as str decoded with
surrogateescape. SQLite stores `os.fsencode(path)` as a BLOB, so every name round-trips and
ordering is bytewise: the subtree of `p` is `p` itself plus the half-open range
[p + b"/", p + b"0") ('0' is the byte after '/'), which turns removes and moves of whole
subtrees into range operations on the unique path index.

Block hashes can be large (16 bytes per 64 KiB block), so they live in their own table
(moves rewrite only the small rows) and the view keeps in memory only those of in-flight
records. A file moved by an in-flight record whose hashes were already acknowledged is
found through its chain of earlier paths: each step (lsn, old_path) says "until lsn is
acknowledged, the index holds these hashes at old_path".

The index also remembers the big new file whose record is going out (`Sending`), so that
an agent restarted in the middle of it can continue it from where the receiver's part ends,
as after a reconnect; the commit of the ack that covers that record forgets it.

Neither class is thread-safe: the caller serialises access (they may be used from a worker
thread other than the one that created them).
"""

from __future__ import annotations

import contextlib
import logging
import marshal
import os
import sqlite3
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from replicator.sqlrows import execute_values

log = logging.getLogger(__name__)

KIND_FILE, KIND_DIR, KIND_SYMLINK = "file", "dir", "symlink"
KINDS = frozenset({KIND_FILE, KIND_DIR, KIND_SYMLINK})

# Bump when the schema changes: an index of another version is discarded and rebuilt.
FORMAT_VERSION = 2

_META_FORMAT = "format"
_META_ACKED = "acked_lsn"
_META_EPOCH = "epoch"

# st_ino is unsigned 64-bit; SQLite integers are signed 64-bit.
_U64 = 1 << 64
_I64_MAX = (1 << 63) - 1


@dataclass(slots=True)
class Entry:
    """One path as the receiver holds it. Treat as immutable once handed to the view."""

    kind: str
    size: int
    mtime_ns: int
    ctime_ns: int
    ino: int
    mode: int          # st_mode
    uid: int
    gid: int
    target: str = ""   # symlink target
    digest: bytes = b""        # files: file digest (16 bytes)
    # time.time_ns() when the stat behind this entry was taken: an entry whose mtime_ns is
    # within a tick of stat_ns is "racily clean" and cannot be trusted by size+mtime alone.
    stat_ns: int = 0
    xattr_digest: bytes = b""  # digest of the extended attributes as sent (b"" if none)


@dataclass(frozen=True, slots=True)
class Put:
    """Create or replace `path`. A non-directory replaces everything below it; a directory
    over a directory keeps its children. `hashes` (files only) are the block hashes; None
    means the entry has none (pass `View.hashes(path)` to keep them on an attribute change)."""

    path: str
    entry: Entry
    hashes: bytes | None = None


@dataclass(frozen=True, slots=True)
class Remove:
    """Remove `path` and everything below it; missing is fine."""

    path: str


@dataclass(frozen=True, slots=True)
class Move:
    """Move `old` and everything below it to `new`, replacing what is at `new`. Nothing
    happens if nothing is at or below `old`. `new` inside `old` or vice versa is refused."""

    old: str
    new: str


Mutation = Put | Remove | Move


@dataclass(frozen=True, slots=True)
class Sending:
    """A file as it was when its record started: a resume is for this file unchanged."""

    lsn: int
    path: str
    size: int
    mtime_ns: int
    ctime_ns: int
    ino: int
    dev: int
    first_seen: float = field(compare=False)

    @classmethod
    def of(cls, lsn: int, path: str, st: os.stat_result, first_seen: float) -> Sending:
        return cls(lsn, path, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev,
                   first_seen)


def check_path(path: str) -> None:
    """Raise ValueError unless `path` is a non-empty relative '/'-separated path."""
    if not path or "\0" in path or path.startswith("/") or path.endswith("/") or "//" in path:
        raise ValueError(f"invalid index path {path!r}")


def check_mutation(m: Mutation) -> None:
    """Raise ValueError for a mutation that cannot be applied (checked before any change)."""
    if isinstance(m, Put):
        check_path(m.path)
        if m.entry.kind not in KINDS:
            raise ValueError(f"invalid entry kind {m.entry.kind!r} path={m.path!r}")
        if m.hashes is not None and m.entry.kind != KIND_FILE:
            raise ValueError(f"hashes on a {m.entry.kind} path={m.path!r}")
    elif isinstance(m, Remove):
        check_path(m.path)
    elif isinstance(m, Move):
        check_path(m.old)
        check_path(m.new)
        if m.new.startswith(m.old + "/") or m.old.startswith(m.new + "/"):
            raise ValueError(f"move into or over its own subtree old={m.old!r} new={m.new!r}")
    else:
        raise TypeError(f"not a mutation: {m!r}")


def _row(raw_path: bytes, e: Entry) -> tuple[object, ...]:
    """The values of _UPSERT_VALUES (the columns of _COLUMNS) for the entry at `raw_path`."""
    return (raw_path, e.kind, e.size, e.mtime_ns, e.ctime_ns, _ino_to_db(e.ino), e.mode, e.uid,
            e.gid, os.fsencode(e.target), e.digest, e.stat_ns, e.xattr_digest)


def _bounds(path: str) -> tuple[bytes, bytes, bytes]:
    raw = os.fsencode(path)
    return raw, raw + b"/", raw + b"0"


def _ino_to_db(ino: int) -> int:
    return ino - _U64 if ino > _I64_MAX else ino


def _ino_from_db(ino: int) -> int:
    return ino + _U64 if ino < 0 else ino


_SCHEMA = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    """CREATE TABLE files (
        id INTEGER PRIMARY KEY,
        path BLOB NOT NULL UNIQUE,
        kind TEXT NOT NULL,
        size INTEGER NOT NULL,
        mtime_ns INTEGER NOT NULL,
        ctime_ns INTEGER NOT NULL,
        ino INTEGER NOT NULL,
        mode INTEGER NOT NULL,
        uid INTEGER NOT NULL,
        gid INTEGER NOT NULL,
        target BLOB NOT NULL,
        digest BLOB NOT NULL,
        stat_ns INTEGER NOT NULL,
        xattr_digest BLOB NOT NULL
    )""",
    # keyed by files.id so that a move never rewrites (possibly large) hashes
    "CREATE TABLE hashes (id INTEGER PRIMARY KEY, data BLOB NOT NULL)",
    # mutations of records sent but not yet acknowledged, saved before they go on the wire
    "CREATE TABLE inflight (lsn INTEGER PRIMARY KEY, data BLOB NOT NULL)",
)
# the big new file being sent, at most one row; added to format 2 without a version bump
# (an index without it just lacks the table: it is created, nothing is rebuilt)
_SENDING_SCHEMA = """CREATE TABLE IF NOT EXISTS sending (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    lsn INTEGER NOT NULL,
    path BLOB NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL,
    ino INTEGER NOT NULL,
    dev INTEGER NOT NULL,
    first_seen REAL NOT NULL
)"""

_SUBTREE = "path = ? OR (path >= ? AND path < ?)"
_BELOW = "path >= ? AND path < ?"
_COLUMNS = ("path, kind, size, mtime_ns, ctime_ns, ino, mode, uid, gid, target, digest, "
            "stat_ns, xattr_digest")
_UPSERT_VALUES = (  # one row or many (see sqlrows): {values}
    f"INSERT INTO files ({_COLUMNS}) VALUES {{values}} "
    "ON CONFLICT(path) DO UPDATE SET kind = excluded.kind, size = excluded.size, "
    "mtime_ns = excluded.mtime_ns, ctime_ns = excluded.ctime_ns, ino = excluded.ino, "
    "mode = excluded.mode, uid = excluded.uid, gid = excluded.gid, target = excluded.target, "
    "digest = excluded.digest, stat_ns = excluded.stat_ns, "
    "xattr_digest = excluded.xattr_digest"
)
# files' hashes by their paths, (hashes, path) pairs: with _UPSERT_VALUES, a run of files
# takes two statements per few dozen files (see sqlrows); the paths must differ
_HASHES_BY_PATHS = ("INSERT OR REPLACE INTO hashes (id, data) SELECT files.id, v.column1 "
                    "FROM (VALUES {values}) AS v JOIN files ON files.path = v.column2")


def encode_mutations(mutations: Sequence[Mutation]) -> bytes:
    """Mutations as plain tuples in marshal format (data only: no code is ever loaded)."""
    out: list[tuple[object, ...]] = []
    for m in mutations:
        if isinstance(m, Put):
            e = m.entry
            out.append(("P", m.path, (e.kind, e.size, e.mtime_ns, e.ctime_ns, e.ino, e.mode,
                                      e.uid, e.gid, e.target, e.digest, e.stat_ns,
                                      e.xattr_digest), m.hashes))
        elif isinstance(m, Remove):
            out.append(("R", m.path))
        else:
            out.append(("M", m.old, m.new))
    return marshal.dumps(out)


def decode_mutations(data: bytes) -> tuple[Mutation, ...]:
    out: list[Mutation] = []
    for item in marshal.loads(data):
        tag = item[0]
        if tag == "P":
            (kind, size, mtime_ns, ctime_ns, ino, mode, uid, gid, target, digest, stat_ns,
             xattr_digest) = item[2]
            out.append(Put(item[1], Entry(
                kind=kind, size=size, mtime_ns=mtime_ns, ctime_ns=ctime_ns, ino=ino,
                mode=mode, uid=uid, gid=gid, target=target, digest=digest, stat_ns=stat_ns,
                xattr_digest=xattr_digest), item[3]))
        elif tag == "R":
            out.append(Remove(item[1]))
        elif tag == "M":
            out.append(Move(item[1], item[2]))
        else:
            raise ValueError(f"unknown mutation tag {tag!r}")
    return tuple(out)


class Index:
    """What the receiver has acknowledged for one dataset: SQLite (WAL) at `path`.

    Opening creates the parent directories and the schema; a file of another format
    version, or one that is not a readable SQLite database, is discarded and rebuilt empty
    (acked_lsn 0, epoch 0): the caller finds out by acked_lsn and rescans.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = self._open()
        self._acked_lsn = self._get_meta(_META_ACKED)
        self._epoch = self._get_meta(_META_EPOCH)

    # -- opening ---------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    def _open(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = None
        try:
            db = self._connect()
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if not tables:
                self._create(db)
                return db
            version = None
            if "meta" in tables:
                row = db.execute("SELECT value FROM meta WHERE key = ?",
                                 (_META_FORMAT,)).fetchone()
                version = row[0] if row else None
            if version == FORMAT_VERSION and {"files", "hashes", "inflight"} <= tables:
                if "sending" not in tables:
                    db.execute(_SENDING_SCHEMA)
                return db
            log.warning("index of unknown format, rebuilding path=%s version=%s",
                        self.path, version)
        except sqlite3.OperationalError:
            # a full or failing disk, not a bad file: discarding it would cost a full resend
            if db is not None:
                db.close()
            raise
        except sqlite3.DatabaseError as e:
            log.warning("index unreadable, rebuilding path=%s error=%s", self.path, e)
        if db is not None:
            db.close()
        self._discard()
        db = self._connect()
        self._create(db)
        return db

    def _discard(self) -> None:
        for suffix in ("", "-wal", "-shm", "-journal"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{self.path}{suffix}")

    @staticmethod
    def _create(db: sqlite3.Connection) -> None:
        db.execute("BEGIN IMMEDIATE")
        try:
            for stmt in (*_SCHEMA, _SENDING_SCHEMA):
                db.execute(stmt)
            db.executemany("INSERT INTO meta (key, value) VALUES (?, ?)",
                           [(_META_FORMAT, FORMAT_VERSION), (_META_ACKED, 0), (_META_EPOCH, 0)])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    # -- meta ------------------------------------------------------------------------------

    def _get_meta(self, key: str) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def _set_meta(self, key: str, value: int) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    @property
    def acked_lsn(self) -> int:
        """The highest LSN whose mutations are in the index (0: none)."""
        return self._acked_lsn

    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        with self._txn():
            self._set_meta(_META_EPOCH, epoch)
        self._epoch = epoch

    # -- reading ---------------------------------------------------------------------------

    def load(self) -> dict[str, Entry]:
        """Every entry, without hashes, in bytewise path order."""
        out: dict[str, Entry] = {}
        for row in self._db.execute(f"SELECT {_COLUMNS} FROM files ORDER BY path"):
            (path, kind, size, mtime_ns, ctime_ns, ino, mode, uid, gid, target, digest,
             stat_ns, xattr_digest) = row
            out[os.fsdecode(path)] = Entry(
                kind=kind, size=size, mtime_ns=mtime_ns, ctime_ns=ctime_ns,
                ino=_ino_from_db(ino), mode=mode, uid=uid, gid=gid,
                target=os.fsdecode(target), digest=digest, stat_ns=stat_ns,
                xattr_digest=xattr_digest)
        return out

    def hashes(self, path: str) -> bytes | None:
        row = self._db.execute(
            "SELECT h.data FROM files f JOIN hashes h ON h.id = f.id WHERE f.path = ?",
            (os.fsencode(path),)).fetchone()
        return bytes(row[0]) if row else None

    # -- writing ---------------------------------------------------------------------------

    def commit(self, acked_lsn: int, mutations: Iterable[Mutation],
               replaced_dirs: set[str] | None = None) -> None:
        """Apply `mutations` in order and set acked_lsn, all in one transaction.

        `replaced_dirs`: the paths where a Put of a non-directory may have entries below
        it to delete (a directory it replaces: the view knows); below any other such Put
        there is nothing, which saves two statements per file. None: assume any may.
        Raises ValueError (and changes nothing) if a mutation is invalid.
        """
        with self._txn():
            files: list[Put] = []  # a run of files with nothing below them: written at once
            for m in mutations:
                check_mutation(m)
                below = (isinstance(m, Put)
                         and (replaced_dirs is None or m.path in replaced_dirs))
                if isinstance(m, Put) and m.hashes is not None and not below:
                    files.append(m)
                    continue
                self._put_files(files)  # in order: before anything else
                files.clear()
                if isinstance(m, Put):
                    self._put(m, below)
                elif isinstance(m, Remove):
                    self._delete(_SUBTREE, _bounds(m.path))
                else:
                    self._move(m.old, m.new)
            self._put_files(files)
            self._set_meta(_META_ACKED, acked_lsn)
            self._db.execute("DELETE FROM inflight WHERE lsn <= ?", (acked_lsn,))
            self._db.execute("DELETE FROM sending WHERE lsn <= ?", (acked_lsn,))
        self._acked_lsn = acked_lsn

    def save_inflight(self, records: Sequence[tuple[int, Sequence[Mutation]]]) -> None:
        """Remember the mutations of records about to be sent, in one transaction.

        If the agent dies before their acks arrive, the next run still knows what the
        receiver may hold: the receiver's flushed LSN then says which of them to commit.
        """
        with self._txn():
            execute_values(self._db,
                           "INSERT OR REPLACE INTO inflight (lsn, data) VALUES {values}",
                           [(lsn, encode_mutations(m)) for lsn, m in records])

    def load_inflight(self) -> list[tuple[int, tuple[Mutation, ...]]]:
        """Saved in-flight records above acked_lsn, in LSN order; unreadable ones end it."""
        out: list[tuple[int, tuple[Mutation, ...]]] = []
        rows = self._db.execute("SELECT lsn, data FROM inflight WHERE lsn > ? ORDER BY lsn",
                                (self._acked_lsn,))
        for lsn, data in rows:
            try:
                out.append((lsn, decode_mutations(data)))
            except (ValueError, TypeError, EOFError) as e:
                log.warning("in-flight record unreadable, ignoring it and later ones path=%s "
                            "lsn=%d error=%s", self.path, lsn, e)
                break
        return out

    def drop_inflight(self, above: int) -> None:
        """Forget saved in-flight records above `above` (the receiver never got them)."""
        with self._txn():
            self._db.execute("DELETE FROM inflight WHERE lsn > ?", (above,))

    def save_sending(self, s: Sending) -> None:
        """Remember `s` as the big new file whose record is going out (replacing any)."""
        with self._txn():
            self._db.execute(
                "INSERT OR REPLACE INTO sending (id, lsn, path, size, mtime_ns, ctime_ns, ino, "
                "dev, first_seen) VALUES (1, ?, ?, ?, ?, ?, ?, ?, ?)",
                (s.lsn, os.fsencode(s.path), s.size, s.mtime_ns, s.ctime_ns, _ino_to_db(s.ino),
                 _ino_to_db(s.dev), s.first_seen))

    def load_sending(self) -> Sending | None:
        """The file save_sending remembered, unless the receiver acknowledged its record."""
        row = self._db.execute(
            "SELECT lsn, path, size, mtime_ns, ctime_ns, ino, dev, first_seen FROM sending "
            "WHERE lsn > ?", (self._acked_lsn,)).fetchone()
        if row is None:
            return None
        lsn, path, size, mtime_ns, ctime_ns, ino, dev, first_seen = row
        return Sending(lsn, os.fsdecode(path), size, mtime_ns, ctime_ns, _ino_from_db(ino),
                       _ino_from_db(dev), first_seen)

    def reset(self) -> None:
        """Empty the index; acked_lsn = 0. The epoch is kept: it belongs to the receiver."""
        with self._txn():
            self._db.execute("DELETE FROM hashes")
            self._db.execute("DELETE FROM files")
            self._db.execute("DELETE FROM inflight")
            self._db.execute("DELETE FROM sending")
            self._set_meta(_META_ACKED, 0)
        self._acked_lsn = 0

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _txn(self) -> _Transaction:
        return _Transaction(self._db)

    def _put(self, m: Put, below: bool = True) -> None:
        raw = os.fsencode(m.path)
        e = m.entry
        if e.kind != KIND_DIR and below:
            self._delete(_BELOW, (raw + b"/", raw + b"0"))
        execute_values(self._db, _UPSERT_VALUES, [_row(raw, e)])
        if m.hashes is None:
            self._db.execute("DELETE FROM hashes WHERE id = (SELECT id FROM files "
                             "WHERE path = ?)", (raw,))
        else:
            execute_values(self._db, _HASHES_BY_PATHS, [(m.hashes, raw)])

    def _put_files(self, puts: list[Put]) -> None:
        """`_put(m, below=False)` for each of `puts`, files with hashes, many files to a
        statement (see sqlrows); of two puts of one path, the later one counts."""
        if puts:
            last = {os.fsencode(m.path): m for m in puts}
            execute_values(self._db, _UPSERT_VALUES,
                           [_row(raw, m.entry) for raw, m in last.items()])
            execute_values(self._db, _HASHES_BY_PATHS,
                           [(m.hashes, raw) for raw, m in last.items()])

    def _delete(self, where: str, args: tuple[bytes, ...]) -> None:
        self._db.execute(f"DELETE FROM hashes WHERE id IN (SELECT id FROM files WHERE {where})",
                         args)
        self._db.execute(f"DELETE FROM files WHERE {where}", args)

    def _move(self, old: str, new: str) -> None:
        if old == new:
            return
        src = _bounds(old)
        found = self._db.execute(f"SELECT 1 FROM files WHERE {_SUBTREE} LIMIT 1", src)
        if found.fetchone() is None:
            return
        self._delete(_SUBTREE, _bounds(new))
        # `||` yields TEXT; casting back keeps the bytes (no UTF-8 check) and keeps paths
        # BLOBs, which sort apart from TEXT values.
        self._db.execute(
            f"UPDATE files SET path = CAST(? || substr(path, ?) AS BLOB) WHERE {_SUBTREE}",
            (os.fsencode(new), len(src[0]) + 1, *src))


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self._db.execute("COMMIT")
        elif self._db.in_transaction:   # some errors (SQLITE_FULL) already rolled back
            self._db.execute("ROLLBACK")


@dataclass(slots=True)
class _Pending:
    """In-flight hashes of one file: `hashes` themselves, or (chain non-empty) where the
    index holds them: the first step whose lsn is not yet acknowledged names the path."""

    lsn: int
    hashes: bytes | None
    chain: tuple[tuple[int, str], ...] = ()


@dataclass(slots=True)
class _Flight:
    lsn: int
    mutations: tuple[Mutation, ...]
    touched: list[str] = field(default_factory=list)   # paths whose _Pending this lsn set
    replaced_dirs: list[str] = field(default_factory=list)  # Puts with entries below


class View:
    """The receiver's state as the agent believes it: index + records in flight.

    Entries returned are the view's own objects: do not mutate them.
    """

    def __init__(self, index: Index) -> None:
        self._index = index
        self._flights: deque[_Flight] = deque()
        self._last_lsn = index.acked_lsn
        self._entries: dict[str, Entry] = {}
        self._children: dict[str, set[str]] = {}
        # one path (the common case) or a set of hard links; saves a set per entry
        self._inodes: dict[int, str | set[str]] = {}
        self._pending: dict[str, _Pending] = {}
        self._unsaved: list[_Flight] = []
        self._load()
        for lsn, muts in index.load_inflight():
            if lsn > self._last_lsn:
                self._record(lsn, muts)

    # -- queries ---------------------------------------------------------------------------

    @property
    def index(self) -> Index:
        return self._index

    @property
    def in_flight(self) -> int:
        """Number of LSNs recorded and not yet acknowledged."""
        return len(self._flights)

    @property
    def last_lsn(self) -> int:
        """The highest LSN recorded or acknowledged; the next record takes a higher one."""
        return self._last_lsn

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, path: str) -> Entry | None:
        return self._entries.get(path)

    def hashes(self, path: str) -> bytes | None:
        """Block hashes of the file at `path`: in-flight ones first, then the index's."""
        entry = self._entries.get(path)
        if entry is None or entry.kind != KIND_FILE:
            return None
        info = self._pending.get(path)
        if info is None:
            return self._index.hashes(path)
        if not info.chain:
            return info.hashes
        acked = self._index.acked_lsn
        for lsn, old in info.chain:
            if lsn > acked:
                return self._index.hashes(old)
        return self._index.hashes(path)

    def children(self, path: str) -> list[str]:
        """Names directly below `path` ("" is the root), in no particular order. A name can
        stand for an implicit directory: one without an entry but with entries below it."""
        names = self._children.get(path)
        return list(names) if names else []

    def paths(self) -> Iterator[str]:
        """Every path with an entry (a snapshot: recording while iterating is fine)."""
        return iter(list(self._entries))

    def by_inode(self, ino: int) -> list[str]:
        cur = self._inodes.get(ino)
        if cur is None:
            return []
        return [cur] if isinstance(cur, str) else list(cur)

    # -- changes ---------------------------------------------------------------------------

    def record(self, lsn: int, mutations: Sequence[Mutation]) -> None:
        """Apply `mutations` to the view now and remember them under `lsn`.

        Raises ValueError, changing nothing, if lsn is not above every LSN recorded or
        acknowledged so far or if a mutation is invalid.
        """
        self._unsaved.append(self._record(lsn, mutations))

    def save(self) -> None:
        """Make the recorded, unsaved in-flight mutations durable in the index file.

        Call before their records go on the wire: then an agent that dies and restarts
        still knows what the receiver may have (DESIGN 3: nothing the receiver holds is
        unknown to the agent after a crash).
        """
        if self._unsaved:
            self._index.save_inflight([(f.lsn, f.mutations) for f in self._unsaved])
            self._unsaved.clear()

    def _record(self, lsn: int, mutations: Sequence[Mutation]) -> _Flight:
        if lsn <= self._last_lsn:
            raise ValueError(f"lsn {lsn} not above last lsn {self._last_lsn}")
        muts = tuple(mutations)
        for m in muts:
            check_mutation(m)
        flight = _Flight(lsn, muts)
        for m in muts:
            if isinstance(m, Put):
                self._put(flight, m)
            elif isinstance(m, Remove):
                self._remove_subtree(m.path)
            else:
                self._move(flight, m.old, m.new)
        self._flights.append(flight)
        self._last_lsn = lsn
        return flight

    def acked(self, lsn: int) -> None:
        """Commit the mutations of every LSN <= `lsn` to the index in one transaction, with
        acked_lsn = lsn, and free them. An ack at or below the index's acked_lsn does
        nothing; an ack above every recorded LSN still moves acked_lsn (a receiver that
        flushed records of an earlier run of the agent)."""
        index = self._index
        if lsn <= index.acked_lsn:
            return
        done = 0
        batch: list[Mutation] = []
        replaced_dirs: set[str] = set()
        for flight in self._flights:
            if flight.lsn > lsn:
                break
            batch.extend(flight.mutations)
            replaced_dirs.update(flight.replaced_dirs)
            done += 1
        index.commit(lsn, batch, replaced_dirs)
        self._unsaved = [f for f in self._unsaved if f.lsn > lsn]
        for _ in range(done):
            flight = self._flights.popleft()
            for path in flight.touched:
                info = self._pending.get(path)
                if info is not None and info.lsn <= lsn:
                    del self._pending[path]
        self._last_lsn = max(self._last_lsn, lsn)

    def rewind(self, flushed_lsn: int) -> None:
        """After a reconnect: commit what the receiver has flushed, forget every record
        above it and rebuild the view from the index. The caller then rescans.

        A flushed_lsn below the index's acked_lsn (the receiver lost records) leaves
        acked_lsn where it is: deciding to reset is the caller's.

        Raises sqlite3.OperationalError when the index cannot be written (its disk is full);
        the view is rewound all the same, and a later `acked` commits what was flushed.
        """
        keep = [f for f in self._flights if f.lsn <= flushed_lsn]
        unsaved = {f.lsn for f in self._unsaved}
        try:
            self.acked(flushed_lsn)
            keep = []
            self._index.drop_inflight(max(flushed_lsn, self._index.acked_lsn))
        finally:
            # rewound in memory even if the index cannot be written (a full disk): the
            # records the receiver flushed stay in flight until `acked` commits them. Saved
            # rows above flushed_lsn may stay behind: harmless, as a restarted agent rewinds
            # before it sends, and a new record saved under their LSN replaces them.
            self._flights.clear()
            self._unsaved.clear()
            self._last_lsn = self._index.acked_lsn
            self._load()
            for f in keep:
                flight = self._record(f.lsn, f.mutations)
                if f.lsn in unsaved:
                    self._unsaved.append(flight)

    def reset(self) -> None:
        """Empty the index (acked_lsn = 0) and the view."""
        self._index.reset()
        self._flights.clear()
        self._unsaved.clear()
        self._last_lsn = 0
        self._load()

    # -- internals -------------------------------------------------------------------------

    def _load(self) -> None:
        self._entries = {}
        self._children = {}
        self._inodes = {}
        self._pending = {}
        for path, entry in self._index.load().items():
            self._add(path, entry)

    def _add(self, path: str, entry: Entry) -> None:
        self._entries[path] = entry
        self._link(path)
        self._inode_add(entry.ino, path)

    def _link(self, path: str) -> None:
        # Register the name in its parent, and the parent in its own, up to the first
        # ancestor already registered: parents need not have entries themselves.
        while path:
            parent, _, name = path.rpartition("/")
            names = self._children.get(parent)
            if names is None:
                self._children[parent] = {name}
            elif name in names:
                return
            else:
                names.add(name)
            path = parent

    def _unlink(self, path: str) -> None:
        # Drop the name of an emptied node, then of implicit ancestors left with nothing.
        while path:
            if path in self._entries or path in self._children:
                return
            parent, _, name = path.rpartition("/")
            names = self._children.get(parent)
            if names is None:
                return
            names.discard(name)
            if names:
                return
            del self._children[parent]
            path = parent

    def _nodes_below(self, path: str) -> list[str]:
        out: list[str] = []
        stack = [f"{path}/{n}" for n in self._children.get(path, ())]
        while stack:
            p = stack.pop()
            out.append(p)
            names = self._children.get(p)
            if names:
                stack.extend(f"{p}/{n}" for n in names)
        return out

    def _drop(self, path: str) -> None:
        entry = self._entries.pop(path, None)
        if entry is not None:
            self._inode_discard(entry.ino, path)
        self._pending.pop(path, None)
        self._children.pop(path, None)

    def _remove_below(self, path: str) -> None:
        for p in self._nodes_below(path):
            self._drop(p)
        self._children.pop(path, None)

    def _remove_subtree(self, path: str) -> None:
        self._remove_below(path)
        self._drop(path)
        self._unlink(path)

    def _put(self, flight: _Flight, m: Put) -> None:
        path, entry = m.path, m.entry
        old = self._entries.get(path)
        if entry.kind != KIND_DIR:
            if self._children.get(path) or (old is not None and old.kind == KIND_DIR):
                flight.replaced_dirs.append(path)  # the index has rows below it to delete
            self._remove_below(path)
        if old is not None:
            self._inode_discard(old.ino, path)
        self._add(path, entry)
        if entry.kind == KIND_FILE:
            self._pending[path] = _Pending(flight.lsn, m.hashes)
            flight.touched.append(path)
        else:
            self._pending.pop(path, None)

    def _move(self, flight: _Flight, old: str, new: str) -> None:
        if old == new:
            return
        nodes = [old, *self._nodes_below(old)]
        moved = [(p, self._entries[p], self._pending.get(p)) for p in nodes if p in self._entries]
        if not moved:
            return
        self._remove_subtree(old)
        self._remove_subtree(new)
        lsn, cut = flight.lsn, len(old)
        for p, entry, info in moved:
            q = new + p[cut:]
            self._add(q, entry)
            if entry.kind != KIND_FILE:
                continue
            if info is None:
                self._pending[q] = _Pending(lsn, None, ((lsn, p),))
            elif info.chain:
                self._pending[q] = _Pending(lsn, None, (*info.chain, (lsn, p)))
            else:
                self._pending[q] = _Pending(lsn, info.hashes)
            flight.touched.append(q)

    def _inode_add(self, ino: int, path: str) -> None:
        cur = self._inodes.get(ino)
        if cur is None:
            self._inodes[ino] = path
        elif isinstance(cur, str):
            if cur != path:
                self._inodes[ino] = {cur, path}
        else:
            cur.add(path)

    def _inode_discard(self, ino: int, path: str) -> None:
        cur = self._inodes.get(ino)
        if cur is None:
            return
        if isinstance(cur, str):
            if cur == path:
                del self._inodes[ino]
            return
        cur.discard(path)
        if len(cur) == 1:
            self._inodes[ino] = next(iter(cur))
        elif not cur:
            del self._inodes[ino]
