"""The receiver's journal: an append-only, segmented, checksummed log of one dataset's frames.

A record (one LSN) is a HEADER entry, BLOCK entries and an END entry, or one RECORD entry
holding all of them (a small record sent as one frame); the journal stores each frame as an
opaque payload tagged with its LSN and kind. A big new file's blocks are not
journaled: the session writes them into a staged file and journals STAGED entries (the
staged file's name and block hashes, see the session) between the HEADER and the END.
Records never interleave and their LSNs increase by exactly one. A record counts once its
END (or RECORD) is appended (`written_lsn`) and once that is durable (`flushed_lsn`): `sync()` makes
everything appended so far durable with one fdatasync, which is the group commit the
session acknowledges after.

On disk, `<first lsn, 20 digits>.seg` files, each opening with a file header (magic, format
version) followed by entries: a fixed header (magic, kind, lsn, payload length, crc32 of
those fields and the payload) and the payload. A new segment starts at a record boundary
once the current one has grown past its size limit, so a record never spans segments;
before a new segment is created the old one is synced, so a crash can tear only the last
segment. `open()` therefore treats the first bad entry (short, bad magic, absurd length,
bad checksum, out of order) and an unterminated trailing record as the torn tail and
truncates them away. A bad entry in an earlier segment is corruption, not a torn tail: it
is cut the same way (the agent resends from the flushed LSN it is told), but logged loudly.

Space: applied records are reclaimed a whole segment at a time, so a segment's worth of
applied data can linger. The limit therefore fits the disk: `segment_size` (64 MiB) at
most, 1/SEGMENT_FREE_DIVISOR of the file system's free space, MIN_SEGMENT_SIZE at least,
taken when the segment is created and narrowed as the segment grows if the disk fills
meanwhile. `release()` deletes every segment whose records are all applied, and also the
current one once it is wholly applied and at least MIN_SEGMENT_SIZE big (the next record
starts a new one): a journal that has caught up holds less than MIN_SEGMENT_SIZE of
applied data, however big its segments may grow while records wait.

Writes: small entries collect in one preallocated buffer that goes to the OS in one pwrite
per ~1 MiB or at sync; large payloads go straight out with pwritev(header, payload), never
copied. Reads: `entries()` opens its own read fd per segment and preads only byte ranges of
records that are already flushed, located through an in-memory index (lsn -> segment,
start, end) of the records after the applied LSN. The file is never rewritten below the
flushed position, so a reader in a worker thread needs no lock against the appending
thread; mutating calls take a lock so that a sync in a worker thread and an append cannot
interleave.
"""

from __future__ import annotations

import bisect
import contextlib
import enum
import logging
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from replicator.durable import fsync_dir, pwrite_all
from replicator.errors import ReplicatorError

log = logging.getLogger(__name__)

DEFAULT_SEGMENT_SIZE = 64 << 20   # the most a segment grows to...
MIN_SEGMENT_SIZE = 1 << 20        # ...and the least, however full the disk
# ...and in between, at most this fraction (1/N) of the journal file system's free space
SEGMENT_FREE_DIVISOR = 16
MAX_PAYLOAD = 8 << 20
WRITE_BUFFER_SIZE = 1 << 20
# payloads this big are written directly: copying them into the buffer saves no syscall
# worth its memcpy
DIRECT_WRITE_MIN = 32 << 10
READ_CHUNK = 1 << 20

FILE_MAGIC = b"RPLJ"
FORMAT_VERSION = 1
_FILE_HEADER = struct.Struct("<4sB3x")
FILE_HEADER_SIZE = _FILE_HEADER.size
ENTRY_MAGIC = b"Je"
# magic, kind, lsn, payload length; then the crc32 of these 15 bytes and the payload
_FIELDS = struct.Struct("<2sBQI")
_CRC = struct.Struct("<I")
_ENTRY_HEADER = struct.Struct("<2sBQII")  # the fields and the crc, read in one unpack
ENTRY_HEADER_SIZE = _FIELDS.size + _CRC.size
SEGMENT_SUFFIX = ".seg"
_LSN_DIGITS = 20
END_TAIL = 4096  # an END entry (a digest and a flag) fits many times over in this


