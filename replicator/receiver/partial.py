"""A big new file whose transfer was cut short, kept for the next stream, across restarts.

A big new file is staged by the session block by block as it arrives (see the session).
When its stream breaks before the record's END, the staged file is kept, still open, as
its dataset's `Partial`, together with the hashes of the blocks that arrived and the count
of blocks the agent need not send again (blocks arrive in ascending order, and a new
file's holes are never sent, so every block below the last one received is either in
the staged file or a hole). The next stream's Welcome announces it; an agent whose file
is unchanged sends a header with `resume_from` equal to that count, and the record goes
on as if the stream had never broken. It still ends with the whole-file digest check,
which covers the blocks of both streams: the agent hashes every block it did not resend.

Restarts: `PartialStore` keeps what a partial needs on disk in `<dataset state>/partial/`:
a small `record` file (format version, LSN, the header frame, the staged file's name and
the count of blocks known good, with a crc32) and `<staged name>.hashes`, the block hashes
of the staged file, appended to as the count grows. Only blocks that are durable are ever
counted: a save fdatasyncs the staged file, then writes and fdatasyncs the new hashes,
then replaces `record` (temp file, fsync, rename, fsync of the directory). The session
saves while the file arrives, every SAVE_EVERY_BYTES (so a kill -9 of the receiver costs
at most that much again), in the store's own thread so that receiving never waits for
those syncs, and when the stream breaks. At start the dataset loads it
before recovery, which then keeps that staged file; the staged file is cut back to the
counted blocks (whatever lies beyond may not be durable, and a hole the agent does not
resend must read as zeros), and the hashes are read back from disk, never trusted from a
later write. A record that is no longer the next one, a staged file that is gone, or a
state that does not check out is dropped, and the agent sends the file whole.

Keeping the fd open means the final fdatasync of the record is on the same open file that
took every write, so a write-back error from either stream is reported there. At most one
partial per dataset, so memory stays bounded (16 bytes of hash per block, as for the
record being received).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import struct
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path

from replicator.core.blocks import HASH_SIZE, block_count, block_length, zero_hash
from replicator.core.paths import encode_name
from replicator.core.records import Base, Frame, Header, Op
from replicator.durable import fsync_dir, pwrite_all, write_atomic
from replicator.errors import ProtocolError
from replicator.receiver.mirror import Mirror
from replicator.wire import pb
from replicator.wire.convert import decode_frame, encode_frame

log = logging.getLogger(__name__)

# The session saves a partial record's progress after every this many bytes received: a
# kill -9 of the receiver loses at most this much of a big file (plus what was in flight).
SAVE_EVERY_BYTES = 16 << 20

STORE_DIR = "partial"
RECORD_NAME = "record"
HASHES_SUFFIX = ".hashes"
_MAGIC = b"RPLP"
_VERSION = 1
# magic, version, lsn, blocks, header frame length, staged name length; then the header
# frame, the name, and a crc32 of everything before it
_FIXED = struct.Struct("<4sBQQIH")
_CRC = struct.Struct("<I")


@dataclass(slots=True)
class Partial:
    lsn: int
    header: Header
    fd: int               # the staged file, still open
    staged: str           # its path
    hashes: bytearray     # every block's hash; blocks not received hash as holes
    blocks: int           # blocks 0..blocks-1 need not be sent again
    dirty: int            # bytes written since write-back was last started
    store: PartialStore | None = None  # where it is saved, if anywhere

    def position(self) -> pb.PartialRecord:
        """What the Welcome says of it."""
        h = self.header
        return pb.PartialRecord(lsn=self.lsn, path=encode_name(h.path), size=h.size,
                                mtime_ns=h.attrs.mtime_ns if h.attrs else 0,
                                block_size=h.block_size, blocks=self.blocks)

    def continued_by(self, h: Header, lsn: int) -> bool:
        """True if `h` (a header with resume_from) continues exactly this record."""
        mine = self.header
        return (lsn == self.lsn and h.path == mine.path and h.size == mine.size
                and h.block_size == mine.block_size and h.base is Base.EMPTY
                and h.resume_from == self.blocks and h.attrs is not None
                and mine.attrs is not None and h.attrs.mtime_ns == mine.attrs.mtime_ns)

    def discard(self, mirror: Mirror, label: str, reason: str) -> None:
        """Forgets the saved state, closes and deletes the staged file. Call once."""
        self.close()
        if self.store is not None:
            self.store.forget(self.staged)  # first: no saved state names a file that is gone
        mirror.discard_staged(self.staged)
        log.info("partial record dropped dataset=%s lsn=%d path=%r reason=%s", label,
                 self.lsn, self.header.path, reason)

    def close(self) -> None:
        """Closes the staged file; the file and any saved state stay for a restart or for
        recovery's clean-up. Safe to call twice."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


def new_hashes(header: Header) -> bytearray:
    """Hashes of a new file of header.size bytes that is all holes."""
    bs = header.block_size
    n = block_count(header.size, bs)
    if not n:
        return bytearray()
    return bytearray(zero_hash(bs) * (n - 1) + zero_hash(block_length(n - 1, header.size, bs)))


