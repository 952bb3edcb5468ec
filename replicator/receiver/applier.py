"""The applier: journaled records into the mirror, strictly in LSN order, crash-safe.

Records are applied in groups: a run of records, then one `mirror.sync()` (syncfs) and one
manifest transaction that stores the group's manifest changes with the new applied LSN.
After a crash the journal is replayed from the durable applied LSN, so every record of the
last uncommitted group may run a second time over a mirror that already shows some of it.
Replay must end exactly where an uninterrupted apply would; that holds because:

- File content never changes in place. A new file (Base.EMPTY) is built in a staged file
  from the journal's blocks and renamed into place: replaying it rebuilds the same bytes.
- A big new file arrives already staged by the session (STAGED entries name it and carry
  its block hashes; its data was durable before the record was). Its digest is checked from
  the hashes, its attributes set, and it is hard-linked as `keep/<lsn>` before it is
  installed, as a patch is: after the rename only the keep link can replay it. An incoming
  file no flushed record still needs (applied, or never completed) is deleted by `recover`.
- A patch (Base.PREVIOUS) starts from a copy of the mirror's file, which replay cannot
  trust (a later record of the group may have replaced it). So the patched file is
  hard-linked as `keep/<lsn>` before it is installed, and the link is removed only once a
  commit covers that LSN. On replay a patch whose keep link exists is installed from it
  (after checking its digest); one without was never applied, and then no later record
  was either, so the mirror holds exactly its base.
- A patch of a big file (INPLACE_MIN_BYTES and more) is written into the mirror's file in
  place instead: copying a 1 GiB file to change 1% of it would cost more than the rest of
  the resync. Only records that are complete in the journal and not aborted are patched in
  place, never a file with other links (a keep link), and such a record is a group of its
  own (commit before, apply, commit). A crash in the middle leaves that one file torn, and
  replay starts with that record alone, over a file that differs from the record's base
  only in the blocks the record itself writes: writing them all again (the journal holds
  every one) and cutting the file to its size ends where the uninterrupted apply would.
  The price: while such a record is being applied (and until the receiver has restarted
  after a crash in it) a reader of the mirror can see that file half patched. The mirror
  at rest, and anything promoted (which applies the journal first), is always whole.
- MKDIR, SYMLINK, SETATTR and DELETE set a state regardless of what is there: replaying them
  in order converges. A run of DELETEs is still fenced by commits on both sides, so that
  after a crash only deletes can be replayed over state newer than they are.
- RENAME reads its source, which a later record may have recreated: it is a barrier
  (commit before, apply, commit with applied = its LSN), so it is only ever replayed
  as the last record. Source missing and destination present then means "already done".

Directory mtimes: an entry created, replaced or removed in a mirror directory changes that
directory's mtime although the primary's may not have changed (an in-place write there is
a rename here). Every directory touched is noted, and before each commit its mtime is set
back from the manifest, which holds what the primary's last record said.

A base that does not match the manifest, or a digest that does not match after applying,
is not fatal: the record is dropped, the path goes to `resync_paths` (the agent sends it
whole) and applying goes on. Anything else that fails a record (a refused path, an OSError,
a malformed journal) stops the dataset: what came before is committed, `error` is set and
`apply_upto` raises ApplyError from then on. No record is ever skipped silently.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from replicator.core.blocks import (
    HASH_SIZE,
    block_count,
    block_hash,
    block_length,
    decode_block,
    file_digest,
    zero_hash,
)
from replicator.core.paths import encode_name, quote_path
from replicator.core.records import Attrs, Base, Block, Codec, End, Header, Op, Whole
from replicator.errors import PathRefused, ProtocolError, ReplicatorError
from replicator.receiver.journal import (
    Entry,
    EntryKind,
    Journal,
    JournalCorrupt,
    decode_staged,
)
from replicator.receiver.manifest import Manifest, ManifestEntry
from replicator.receiver.mirror import STAGED_PREFIX, Mirror
from replicator.wire.convert import decode_frame

log = logging.getLogger(__name__)

DEFAULT_MAX_RECORDS = 5000     # records per group (one syncfs + one manifest commit)
DEFAULT_MAX_SECONDS = 0.1      # wall time per group: bounds the applied-ack latency
INPLACE_MIN_BYTES = 8 << 20    # patches of files this big are applied in place

# errors counter kinds
ERR_BASE = "base_mismatch"
ERR_DIGEST = "digest_mismatch"
ERR_MISSING = "missing_in_mirror"
ERR_PATH = "path_refused"
ERR_PROTOCOL = "protocol"
ERR_JOURNAL = "journal"
ERR_OS = "os"
ERR_INTERNAL = "internal"


class ApplyError(ReplicatorError):
    """Applying stopped: a record could not be applied."""


class _Resync(Exception):
    """The record cannot be applied as sent; the agent must send `path` whole."""

    def __init__(self, kind: str, path: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.path = path


class DecodedRecords:
    """Whole records as the session decoded and checked them when it journaled them.

    On a tree of small files, decoding each RECORD entry again was a fifth of the
    applier's time, for the very bytes the session had just decoded. A record is taken
    from here only if the journal entry holds exactly the bytes it was decoded from, so
    a journal cut back and written anew can never be misread; anything else is decoded
    from the journal as before (after a restart, everything). Bounded: beyond MAX_BYTES
    of payloads nothing more is kept. One thread puts, another takes.
    """

    MAX_BYTES = 32 << 20

    def __init__(self) -> None:
        self._items: dict[int, tuple[bytes, Whole]] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, lsn: int, payload: bytes, whole: Whole) -> None:
        with self._lock:
            if self._bytes + len(payload) > self.MAX_BYTES or lsn in self._items:
                return
            self._items[lsn] = (payload, whole)
            self._bytes += len(payload)

    def take(self, lsn: int, payload: bytes) -> Whole | None:
        with self._lock:
            item = self._items.pop(lsn, None)
            if item is None:
                return None
            self._bytes -= len(item[0])
        return item[1] if item[0] == payload else None

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._items)


class _RecordReader:
    """Records from the journal's entries, one header at a time, blocks streamed.

    The journal is the receiver's own, but it holds what the wire sent: every frame is
    decoded and checked again (or taken from `decoded`, where the session put what it
    decoded and checked of those very bytes), and the entry sequence must be HEADER,
    BLOCK*, END per LSN (or one RECORD holding them) with no gaps.
    """

    def __init__(self, entries: Iterator[Entry], first_lsn: int,
                 decoded: DecodedRecords | None = None) -> None:
        self._decoded = decoded
        self._entries = entries
        self._next_lsn = first_lsn
        self.lsn = 0
        self._end: End | None = None
        self._whole: tuple[Block, ...] | None = None  # the blocks of a RECORD entry
        self._pushed: Entry | None = None
        # the current record's staged file (base name) and block hashes, if it has one
        self.staged_name = b""
        self._staged_hashes = bytearray()

    def _next(self) -> Entry | None:
        if self._pushed is not None:
            entry, self._pushed = self._pushed, None
            return entry
        return next(self._entries, None)

    def staged(self) -> tuple[bytes, bytes] | None:
        """(name, hashes) of the current record's staged file, or None if its blocks are
        journaled; call right after `header()`."""
        if self._whole is not None:
            return None  # a RECORD entry is the whole record: nothing follows it
        while True:
            entry = self._next()
            if entry is None:
                break
            if entry.kind is not EntryKind.STAGED or entry.lsn != self.lsn:
                self._pushed = entry
                break
            self._add_staged(entry.payload)
        if not self.staged_name:
            return None
        return self.staged_name, bytes(self._staged_hashes)

    def _add_staged(self, payload: bytes) -> None:
        try:
            name, hashes = decode_staged(payload)
        except ValueError as e:
            raise ProtocolError(f"journal: LSN {self.lsn}: {e}") from None
        if self.staged_name and name != self.staged_name:
            raise ProtocolError(f"journal: LSN {self.lsn} names two staged files")
        self.staged_name = name
        self._staged_hashes += hashes

    def close(self) -> None:
        close = getattr(self._entries, "close", None)
        if close is not None:
            close()

    def header(self) -> Header | None:
        """The next record's header, or None at the end of the range."""
        entry = self._next()
        if entry is None:
            return None
        lsn, kind, payload = entry
        if self.staged_name:
            self.staged_name = b""
            self._staged_hashes = bytearray()
        if lsn != self._next_lsn or (kind is not EntryKind.RECORD
                                     and kind is not EntryKind.HEADER):
            raise ProtocolError(f"journal: expected the header of LSN {self._next_lsn}, "
                                f"found entry kind {int(kind)} of LSN {lsn}")
        self.lsn = lsn
        self._next_lsn = lsn + 1
        self._end = None
        self._whole = None
        if kind is EntryKind.RECORD and self._decoded is not None:
            whole = self._decoded.take(lsn, payload)
            if whole is not None:
                self._whole, self._end = whole.blocks, whole.end
                return whole.header
        frame = decode_frame(payload)
        body = frame.body
        if frame.lsn == lsn and kind is EntryKind.RECORD and isinstance(body, Whole):
            self._whole, self._end = body.blocks, body.end
            return body.header
        if frame.lsn != lsn or kind is not EntryKind.HEADER or not isinstance(body, Header):
            raise ProtocolError(f"journal: entry of LSN {lsn} does not hold its header")
        return body

    def blocks(self) -> Iterator[Block]:
        """The current record's blocks, up to its End (which `end()` then returns)."""
        if self._whole is not None:
            yield from self._whole
            return
        record = self.lsn
        while (entry := self._next()) is not None:
            lsn, kind, payload = entry
            if lsn == record and kind is EntryKind.STAGED:
                self._add_staged(payload)
                continue
            if lsn != record or (kind is not EntryKind.BLOCK and kind is not EntryKind.END):
                raise ProtocolError(f"journal: LSN {record} is followed by entry kind "
                                    f"{int(kind)} of LSN {lsn} before its end")
            frame = decode_frame(payload)
            body = frame.body
            if frame.lsn != lsn:
                raise ProtocolError(f"journal: malformed entry in LSN {lsn}")
            if kind is EntryKind.BLOCK:
                if not isinstance(body, Block):
                    raise ProtocolError(f"journal: BLOCK entry of LSN {lsn} holds no block")
                yield body
                continue
            if not isinstance(body, End):
                raise ProtocolError(f"journal: END entry of LSN {lsn} holds no end")
            self._end = body
            return
        raise ProtocolError(f"journal: LSN {record} ends without its end frame")

    def end(self) -> End:
        """The current record's End, skipping whatever blocks were not read."""
        if self._end is None:
            for _ in self.blocks():
                pass
        assert self._end is not None
        return self._end