class EntryKind(enum.IntEnum):
    HEADER = 1
    BLOCK = 2
    END = 3
    STAGED = 4  # a staged file's name and block hashes, in place of BLOCKs
    RECORD = 5  # a whole (small) record in one entry: HEADER, BLOCKs and END in one


class Entry(NamedTuple):
    """One journaled frame. A tuple: the applier reads tens of thousands a second."""

    lsn: int
    kind: EntryKind
    payload: bytes


_STAGED_NAME = struct.Struct("<H")
# Hashes per STAGED entry: a file of any size fits, in as many entries as it takes.
STAGED_HASHES_PER_ENTRY = 1 << 16


def encode_staged(name: bytes, hashes: bytes | bytearray | memoryview) -> bytes:
    """A STAGED entry's payload: the staged file's base name and a run of block hashes."""
    return _STAGED_NAME.pack(len(name)) + name + bytes(hashes)


def decode_staged(payload: bytes) -> tuple[bytes, bytes]:
    """(name, hashes) of a STAGED payload; ValueError if it is malformed."""
    if len(payload) < _STAGED_NAME.size:
        raise ValueError("short staged entry")
    (n,) = _STAGED_NAME.unpack_from(payload)
    end = _STAGED_NAME.size + n
    if not n or len(payload) < end:
        raise ValueError("staged entry with a bad name length")
    return payload[_STAGED_NAME.size:end], payload[end:]


class JournalCorrupt(ReplicatorError):
    """The journal is corrupt."""


class _Bad(Exception):
    """An entry that cannot be trusted, at `offset` of its segment."""

    def __init__(self, offset: int, reason: str) -> None:
        super().__init__(f"{reason} at offset {offset}")
        self.offset = offset
        self.reason = reason