class _Unusable(Exception):
    """A saved partial record that cannot be resumed, and why (one word for the log)."""


class PartialStore:
    """One dataset's partial record on disk (see the module docstring).

    Holds at most one record: saving another one replaces it. `save_soon` saves in the
    store's own thread, so that the session's worker never waits for the disk while a
    file arrives; `save` saves at once. Calls may come from the session's worker thread
    and from the event loop; a lock serialises what they change, and a save that was
    overtaken (the record cleared, replaced or saved further meanwhile) writes nothing.
    """

    def __init__(self, directory: Path, mirror: Mirror, label: str) -> None:
        self.directory = Path(directory)
        self.mirror = mirror
        self.label = label
        self._lock = threading.Lock()
        self._staged = ""   # the staged file whose record is saved, "" if none
        self._saved = 0     # ...and how many of its blocks
        self._version = 0   # moves whenever the two above do: a save in the thread checks it
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._running: concurrent.futures.Future[None] | None = None
        self._saving = ""   # the staged file whose save is under way in the thread
        self._failed = ""   # the staged file whose save in the thread failed (said once)

    @property
    def staged(self) -> str:
        """The staged file of the saved record, or "" when none is saved."""
        return self._staged

    def saved_blocks(self, staged: str) -> int:
        """How many blocks of staged file `staged` are saved (0 if another is)."""
        return self._saved if staged == self._staged else 0

    def save(self, lsn: int, header: Header, fd: int, staged: str, hashes: bytearray,
             blocks: int) -> None:
        """Makes blocks 0..blocks-1 of record `lsn`, staged in `staged` (open as `fd`),
        durable and saves them as its resumable part. Raises OSError; what was saved
        before stays valid, since nothing it counts is ever rewritten."""
        with self._lock:
            start = self.saved_blocks(staged)
            if blocks <= start:
                return
            os.fdatasync(fd)  # first the data, so that nothing counted is not durable
            self._write(lsn, header, staged, start,
                        bytes(hashes[start * HASH_SIZE:blocks * HASH_SIZE]), blocks)

    def save_soon(self, lsn: int, header: Header, fd: int, staged: str, hashes: bytearray,
                  blocks: int) -> None:
        """As `save`, but in the store's thread, and not at all while a save is under way
        there (the next call saves what this one would have) or after one of this staged
        file failed. Never blocks on the disk; the hashes are copied, the fd duplicated,
        so the caller may go on writing and even close the file meanwhile."""
        with self._lock:
            start = self.saved_blocks(staged)
            if (blocks <= start or staged == self._failed
                    or (self._running is not None and not self._running.done())):
                return
            version = self._version
            self._saving = staged
            chunk = bytes(hashes[start * HASH_SIZE:blocks * HASH_SIZE])
            dup = os.dup(fd)
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    1, thread_name_prefix=f"save {self.label}")
            self._running = self._pool.submit(self._save_later, version, lsn, header, dup,
                                              staged, start, chunk, blocks)

    def wait(self) -> None:
        """Waits for the save under way in the store's thread, if any."""
        running = self._running
        if running is not None:
            concurrent.futures.wait([running])

    def close(self) -> None:
        """Waits for the save under way and stops the store's thread. Safe to call twice."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _save_later(self, version: int, lsn: int, header: Header, fd: int, staged: str,
                    start: int, chunk: bytes, blocks: int) -> None:
        try:
            try:
                os.fdatasync(fd)  # the slow part, outside the lock
            finally:
                os.close(fd)
            with self._lock:
                self._saving = ""
                if self._version != version:
                    return  # overtaken: cleared, replaced, or saved further already
                self._write(lsn, header, staged, start, chunk, blocks)
        except OSError as e:
            # the record goes on (a failing disk fails its own writes soon enough); a
            # restart merely resumes from an earlier save
            self._failed = staged
            log.warning("partial record not saved dataset=%s lsn=%d error=%s", self.label,
                        lsn, e.strerror or e)
            return
        log.debug("partial record saved dataset=%s lsn=%d blocks=%d", self.label, lsn, blocks)

    def _write(self, lsn: int, header: Header, staged: str, start: int, chunk: bytes,
               blocks: int) -> None:
        """Saves blocks start..blocks-1 (hashes `chunk`), durable in the staged file
        already, on top of the first `start` saved before. Lock held."""
        name = os.path.basename(staged)
        hashes_path = self.directory / (name + HASHES_SUFFIX)
        if start == 0:
            self._clear()
            if not self.directory.is_dir():
                self.directory.mkdir()
                fsync_dir(self.directory.parent)
            self.mirror.sync_staging()  # the staged file's name is durable too
            hfd = os.open(hashes_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                          0o600)
            fsync_dir(self.directory)  # the hashes file exists before a record names it
        else:
            hfd = os.open(hashes_path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            pwrite_all(hfd, chunk, start * HASH_SIZE)
            os.fdatasync(hfd)
        finally:
            os.close(hfd)
        self._write_record(_encode(lsn, header, name, blocks))
        self._staged, self._saved = staged, blocks
        self._version += 1

    def forget(self, staged: str, *, durable: bool = False) -> None:
        """Forgets the saved record if it is staged file `staged`'s (saved or being saved);
        never the staged file itself, which may be the journal's now. No fsync unless
        `durable`: a record left behind by a crash is dropped at load, as it names a record
        that is no longer the next one or a staged file that is gone. `durable` is for a
        record that is still both, whose staged file is about to stop matching it."""
        with self._lock:
            if staged and staged in (self._staged, self._saving):
                self._clear()
                if durable:
                    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                        fsync_dir(self.directory)

    def keep_only(self, staged: str) -> None:
        """Forgets the saved record unless it is staged file `staged`'s ("": any)."""
        with self._lock:
            if any(s and s != staged for s in (self._staged, self._saving)):
                self._clear()

    def load(self, next_lsn: int) -> Partial | None:
        """The saved record as a Partial with its staged file open, if it is record
        `next_lsn` and checks out; otherwise drops it (its staged file is then recovery's
        to delete) and returns None. Call once, before recovery, at start."""
        with self._lock:
            try:
                raw = (self.directory / RECORD_NAME).read_bytes()
            except (FileNotFoundError, NotADirectoryError):
                self._clear()  # hashes a crash left without a record
                return None
            try:
                return self._restore(raw, next_lsn)
            except _Unusable as e:
                log.info("partial record dropped dataset=%s reason=%s", self.label, e)
            except OSError as e:  # the file is sent whole: no reason to keep the dataset shut
                log.warning("partial record dropped dataset=%s error=%s", self.label,
                            e.strerror or e)
            with contextlib.suppress(OSError):
                self._clear()
            return None

    # ---- internals (lock held) ----

    def _restore(self, raw: bytes, next_lsn: int) -> Partial:
        lsn, header, name, blocks = _decode(raw)
        if lsn != next_lsn:
            raise _Unusable("not_the_next_record")
        try:
            staged = self.mirror.incoming_path(name)
        except ValueError:
            raise _Unusable("bad_staged_name") from None
        want = blocks * HASH_SIZE
        try:
            with open(self.directory / (os.fsdecode(name) + HASHES_SUFFIX), "rb") as f:
                saved = f.read(want)
        except FileNotFoundError:
            raise _Unusable("hashes_missing") from None
        if len(saved) != want:
            raise _Unusable("hashes_short")
        try:
            fd = self.mirror.open_incoming(name)
        except FileNotFoundError:
            raise _Unusable("staged_file_missing") from None
        try:
            # beyond the counted blocks the file may hold writes that never became
            # durable; cut them, so that every block not resent reads as a hole
            if os.fstat(fd).st_size > blocks * header.block_size:
                os.ftruncate(fd, blocks * header.block_size)
                os.fdatasync(fd)
        except BaseException:
            os.close(fd)
            raise
        hashes = new_hashes(header)
        hashes[:want] = saved
        self._staged, self._saved = staged, blocks
        self._version += 1
        log.info("partial record restored dataset=%s lsn=%d path=%r blocks=%d of=%d", self.label,
                 lsn, header.path, blocks, block_count(header.size, header.block_size))
        return Partial(lsn, header, fd, staged, hashes, blocks, 0, self)

    def _write_record(self, data: bytes) -> None:
        write_atomic(self.directory / RECORD_NAME, data)

    def _clear(self) -> None:
        self._staged, self._saved = "", 0
        self._version += 1
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            os.unlink(self.directory / RECORD_NAME)  # first: then nothing names the rest
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            for name in os.listdir(self.directory):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.directory / name)