def _parent(path: str) -> str:
    return path.rpartition("/")[0]


class Applier:
    """Applies one dataset's flushed journal records to its mirror; see the module doc.

    Not thread-safe: one thread at a time calls `recover` and `apply_upto` (the dataset
    runs them in a worker thread). The attributes below may be read from any thread.
    """

    def __init__(self, journal: Journal, mirror: Mirror, manifest: Manifest, keep_dir: Path,
                 *, label: str = "", inplace_min_bytes: int = INPLACE_MIN_BYTES) -> None:
        self.journal = journal
        self.inplace_min_bytes = inplace_min_bytes
        self.mirror = mirror
        self.manifest = manifest
        self.keep_dir = keep_dir
        self.label = label
        source, _, dataset = label.rpartition("/")
        self._log_ids = f"source={source or '-'} dataset={dataset or '-'}"
        keep_dir.mkdir(parents=True, exist_ok=True)
        self.applied_lsn: int = manifest.applied_lsn
        self.resync_paths: list[str] = []
        self.decoded = DecodedRecords()  # filled by the session, see DecodedRecords
        self.errors: collections.Counter[str] = collections.Counter()
        self.error: str | None = None
        self.last_applied_at: float = 0.0
        self.on_applied: Callable[[int, list[float]], None] | None = None
        # Applied to the mirror but not yet durable: positions, keep links, lag samples.
        self._done_lsn = self.applied_lsn
        self._new_keeps: list[int] = []
        self._first_seen: list[float] = []
        self._dirty_dirs: set[str] = set()
        self._deletes_pending = False
        self._in_place = False   # the record being applied patches its file in place
        # Keep links left by a crash: the patches of the last group that did get applied.
        self._replay_keeps = self._keep_lsns()
        # Up to here the mirror may be ahead of the manifest (a crash, or a restart after a
        # failed record): see _put_file.
        self._replay_to = journal.flushed_lsn  # 0 while the journal is not open: recover sets it
        self._last_hashes = b""

    # ---- public ----

    def apply_upto(self, flushed_lsn: int, *, max_records: int = DEFAULT_MAX_RECORDS,
                   max_seconds: float = DEFAULT_MAX_SECONDS) -> int:
        """Applies one group of records from applied_lsn+1 towards `flushed_lsn`.

        A group ends after `max_records` records, after `max_seconds`, or at
        `flushed_lsn`; it is then made durable and the durable applied LSN returned. It
        may be short of `flushed_lsn`: call again until it is not. Blocking: run it in a
        worker thread. Raises ApplyError once a record has failed (and on every call
        after that); everything before the failed record is committed first.
        """
        if self.error is not None:
            raise ApplyError(self.error)
        flushed_lsn = min(flushed_lsn, self.journal.flushed_lsn)  # never past what is durable
        if flushed_lsn <= self._done_lsn:
            return self.applied_lsn
        deadline = time.monotonic() + max_seconds
        reader = _RecordReader(self.journal.entries(self._done_lsn + 1, flushed_lsn),
                               self._done_lsn + 1, self.decoded)
        count = 0
        try:
            while self._done_lsn < flushed_lsn:
                header: Header | None = None
                try:
                    header = reader.header()
                    if header is None:
                        raise ProtocolError(f"journal: LSN {self._done_lsn + 1} is flushed "
                                            "but not in the journal")
                    self._apply(reader, header)
                except Exception as e:
                    self._fail(header, e)
                count += 1
                if count >= max_records or time.monotonic() >= deadline:
                    break
        finally:
            reader.close()
        self._commit_or_fail()
        return self.applied_lsn

    def recover(self, keep_incoming: str = "") -> None:
        """Replays what is journaled beyond the durable applied LSN; call once after open.
        `keep_incoming` is the staged path of a partial record to keep (see `partial`).

        Never raises ApplyError: a record that fails leaves the dataset in the error state
        (`error` set), which the caller reports and apply_upto keeps raising.
        """
        target = self.journal.flushed_lsn
        start = self.applied_lsn
        self._replay_to = max(self._replay_to, target)
        self._clean_staging()
        try:
            while self.applied_lsn < target:
                self.apply_upto(target)
        except ApplyError:
            return
        self._clean_keeps()
        self._clean_incoming(keep_incoming)
        if target > start:
            log.info("replayed %s from_lsn=%d to_lsn=%d", self._log_ids, start + 1,
                     self.applied_lsn)

    # ---- records ----

    def _apply(self, reader: _RecordReader, h: Header) -> None:
        lsn = reader.lsn
        if h.op is Op.FILE:
            if self._deletes_pending:
                self._commit()
            applied = self._apply_file(reader, h)
            if self._in_place:
                # a barrier: only ever replayed as the last record of its group
                self._in_place = False
                self._done(lsn, h, applied)
                self._commit()
                return
        else:
            end = reader.end()
            if end.aborted:
                applied = False
            elif h.op is Op.DELETE:
                if not self._deletes_pending:
                    self._commit()
                self._delete(h)
                applied = True
            elif h.op is Op.RENAME:
                self._commit()
                applied = self._rename(h)
                self._done(lsn, h, applied)
                self._commit()
                return
            else:
                if self._deletes_pending:
                    self._commit()
                applied = self._apply_meta(h)
        self._done(lsn, h, applied)
        if h.op is Op.DELETE and applied:
            self._deletes_pending = True

    def _done(self, lsn: int, h: Header, applied: bool) -> None:
        self._done_lsn = lsn
        if applied:
            self._first_seen.append(h.first_seen)

    def _apply_meta(self, h: Header) -> bool:
        attrs = h.attrs
        if attrs is None:
            raise ProtocolError(f"{h.op.name} without attributes")
        if h.op is Op.MKDIR:
            self.mirror.mkdir(h.path, attrs)
            self._replace_entry(ManifestEntry(h.path, "dir", mode=attrs.mode,
                                              mtime_ns=attrs.mtime_ns), dir_ok=True)
            self._dirty_dirs.add(_parent(h.path))
        elif h.op is Op.SYMLINK:
            self.mirror.symlink(h.path, h.target, attrs)
            self._replace_entry(ManifestEntry(h.path, "symlink", size=len(encode_name(h.target)),
                                              mode=attrs.mode, mtime_ns=attrs.mtime_ns,
                                              target=h.target))
            self._dirty_dirs.add(_parent(h.path))
        elif h.op is Op.SETATTR:
            try:
                self.mirror.set_attrs(h.path, attrs)
            except FileNotFoundError:
                # The mirror lacks it (its creation was dropped for a resync, say).
                self.manifest.delete_tree(h.path)
                self._resync(ERR_MISSING, h.path, "attributes for a path not in the mirror")
                return False
            if self.manifest.set_attrs(h.path, attrs.mode, attrs.mtime_ns) is None:
                # A directory the agent never sent (made as a missing parent): know it
                # from now on, so its mtime is kept across changes below it.
                st = self.mirror.lstat(h.path)
                if st is not None and stat.S_ISDIR(st.st_mode):
                    self.manifest.put(ManifestEntry(h.path, "dir", mode=attrs.mode,
                                                    mtime_ns=attrs.mtime_ns))
        else:
            raise ProtocolError(f"unknown op {h.op}")
        return True

    def _delete(self, h: Header) -> None:
        self.mirror.delete(h.path)
        self.manifest.delete_tree(h.path)
        self._dirty_dirs.add(_parent(h.path))

    def _rename(self, h: Header) -> bool:
        try:
            self.mirror.rename(h.path, h.new_path)
        except FileNotFoundError:
            if self.mirror.lstat(h.new_path) is None:
                # Neither there: the mirror lacks what the primary renamed (a file that
                # was dropped for resync, say). Have the agent send it.
                self.manifest.delete_tree(h.path)
                self.manifest.delete_tree(h.new_path)
                self._resync(ERR_MISSING, h.new_path,
                             f"rename source {quote_path(h.path)} is not in the mirror")
                return False
            # Only the destination: the rename was applied before a crash, not committed.
        self.manifest.move_tree(h.path, h.new_path)
        self._dirty_dirs.add(_parent(h.path))
        self._dirty_dirs.add(_parent(h.new_path))
        return True

    # ---- files ----

    def _apply_file(self, reader: _RecordReader, h: Header) -> bool:
        lsn = reader.lsn
        if h.attrs is None:
            raise ProtocolError("FILE without attributes")
        if lsn in self._replay_keeps:
            return self._reinstall(reader, h)
        staged_file = reader.staged()
        if staged_file is not None:
            return self._apply_staged(reader, h, *staged_file)
        old: ManifestEntry | None = None
        if h.base is Base.PREVIOUS:
            old = self.manifest.get(h.path)
            reason = self._base_problem(h, old)
            if reason:
                if reader.end().aborted:
                    return False
                self.manifest.delete_tree(h.path)
                self._resync(ERR_BASE, h.path, reason)
                return False
            assert old is not None
            if old.size >= self.inplace_min_bytes and not self._aborted(lsn):
                try:
                    fd = self.mirror.open_patch(h.path)
                except FileNotFoundError:
                    fd = None  # the copy below finds it missing too and says so
                if fd is not None:
                    return self._patch_in_place(fd, reader, h, old)
            try:
                fd, staged = self.mirror.stage_copy(h.path)
            except FileNotFoundError:
                if reader.end().aborted:
                    return False
                self.manifest.delete_tree(h.path)
                self._resync(ERR_MISSING, h.path, "patch of a file that is not in the mirror")
                return False
        else:
            fd, staged = self.mirror.new_staged()
        try:
            try:
                digest_ok = self._write_blocks(fd, reader, h, old)
                end = reader.end()
                if end.aborted:
                    raise _Discard
                if not digest_ok(end.digest):
                    raise _Resync(ERR_DIGEST, h.path, "digest does not match after applying")
                self.mirror.set_attrs_fd(fd, h.attrs, fresh=old is None)
            finally:
                self.mirror.calls.close(fd)
            if h.base is Base.PREVIOUS:
                self._keep(staged, lsn)
            replaced_dir = self.mirror.install(staged, h.path)
        except _Discard:
            self.mirror.discard_staged(staged)
            return False
        except _Resync as r:
            self.mirror.discard_staged(staged)
            self.manifest.delete_tree(h.path)
            self._resync(r.kind, r.path, str(r))
            return False
        except BaseException:
            self.mirror.discard_staged(staged)
            raise
        self._put_file(h, self._last_hashes, end.digest, lsn, replaced_dir)
        return True

    def _aborted(self, lsn: int) -> bool:
        """Whether record `lsn` (complete in the journal) ends aborted, from its END
        alone: its blocks are read once, when they are applied."""
        payload = self.journal.end_payload(lsn)
        if payload is None:
            return True  # not in the journal: the reader will say what is wrong
        end = decode_frame(payload).body
        return not isinstance(end, End) or end.aborted

    def _patch_in_place(self, fd: int, reader: _RecordReader, h: Header,
                        old: ManifestEntry) -> bool:
        """Writes the record's blocks into the mirror's file itself; see the module doc."""
        assert h.attrs is not None
        self._commit()  # nothing before this record is replayed after it
        self._in_place = True
        try:
            try:
                digest_ok = self._write_blocks(fd, reader, h, old)
                end = reader.end()
                if not digest_ok(end.digest):
                    raise _Resync(ERR_DIGEST, h.path, "digest does not match after patching "
                                  "in place")
                self.mirror.set_attrs_fd(fd, h.attrs)
            finally:
                os.close(fd)
        except _Resync as r:
            # the file is neither its base nor the result: never leave it looking valid
            self.mirror.delete(h.path)
            self.manifest.delete_tree(h.path)
            self._dirty_dirs.add(_parent(h.path))
            self._resync(r.kind, r.path, str(r))
            return False
        self._put_file(h, self._last_hashes, end.digest, reader.lsn, True)
        return True

    def _apply_staged(self, reader: _RecordReader, h: Header, name: bytes,
                      hashes: bytes) -> bool:
        """A new file the session staged: check, set attributes, keep-link, install."""
        lsn = reader.lsn
        assert h.attrs is not None
        end = reader.end()
        staged = self.mirror.incoming_path(name)
        if h.base is not Base.EMPTY or \
                len(hashes) != block_count(h.size, h.block_size) * HASH_SIZE:
            raise ProtocolError("staged file entries do not fit the header")
        if end.aborted:
            self.mirror.discard_staged(staged)
            return False
        try:
            fd = self.mirror.open_incoming(name)
        except FileNotFoundError:
            self.manifest.delete_tree(h.path)
            self._resync(ERR_MISSING, h.path, "staged file is missing")
            return False
        try:
            try:
                if os.fstat(fd).st_size != h.size or not end.digest or \
                        file_digest(h.size, hashes) != end.digest:
                    raise _Resync(ERR_DIGEST, h.path, "digest does not match after applying")
                self.mirror.set_attrs_fd(fd, h.attrs)
            finally:
                os.close(fd)
            self._keep(staged, lsn)
            replaced_dir = self.mirror.install(staged, h.path)
        except _Resync as r:
            self.mirror.discard_staged(staged)
            self.manifest.delete_tree(h.path)
            self._resync(r.kind, r.path, str(r))
            return False
        self._put_file(h, hashes, end.digest, lsn, replaced_dir)
        return True

    def _base_problem(self, h: Header, old: ManifestEntry | None) -> str:
        if old is None or old.kind != "file":
            return "patch of a file the mirror does not know"
        if old.digest != h.base_digest:
            return "patch base does not match the mirror's file"
        if old.hashes is None or \
                len(old.hashes) != block_count(old.size, h.block_size) * HASH_SIZE:
            return "patch block size does not match the mirror's file"
        return ""

    def _write_blocks(self, fd: int, reader: _RecordReader, h: Header,
                      old: ManifestEntry | None) -> Callable[[bytes], bool]:
        """Streams the record's blocks into the staged file `fd`, hashing as it goes.

        Returns a check of the final digest, which also leaves the block hashes in
        `_last_hashes`. Memory stays at one block whatever the file's size.
        """
        size, bs = h.size, h.block_size
        n = block_count(size, bs)
        last_len = size - (n - 1) * bs if n else 0
        stale = -1  # a block whose length changed and whose hash must be recomputed
        if old is None:
            hashes = bytearray(zero_hash(bs) * (n - 1) + zero_hash(last_len)) if n else \
                bytearray()
        else:
            assert old.hashes is not None
            old_n = block_count(old.size, bs)
            common = min(old_n, n)
            hashes = bytearray(old.hashes[:common * HASH_SIZE])
            for i in range(common, n):
                hashes += zero_hash(block_length(i, size, bs))
            if common and block_length(common - 1, old.size, bs) != \
                    block_length(common - 1, size, bs):
                stale = common - 1
        sized = False  # a new file that its last block gave its full size already
        write = self.mirror.calls.pwrite_all
        for block in reader.blocks():
            i = block.index
            raw_len = block.raw_len
            if not 0 <= i < n or raw_len != (bs if i < n - 1 else last_len):
                raise ProtocolError(f"block {i} of {raw_len} bytes does not fit a "
                                    f"file of {size} bytes")
            if block.codec is Codec.ZERO:
                h_i = zero_hash(raw_len)
                if old is not None:  # a new file is all holes already
                    write(fd, decode_block(block.codec, raw_len, b"", bs), i * bs)
            else:
                data = decode_block(block.codec, raw_len, block.data, bs)
                write(fd, data, i * bs)
                h_i = block_hash(data)
                sized = sized or (old is None and i == n - 1)
            hashes[i * HASH_SIZE:(i + 1) * HASH_SIZE] = h_i
            if i == stale:
                stale = -1
        if not sized:
            os.ftruncate(fd, size)
        if stale >= 0:
            # The old last block, now longer (or shorter) and not sent: rehash it as is.
            data = os.pread(fd, block_length(stale, size, bs), stale * bs)
            hashes[stale * HASH_SIZE:(stale + 1) * HASH_SIZE] = block_hash(data)
        self._last_hashes = bytes(hashes)
        return lambda digest: bool(digest) and file_digest(size, self._last_hashes) == digest

    def _reinstall(self, reader: _RecordReader, h: Header) -> bool:
        """Replay of a patch that was applied before a crash: install its keep link."""
        lsn = reader.lsn
        end = reader.end()
        keep = self.keep_dir / str(lsn)
        self._replay_keeps.discard(lsn)
        self._new_keeps.append(lsn)  # removed at the next commit, whatever happens here
        hashes = self._hash_file(keep, h.size, h.block_size)
        if end.aborted or hashes is None or file_digest(h.size, hashes) != end.digest:
            if reader.staged_name:
                self.mirror.discard_staged(self.mirror.incoming_path(reader.staged_name))
            # Not what the record produced (a power cut can lose unsynced data behind an
            # existing link): the path's state is unknown, have it sent whole.
            self.manifest.delete_tree(h.path)
            self._resync(ERR_DIGEST, h.path, "kept file does not match its digest on replay")
            return False
        there = self.mirror.lstat(h.path)
        kept = os.stat(keep)
        if there is None or (there.st_dev, there.st_ino) != (kept.st_dev, kept.st_ino):
            fd, staged = self.mirror.new_staged()
            os.close(fd)
            os.unlink(staged)
            os.link(keep, staged)
            try:
                self.mirror.install(staged, h.path)
            finally:
                # rename(2) between two links of one inode does nothing: never leave it
                self.mirror.discard_staged(staged)
        if reader.staged_name:
            # a crash between the keep link and the install left the staged name too
            self.mirror.discard_staged(self.mirror.incoming_path(reader.staged_name))
        self._put_file(h, hashes, end.digest, lsn, True)
        return True

    @staticmethod
    def _hash_file(path: Path, size: int, bs: int) -> bytes | None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            if os.fstat(fd).st_size != size:
                return None
            out = bytearray()
            for i in range(block_count(size, bs)):
                out += block_hash(os.pread(fd, block_length(i, size, bs), i * bs))
            return bytes(out)
        finally:
            os.close(fd)

    def _put_file(self, h: Header, hashes: bytes, digest: bytes, lsn: int,
                  replaced_dir: bool) -> None:
        """The manifest entry of a file just installed. Entries below its path are removed
        only if the install replaced a directory: the manifest holds entries below a path
        only while the mirror has a directory there, since every record changes both. A
        replay is the exception (the mirror is ahead: its file may stand where the
        manifest still has a directory), so it always removes them."""
        assert h.attrs is not None
        self.manifest.put_file(h.path, h.size, h.attrs.mode, h.attrs.mtime_ns, digest, hashes,
                               replacing=replaced_dir or lsn <= self._replay_to)
        self._dirty_dirs.add(_parent(h.path))

    def _replace_entry(self, entry: ManifestEntry, *, dir_ok: bool = False) -> None:
        if dir_ok:
            self.manifest.put(entry)  # a directory stays one: what is below it stays
        else:
            self.manifest.put_replacing(entry)  # a directory there: the mirror replaced it

    def _keep(self, staged: str, lsn: int) -> None:
        keep = self.keep_dir / str(lsn)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(keep)  # from an attempt that failed before install
        os.link(staged, keep)
        self._new_keeps.append(lsn)

    # ---- outcomes ----

    def _resync(self, kind: str, path: str, reason: str) -> None:
        self.errors[kind] += 1
        if path not in self.resync_paths:
            self.resync_paths.append(path)
        log.warning("record not applied, path to resync %s lsn=%d path=%s error=%s",
                    self._log_ids, self._done_lsn + 1, quote_path(path), reason)

    def _fail(self, h: Header | None, e: Exception) -> None:
        lsn = self._done_lsn + 1  # records go strictly in order: the failed one is next
        self._in_place = False
        if isinstance(e, PathRefused):
            kind = ERR_PATH
        elif isinstance(e, ProtocolError):
            kind = ERR_PROTOCOL
        elif isinstance(e, JournalCorrupt):
            kind = ERR_JOURNAL
        elif isinstance(e, OSError):
            kind = ERR_OS
        else:
            kind = ERR_INTERNAL
        self.errors[kind] += 1
        path = quote_path(h.path) if h is not None else "-"
        self.error = f"LSN {lsn} ({path}) could not be applied: {e}"
        log.error("record failed %s lsn=%d path=%s error=%s", self._log_ids, lsn, path,
                  str(e) or repr(e), exc_info=kind == ERR_INTERNAL)
        self._commit_or_fail()  # keep what came before the failed record
        raise ApplyError(self.error) from e

    # ---- durability ----

    def _commit_or_fail(self) -> None:
        try:
            self._commit()
        except Exception as e:
            self.errors[ERR_OS if isinstance(e, OSError) else ERR_INTERNAL] += 1
            self.error = self.error or f"commit of LSN {self._done_lsn} failed: {e}"
            log.error("commit failed %s lsn=%d error=%s", self._log_ids, self._done_lsn, e)
            raise ApplyError(self.error) from e

    def _commit(self) -> None:
        """Makes everything applied so far durable: mirror first, then the manifest."""
        self._deletes_pending = False
        if self._done_lsn == self.applied_lsn and not self.manifest.dirty \
                and not self._dirty_dirs:
            return
        self._restore_dir_mtimes()
        self.mirror.sync()
        self.manifest.commit(self._done_lsn)
        self.applied_lsn = self._done_lsn
        self.last_applied_at = time.time()
        for lsn in self._new_keeps:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.keep_dir / str(lsn))
        self._new_keeps.clear()
        seen, self._first_seen = self._first_seen, []
        if self.on_applied is not None:
            try:
                self.on_applied(self.applied_lsn, seen)
            except Exception:
                log.exception("on_applied hook failed %s", self._log_ids)

    def _restore_dir_mtimes(self) -> None:
        dirs, self._dirty_dirs = self._dirty_dirs, set()
        for d in sorted(dirs):
            if not d:
                continue  # the dataset root: no record describes it
            entry = self.manifest.get(d)
            if entry is None or entry.kind != "dir":
                continue
            try:
                self.mirror.set_attrs(d, Attrs(mode=entry.mode, mtime_ns=entry.mtime_ns))
            except (FileNotFoundError, NotADirectoryError, PathRefused):
                continue  # gone, or replaced, later in the same group

    def _keep_lsns(self) -> set[int]:
        out: set[int] = set()
        for name in os.listdir(self.keep_dir):
            if name.isdigit():
                out.add(int(name))
        return out

    def _clean_keeps(self) -> None:
        """Removes keep links a crash left behind after their commit."""
        for lsn in sorted(self._keep_lsns()):
            if lsn <= self.applied_lsn:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.keep_dir / str(lsn))
        self._replay_keeps = {n for n in self._replay_keeps if n > self.applied_lsn}

    def _clean_staging(self) -> None:
        """Removes staged files a crash left behind (this applier is the only stager)."""
        for name in os.listdir(self.mirror.staging_dir):
            if name.startswith(STAGED_PREFIX):
                self.mirror.discard_staged(os.path.join(self.mirror.staging_dir, name))


    def _clean_incoming(self, keep: str) -> None:
        """Removes incoming files no record will use: those of applied records (installed
        or dropped) and those beyond the last flushed record (never completed), except
        `keep`, a partial record's. Between the two are records not yet applied (a dataset
        in error): their files stay."""
        flushed = self.journal.flushed_lsn
        for lsn, staged in self.mirror.incoming_files():
            if staged == keep:
                continue
            if lsn <= self.applied_lsn or lsn > flushed:
                self.mirror.discard_staged(staged)


class _Discard(Exception):
    """The record was aborted at its end: drop what was staged."""