def fit_segment_size(free: int, ceiling: int) -> int:
    """The size limit of a segment created with `free` bytes free on its file system."""
    return min(ceiling, max(MIN_SEGMENT_SIZE, free // SEGMENT_FREE_DIVISOR))


def segment_name(first_lsn: int) -> str:
    return f"{first_lsn:0{_LSN_DIGITS}d}{SEGMENT_SUFFIX}"


def _parse_segment_name(name: str) -> int | None:
    stem, dot, ext = name.partition(".")
    if dot and "." + ext == SEGMENT_SUFFIX and len(stem) == _LSN_DIGITS and stem.isdigit():
        return int(stem)
    return None


def _pread_exact(fd: int, n: int, offset: int) -> bytes:
    data = os.pread(fd, n, offset)
    if len(data) == n:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        more = os.pread(fd, n - got, offset + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


class _EntryReader:
    """Entries of one segment between two offsets, read in chunks through one fd.

    Raises _Bad at the first entry that is short, malformed or fails its checksum.
    """

    def __init__(self, fd: int, start: int, end: int) -> None:
        self._fd = fd
        self._end = end
        self._data = b""
        self._i = 0  # position in _data
        self._pos = start  # file offset of _data[_i]

    @property
    def offset(self) -> int:
        return self._pos

    def next(self) -> tuple[EntryKind, int, bytes] | None:
        """The next (kind, lsn, payload), or None at the end offset."""
        # The applier reads every entry through here: one unpack of the whole header and
        # locals instead of attributes keep it to a few microseconds per entry.
        start = self._pos
        end = self._end
        if start >= end:
            return None
        data = self._data
        i = self._i
        if len(data) - i < ENTRY_HEADER_SIZE:
            # _data never extends past `end`, so only a refill can find a short header
            if start + ENTRY_HEADER_SIZE > end:
                raise _Bad(start, "short entry header")
            data = self._data = _pread_exact(self._fd, min(READ_CHUNK, end - start), start)
            i = self._i = 0
            if len(data) < ENTRY_HEADER_SIZE:
                raise _Bad(start, "short entry header")
        magic, kind, lsn, length, crc = _ENTRY_HEADER.unpack_from(data, i)
        if magic != ENTRY_MAGIC:
            raise _Bad(start, "bad entry magic")
        if kind not in _KINDS:
            raise _Bad(start, f"bad entry kind {kind}")
        if length > MAX_PAYLOAD:
            raise _Bad(start, f"absurd payload length {length}")
        body = start + ENTRY_HEADER_SIZE
        if body + length > end:
            raise _Bad(start, "short payload")
        fields_crc = zlib.crc32(data[i:i + _FIELDS.size])
        p = i + ENTRY_HEADER_SIZE
        if p + length <= len(data):
            payload = data[p:p + length]
            self._i = p + length
        else:
            # straddles the chunk (or is bigger than one): read it alone, no concatenation
            payload = _pread_exact(self._fd, length, body)
            self._data = b""
            self._i = 0
            if len(payload) < length:
                raise _Bad(start, "short payload")
        if zlib.crc32(payload, fields_crc) != crc:
            raise _Bad(start, "bad checksum")
        self._pos = body + length
        return _KINDS[kind], lsn, payload


_KINDS = {int(k): k for k in EntryKind}


class Journal:
    """Append-only, segmented, checksummed log of one dataset's frames.

    Call `open()` before anything else. Mutating calls (append, sync, discard_open,
    release, reset, close) are serialised by a lock; `entries()` may run in another
    thread meanwhile. Positions are plain attributes, safe to read from any thread.
    """

    def __init__(self, directory: Path, segment_size: int = DEFAULT_SEGMENT_SIZE) -> None:
        if segment_size <= FILE_HEADER_SIZE:
            raise ValueError(f"segment_size {segment_size} is too small")
        self.directory = Path(directory)
        self.segment_size = segment_size
        self.flushed_lsn = 0
        self.written_lsn = 0
        self._lock = threading.Lock()
        self._opened = False
        self._segments: list[int] = []  # first LSNs, ascending; the last may be current
        self._index: dict[int, tuple[int, int, int]] = {}  # lsn -> (segment, start, end)
        self._index_lo = 1  # lowest LSN that may be in _index
        self._fd: int | None = None  # write fd of the current segment
        self._seg = 0  # first LSN of the current segment
        self._limit = segment_size  # the current segment's size limit (fit_segment_size)
        self._recheck = 0  # the free space is looked at again once the segment is this big
        self._disk = 0  # bytes of the current segment handed to the OS
        self._buf = bytearray(WRITE_BUFFER_SIZE)
        self._fill = 0  # bytes waiting in _buf, which belong at offset _disk
        self._unsynced = False
        self._dir_dirty = False
        self._open_lsn: int | None = None
        self._open_start = 0
        self._fresh = False  # no record yet: the first one may have any LSN
        # after a failed write or fdatasync the kernel may have dropped the dirty pages and
        # a retry would succeed falsely: refuse to go on until repair() (or a reopen)
        self._failed: OSError | None = None

    # ---- lifecycle ----

    def open(self, applied_lsn: int) -> None:
        """Scans the segments, cuts a torn tail, and sets the positions.

        Segments whose records are all <= applied_lsn are deleted. After this,
        flushed_lsn = written_lsn = the last complete record, or applied_lsn when the
        journal holds nothing beyond it.
        """
        with self._lock:
            if self._opened:
                raise ValueError(f"journal {self.directory} is already open")
            if not self.directory.is_dir():
                self.directory.mkdir(parents=True)
                fsync_dir(self.directory.parent)  # so that the journal's name is durable
            self._index.clear()
            self._segments = []
            self._open_lsn = None
            self._fill = 0
            self._limit, self._recheck = self.segment_size, 0  # fitted at the next header
            last = self._scan(applied_lsn)
            if last is None or last <= applied_lsn:
                self._close_fd()
                for seg in self._segments:
                    self._unlink(seg)
                self._segments = []
                self._index.clear()
                self.written_lsn = self.flushed_lsn = applied_lsn
                self._fresh = True
            else:
                self.written_lsn = self.flushed_lsn = last
                self._fresh = False
            self._index_lo = applied_lsn + 1
            if self._dir_dirty:
                fsync_dir(self.directory)
                self._dir_dirty = False
            self._unsynced = False
            self._failed = None
            self._opened = True

    def close(self) -> None:
        """Makes what was appended durable and closes the journal. Safe to call twice."""
        with self._lock:
            if not self._opened:
                return
            try:
                if self._failed is None:
                    self._sync()
            finally:
                self._close_fd()
                self._opened = False

    # ---- writing ----

    def append(self, lsn: int, kind: EntryKind, payload: bytes) -> None:
        """Appends one entry, buffered (no fsync). Raises ValueError if it breaks order.

        A HEADER starts the next record (LSN written_lsn + 1; any LSN beyond written_lsn
        for the first record of a fresh journal) when no record is open; BLOCK and END
        continue the open record with its LSN; END closes it. A RECORD is a whole record:
        it starts and closes one.
        """
        kind = EntryKind(kind)
        starts = kind is EntryKind.HEADER or kind is EntryKind.RECORD
        n = len(payload)
        if n > MAX_PAYLOAD:
            raise ValueError(f"payload of {n} bytes at LSN {lsn} exceeds {MAX_PAYLOAD}")
        with self._lock:
            self._check_usable()
            try:
                if starts:
                    if self._open_lsn is not None:
                        raise ValueError(f"header of LSN {lsn} while LSN {self._open_lsn} "
                                         "is still open")
                    if lsn != self.written_lsn + 1 and not (self._fresh
                                                            and lsn > self.written_lsn):
                        raise ValueError(f"header of LSN {lsn} after LSN {self.written_lsn} "
                                         f"(expected {self.written_lsn + 1})")
                    if self._fd is None or self._full(self._disk + self._fill):
                        self._roll(lsn)
                    self._open_lsn = lsn
                    self._open_start = self._disk + self._fill
                elif self._open_lsn is None:
                    raise ValueError(f"{kind.name} entry of LSN {lsn} outside a record")
                elif lsn != self._open_lsn:
                    raise ValueError(f"{kind.name} entry of LSN {lsn} inside record "
                                     f"{self._open_lsn}")
                self._write_entry(kind, lsn, payload)
                if kind is EntryKind.END or kind is EntryKind.RECORD:
                    self._index[lsn] = (self._seg, self._open_start, self._disk + self._fill)
                    self.written_lsn = lsn
                    self._open_lsn = None
                    self._fresh = False
            except OSError as e:
                self._failed = e  # a write that failed may have left anything behind it
                raise

    def sync(self) -> int:
        """Makes every appended entry durable (one fdatasync, plus the directory's fsync
        when a segment was created) and returns flushed_lsn, now written_lsn."""
        with self._lock:
            self._check_usable()
            return self._sync()

    def discard_open(self) -> None:
        """Drops the entries of a record whose END was not appended. No-op if none is, and
        on a failed journal, whose repair() cuts it with the rest of the tail."""
        with self._lock:
            self._check_open()
            if self._open_lsn is None or self._failed is not None:
                return
            assert self._fd is not None
            start = self._open_start
            self._open_lsn = None
            if start == FILE_HEADER_SIZE:
                # the record opened this segment: drop the segment, the next header makes
                # a new one named after its own LSN
                self._fill = 0
                self._close_fd()
                self._unlink(self._segments.pop())
                return
            if start >= self._disk:
                self._fill = start - self._disk
            else:
                self._fill = 0
                try:
                    os.ftruncate(self._fd, start)
                except OSError as e:
                    self._failed = e
                    raise
                self._disk = start
                self._unsynced = True

    @property
    def failed(self) -> OSError | None:
        """The storage error that stopped appends, if one did; repair() clears it."""
        return self._failed

    def repair(self) -> None:
        """After a storage error: cuts the journal back to the last record made durable
        before it (flushed_lsn), and takes appends again. No-op if nothing failed.

        What was appended after that record was never acknowledged, so it is dropped even
        where the page cache still holds it (after a failed write-back the kernel may mark
        pages clean that never reached the disk); the agent sends it again. Nothing up to
        flushed_lsn moves, so a reader of those records is not disturbed. Raises OSError if
        the storage fails again: the journal stays failed, and repair can be called again.
        """
        with self._lock:
            self._check_open()
            if self._failed is None:
                return
            durable = self.flushed_lsn
            self._close_fd()
            self._fill = 0
            self._limit, self._recheck = self.segment_size, 0
            self._open_lsn = None
            self._unsynced = False
            while self._segments and self._segments[-1] > durable:
                self._unlink(self._segments[-1])  # only records that were never durable
                self._segments.pop()
            for lsn in [n for n in self._index if n > durable]:
                del self._index[lsn]
            last = durable
            if self._segments:
                seg = self._segments[-1]
                path = self.directory / segment_name(seg)
                good, seg_last, bad = self._scan_segment(path, seg, None, self._index_lo - 1,
                                                         upto=durable)
                if seg_last != durable:
                    # not a torn tail: records that were durable are not all there
                    log.error("journal lost flushed records dir=%s segment=%s flushed_lsn=%d "
                              "found=%s reason=%s", self.directory, segment_name(seg), durable,
                              seg_last, bad.reason.replace(" ", "_") if bad else "-")
                    last = seg_last if seg_last is not None else seg - 1
                fd = os.open(path, os.O_WRONLY)
                try:
                    os.ftruncate(fd, good)
                    os.fsync(fd)
                except BaseException:
                    os.close(fd)
                    raise
                self._fd, self._seg, self._disk = fd, seg, good
            if self._dir_dirty:
                fsync_dir(self.directory)
                self._dir_dirty = False
            self.written_lsn = self.flushed_lsn = last
            log.warning("journal repaired dir=%s flushed_lsn=%d error=%s", self.directory,
                        last, self._failed.strerror or self._failed)
            self._failed = None

    # ---- reading ----

    def entries(self, from_lsn: int, to_lsn: int) -> Iterator[Entry]:
        """Every entry of the records from_lsn..to_lsn that the journal holds, in order.

        to_lsn must not exceed flushed_lsn (ValueError). Records before the first one
        held (released, or before a fresh journal's first record) are not yielded; the
        caller checks the LSNs it gets. Streams from disk through its own read fds, so
        it may be consumed in another thread while appends go on; close the iterator
        (or exhaust it) to close them.
        """
        self._check_open()
        if to_lsn > self.flushed_lsn:
            raise ValueError(f"entries up to LSN {to_lsn} requested, but only "
                             f"{self.flushed_lsn} is flushed")
        lo = max(from_lsn, self._index_lo)
        if self._index and lo not in self._index:
            lo = max(lo, min(self._index))
        return self._entries(lo, to_lsn)

    def end_payload(self, lsn: int) -> bytes | None:
        """The payload of flushed record `lsn`'s END entry, read from the record's tail
        without reading its blocks; None if the journal does not hold the record.

        The END is the record's last entry and small, so it lies within END_TAIL bytes of
        the record's end: the one offset there whose entry is an END of `lsn`, passes its
        checksum and ends exactly at the record's end is it. JournalCorrupt if none does.
        """
        self._check_open()
        located = self._index.get(lsn)
        if located is None or lsn > self.flushed_lsn:
            return None
        seg, start, end = located
        path = self.directory / segment_name(seg)
        fd = os.open(path, os.O_RDONLY)
        try:
            tail_start = max(start, end - END_TAIL)
            tail = _pread_exact(fd, end - tail_start, tail_start)
            marker = _FIELDS.pack(ENTRY_MAGIC, EntryKind.END, lsn, 0)[:_FIELDS.size - 4]
            at = tail.find(marker)
            while at >= 0:
                try:
                    item = _EntryReader(fd, tail_start + at, end).next()
                except _Bad:
                    item = None
                if item is not None and item[0] is EntryKind.END and item[1] == lsn \
                        and tail_start + at + ENTRY_HEADER_SIZE + len(item[2]) == end:
                    return item[2]
                at = tail.find(marker, at + 1)
        finally:
            os.close(fd)
        raise JournalCorrupt(f"journal {path}: record {lsn} has no END entry at its end")

    def _entries(self, lo: int, hi: int) -> Iterator[Entry]:
        segments = list(self._segments)
        lsn = lo
        while lsn <= hi:
            located = self._index.get(lsn)
            if located is None:
                return
            seg, start, _ = located
            i = bisect.bisect_right(segments, seg)
            last = hi if i == len(segments) else min(hi, segments[i] - 1)
            end = self._index[last][2]
            path = self.directory / segment_name(seg)
            fd = os.open(path, os.O_RDONLY)
            try:
                reader = _EntryReader(fd, start, end)
                while True:
                    try:
                        item = reader.next()
                    except _Bad as e:
                        raise JournalCorrupt(f"journal {path}: {e}") from None
                    if item is None:
                        break
                    kind, entry_lsn, payload = item
                    yield Entry(entry_lsn, kind, payload)
            finally:
                os.close(fd)
            lsn = last + 1

    # ---- housekeeping ----

    def release(self, applied_lsn: int) -> None:
        """Deletes whole segments all of whose records are <= applied_lsn and forgets their
        records. The segment being appended to goes too once every record is applied, no
        record is open and it holds MIN_SEGMENT_SIZE or more (smaller, it stays: a new
        file and a directory fsync per small record would cost more than the space); the
        next header starts a new one. Allowed on a failed journal: it then never touches
        the segment being appended to."""
        with self._lock:
            self._check_open()
            while len(self._segments) > 1 and self._segments[1] <= applied_lsn + 1:
                self._unlink(self._segments.pop(0))
            if (self._segments and self._failed is None and self._open_lsn is None
                    and applied_lsn >= self.written_lsn == self.flushed_lsn
                    and self._disk + self._fill >= MIN_SEGMENT_SIZE):
                # flushed == written: nothing is buffered that a sync still owes
                self._close_fd()
                self._fill = 0
                self._unlink(self._segments.pop())
            for lsn in range(self._index_lo, min(applied_lsn, self.written_lsn) + 1):
                self._index.pop(lsn, None)
            self._index_lo = max(self._index_lo, min(applied_lsn, self.written_lsn) + 1)

    def reset(self, lsn: int) -> None:
        """Throws everything away; the next record must be lsn + 1."""
        with self._lock:
            self._check_usable()
            self._close_fd()
            self._fill = 0
            self._open_lsn = None
            for name in os.listdir(self.directory):
                if _parse_segment_name(name) is not None:
                    os.unlink(self.directory / name)
            fsync_dir(self.directory)
            self._dir_dirty = False
            self._unsynced = False
            self._segments = []
            self._index.clear()
            self._index_lo = lsn + 1
            self.written_lsn = self.flushed_lsn = lsn
            self._fresh = False

    # ---- internals (called with the lock held) ----

    def _check_open(self) -> None:
        if not self._opened:
            raise ValueError(f"journal {self.directory} is not open")

    def _check_usable(self) -> None:
        self._check_open()
        if self._failed is not None:
            raise OSError(self._failed.errno, f"journal {self.directory} failed earlier, "
                          f"repair or reopen it: {self._failed.strerror}")

    def _sync(self) -> int:
        try:
            self._flush()
            if self._unsynced and self._fd is not None:
                os.fdatasync(self._fd)
            self._unsynced = False
            if self._dir_dirty:
                fsync_dir(self.directory)
                self._dir_dirty = False
        except OSError as e:
            self._failed = e
            raise
        self.flushed_lsn = self.written_lsn
        return self.flushed_lsn

    def _flush(self) -> None:
        if self._fill:
            assert self._fd is not None
            pwrite_all(self._fd, memoryview(self._buf)[:self._fill], self._disk)
            self._disk += self._fill
            self._fill = 0
            self._unsynced = True

    def _write_entry(self, kind: EntryKind, lsn: int, payload: bytes) -> None:
        n = len(payload)
        if n >= DIRECT_WRITE_MIN:
            fields = _FIELDS.pack(ENTRY_MAGIC, kind, lsn, n)
            crc = zlib.crc32(payload, zlib.crc32(fields))
            self._flush()
            assert self._fd is not None
            header = fields + _CRC.pack(crc)
            done = os.pwritev(self._fd, [header, payload], self._disk)
            total = ENTRY_HEADER_SIZE + n
            if done < total:  # a short write: finish it plainly
                rest = (header + payload)[done:] if done < ENTRY_HEADER_SIZE else \
                    memoryview(payload)[done - ENTRY_HEADER_SIZE:]
                pwrite_all(self._fd, rest, self._disk + done)
            self._disk += total
            self._unsynced = True
            return
        if self._fill + ENTRY_HEADER_SIZE + n > WRITE_BUFFER_SIZE:
            self._flush()
        buf, at = self._buf, self._fill
        _FIELDS.pack_into(buf, at, ENTRY_MAGIC, kind, lsn, n)
        body = at + ENTRY_HEADER_SIZE
        buf[body:body + n] = payload
        crc = zlib.crc32(payload, zlib.crc32(memoryview(buf)[at:at + _FIELDS.size]))
        _CRC.pack_into(buf, at + _FIELDS.size, crc)
        self._fill = body + n
        if self._fill >= WRITE_BUFFER_SIZE:
            self._flush()

    def _full(self, size: int) -> bool:
        """True if the current segment, `size` bytes big, has reached its limit; the
        limit shrinks (never grows) when the disk has filled up since it was set."""
        if size >= self._recheck:
            self._limit = min(self._limit, self._fitted())
            self._recheck = size + MIN_SEGMENT_SIZE
        return size >= self._limit

    def _fitted(self) -> int:
        try:
            st = os.statvfs(self.directory)
        except OSError:
            return self.segment_size
        return fit_segment_size(st.f_bavail * st.f_frsize, self.segment_size)

    def _roll(self, first_lsn: int) -> None:
        """Starts segment `first_lsn`; the previous one is made durable and closed first,
        so that only the last segment can ever be torn."""
        if self._fd is not None:
            try:
                self._flush()
                if self._unsynced:
                    os.fdatasync(self._fd)
            except OSError as e:
                self._failed = e
                raise
            self._unsynced = False
            self._close_fd()
        path = self.directory / segment_name(first_lsn)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        self._seg = first_lsn
        self._segments.append(first_lsn)
        self._disk = 0
        self._limit = self._fitted()
        self._recheck = MIN_SEGMENT_SIZE
        _FILE_HEADER.pack_into(self._buf, 0, FILE_MAGIC, FORMAT_VERSION)
        self._fill = FILE_HEADER_SIZE
        self._dir_dirty = True

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _unlink(self, seg: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.directory / segment_name(seg))
        self._dir_dirty = True

    def _scan(self, applied_lsn: int) -> int | None:
        """Reads every segment that may hold records after applied_lsn, indexes them,
        cuts the torn tail, and leaves the last segment open for appending. Returns the
        last complete LSN, or None if there is none."""
        found = sorted(s for s in (_parse_segment_name(n) for n in os.listdir(self.directory))
                       if s is not None)
        # a segment is wholly applied when the next one starts at or before applied + 1
        while len(found) > 1 and found[1] <= applied_lsn + 1:
            self._unlink(found.pop(0))
        last: int | None = None
        for n, seg in enumerate(found):
            path = self.directory / segment_name(seg)
            good, seg_last, bad = self._scan_segment(path, seg, last, applied_lsn)
            if seg_last is not None:
                self._segments.append(seg)
                last = seg_last
            if bad is None and n < len(found) - 1:
                if seg_last is None:
                    # a segment whose only record was discarded but whose unlink did
                    # not survive a crash: it holds nothing
                    self._unlink(seg)
                continue
            if bad is not None:
                later = found[n + 1:]
                level = logging.ERROR if later else logging.WARNING
                log.log(level, "journal tail cut dir=%s segment=%s offset=%d reason=%s "
                        "later_segments_dropped=%d", self.directory, segment_name(seg),
                        bad.offset, bad.reason.replace(" ", "_"), len(later))
                for other in later:
                    self._unlink(other)
            if seg_last is None:
                self._unlink(seg)
            else:
                fd = os.open(path, os.O_WRONLY)
                if bad is not None:
                    os.ftruncate(fd, good)
                    os.fsync(fd)
                self._fd, self._seg, self._disk = fd, seg, good
            break
        return last

    def _scan_segment(self, path: Path, seg: int, prev: int | None, applied_lsn: int,
                      upto: int | None = None) -> tuple[int, int | None, _Bad | None]:
        """(end of the last complete record, its LSN or None, the first bad entry). With
        `upto`, a record beyond it counts as the first bad entry."""
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            head = os.pread(fd, FILE_HEADER_SIZE, 0)
            if len(head) < FILE_HEADER_SIZE:
                return 0, None, _Bad(0, "short file header")
            magic, version = _FILE_HEADER.unpack(head)
            if magic != FILE_MAGIC:
                return 0, None, _Bad(0, "bad file magic")
            if version != FORMAT_VERSION:
                raise JournalCorrupt(f"journal {path}: format version {version}, this "
                                     f"receiver reads {FORMAT_VERSION}")
            reader = _EntryReader(fd, FILE_HEADER_SIZE, size)
            good, last = FILE_HEADER_SIZE, None
            if prev is not None and seg != prev + 1:
                return good, last, _Bad(good, f"segment does not follow LSN {prev}")
            expected = seg  # the name is the first record's LSN
            open_lsn: int | None = None
            start = good
            while True:
                at = reader.offset
                try:
                    item = reader.next()
                except _Bad as e:
                    return good, last, e
                if item is None:
                    if open_lsn is not None:
                        return good, last, _Bad(start, "unterminated record")
                    return good, last, None
                kind, lsn, _ = item
                if kind is EntryKind.HEADER or kind is EntryKind.RECORD:
                    if open_lsn is not None or lsn != expected:
                        return good, last, _Bad(at, f"header of LSN {lsn} out of order")
                    if upto is not None and lsn > upto:
                        return good, last, _Bad(at, f"LSN {lsn} was never flushed")
                    open_lsn, start = lsn, at
                elif lsn != open_lsn:
                    return good, last, _Bad(at, f"{kind.name} of LSN {lsn} out of order")
                if kind is EntryKind.END or kind is EntryKind.RECORD:
                    good, last, expected, open_lsn = reader.offset, lsn, lsn + 1, None
                    if lsn > applied_lsn:
                        self._index[lsn] = (seg, start, good)
        finally:
            os.close(fd)