def _encode(lsn: int, header: Header, name: str, blocks: int) -> bytes:
    frame = encode_frame(Frame(lsn, header))
    raw_name = os.fsencode(name)
    body = _FIXED.pack(_MAGIC, _VERSION, lsn, blocks, len(frame), len(raw_name)) + frame \
        + raw_name
    return body + _CRC.pack(zlib.crc32(body))


def _decode(raw: bytes) -> tuple[int, Header, bytes, int]:
    """(lsn, header, staged name, blocks) of a saved record; _Unusable if it is not one."""
    if len(raw) < _FIXED.size + _CRC.size:
        raise _Unusable("short_state")
    magic, version, lsn, blocks, hlen, nlen = _FIXED.unpack_from(raw)
    if magic != _MAGIC:
        raise _Unusable("bad_magic")
    if version != _VERSION:
        raise _Unusable(f"format_version_{version}")
    end = _FIXED.size + hlen + nlen
    if len(raw) != end + _CRC.size or zlib.crc32(raw[:end]) != _CRC.unpack_from(raw, end)[0]:
        raise _Unusable("bad_checksum")
    try:
        frame = decode_frame(raw[_FIXED.size:_FIXED.size + hlen])
    except ProtocolError:
        raise _Unusable("bad_header") from None
    h = frame.body
    if (frame.lsn != lsn or not isinstance(h, Header) or h.op is not Op.FILE
            or h.base is not Base.EMPTY or h.block_size <= 0
            or not 0 < blocks <= block_count(h.size, h.block_size)):
        raise _Unusable("bad_header")
    return lsn, h, raw[_FIXED.size + hlen:end], blocks
