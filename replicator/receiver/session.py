"""One agent's stream on the receiver.

The stream opens with a Hello; the session answers with a Welcome carrying every dataset's
positions, then takes Batches of frames and Heartbeats. Each batch is checked frame by frame
(nothing from the wire is trusted: dataset index, LSN order, paths, block indexes and
lengths), appended to the datasets' journals, and made durable with one fsync per journal
(group commit) before it is acknowledged. Acks go back whenever a dataset's flushed or
applied LSN moves; several moves between two sends coalesce into one ack.

A malformed frame ends the stream with INVALID_ARGUMENT and a one-line reason; what was
journaled before it stays, the incomplete record is dropped.

Big new files (OP_FILE, Base.EMPTY, at least STAGE_MIN_SIZE bytes) skip the journal: their
blocks are decoded, hashed and written at index * block_size into a staged file (holes
stay holes) as they arrive, so that receiving and writing the mirror's copy overlap and the
data is written once, not journaled and then copied. The journal gets the HEADER, STAGED
entries (the staged file's name and every block hash) and the END. Before the STAGED and END
entries are appended the staged file is fdatasynced and the staging dir fsynced, so a record
that any group commit makes durable always has durable data: no later sync of the journal
(another stream's hello, a close) can get ahead of it. Small files stay in the journal, where
one fsync covers many. A record that never gets its END (stream broken, newer stream,
malformed frame) has its staged file deleted here, except a big new file broken off part
way, which is kept as its dataset's `Partial` for the next stream to continue (see
`partial`), in memory and saved on disk: every SAVE_EVERY_BYTES while it arrives (after
the group commit) and when the stream breaks, so that a restart can continue it too; after
a crash the applier deletes the incoming files no flushed record or saved partial needs.

Each batch's frame work (parse, decode, hash, pwrite, journal append, group commit) runs in
one worker thread per session, so that gRPC keeps receiving meanwhile: batches arrive
unparsed (`wire.stream.RawBatch`), since parsing a 1 MiB message on the event loop would
stall the gRPC I/O of both daemons in `replicator mirror`. Batches that arrived while the
worker was busy go to it together, up to `GROUP_BYTES`, under one group commit.
Before a newer stream of the same source touches the journals, it waits for the older
stream's batch to finish.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc

from replicator.core.blocks import (
    HASH_SIZE,
    block_count,
    block_hash,
    block_length,
    decode_block,
    zero_hash,
)
from replicator.core.paths import encode_name, split_relpath
from replicator.core.records import Base, Block, Codec, End, Header, Op, Whole
from replicator.durable import pwrite_all
from replicator.errors import PathRefused, ProtocolError
from replicator.lag import AgentLag, ClockOffset
from replicator.receiver.dataset import ReceiverDataset
from replicator.receiver.journal import STAGED_HASHES_PER_ENTRY, EntryKind, encode_staged
from replicator.receiver.mirror import start_writeback
from replicator.receiver.partial import SAVE_EVERY_BYTES, Partial, PartialStore, new_hashes
from replicator.wire import CAPABILITY_RECORDS, PROTOCOL_VERSION, pb
from replicator.wire.convert import frame_from_pb
from replicator.wire.stream import RawBatch

if TYPE_CHECKING:
    from replicator.receiver.receiver import Receiver

log = logging.getLogger(__name__)

HELLO_TIMEOUT = 30.0
MAX_DATASETS = 1024
# New files from this size are staged by the session instead of journaled: below it, one
# journal fsync for many files is cheaper than a file and an fdatasync each.
STAGE_MIN_SIZE = 1 << 20
# Write-back of a staged file is started after every this many bytes written, so that
# the disk works while the rest arrives and the fdatasync at its end has little left.
WRITEBACK_BYTES = 8 << 20
# Consecutive blocks of a staged file are written with one pwritev of at most this many
# bytes or buffers: one system call, and one wait for the interpreter lock after it, per
# run instead of per block (that wait is long while the event loop is busy).
WRITE_RUN_BYTES = 1 << 20
WRITE_RUN_BUFFERS = 64
# Batches that wait for the worker while it writes go to it together, up to this many
# bytes, under one group commit; the inbox holds at most this many messages (~1 MiB each).
GROUP_BYTES = 8 << 20
INBOX_MESSAGES = 16
_KINDS = {"header": EntryKind.HEADER, "block": EntryKind.BLOCK, "end": EntryKind.END,
          "record": EntryKind.RECORD}


class _Open:
    """The record currently being received for one dataset."""

    __slots__ = ("lsn", "header", "nblocks", "fd", "staged", "hashes", "dirty", "upto",
                 "high", "ascending", "run", "run_first", "run_bytes")

    def __init__(self, lsn: int, header: Header) -> None:
        self.lsn = lsn
        self.header = header
        self.nblocks = block_count(header.size, header.block_size) if header.op is Op.FILE else 0
        self.fd = -1          # the staged file, open while its blocks arrive
        self.staged = ""
        self.hashes = bytearray()
        self.dirty = 0        # bytes written since write-back was last started
        # staged blocks: one past the highest staged so far, and whether they came in
        # ascending order (then every block below `upto` is staged or a hole: resumable;
        # see `arrived`)
        self.upto = 0
        self.ascending = True
        self.high = 0  # one past the highest block received (written, in the run, or a hole)
        # decoded blocks not written yet: consecutive, from block run_first (see `write`)
        self.run: list[bytes | memoryview] = []
        self.run_first = 0
        self.run_bytes = 0

    def write(self, index: int, data: bytes | memoryview) -> None:
        """Stages block `index`: it joins the run of blocks to be written with one call if
        it follows it (the run is written first if not, or if it is full)."""
        if self.run and index != self.run_first + len(self.run):
            self.flush()
        if not self.run:
            self.run_first = index
        self.run.append(data)
        self.run_bytes += len(data)
        if self.run_bytes >= WRITE_RUN_BYTES or len(self.run) >= WRITE_RUN_BUFFERS:
            self.flush()

    def flush(self) -> None:
        """Writes the run; only then do its blocks count as staged (`upto`), so a stream
        that breaks on a failed write keeps no claim to them."""
        if not self.run:
            return
        run, total, offset = self.run, self.run_bytes, self.run_first * self.header.block_size
        written = os.pwritev(self.fd, run, offset)
        if written < total:  # rare: a short write; go on from where it stopped
            pwrite_all(self.fd, memoryview(b"".join(run))[written:], offset + written)
        self.dirty += total
        if self.dirty >= WRITEBACK_BYTES:
            self.dirty = 0
            start_writeback(self.fd)
        self.upto = self.run_first + len(run)
        self.run = []
        self.run_bytes = 0

    @classmethod
    def resumed(cls, lsn: int, header: Header, p: Partial) -> _Open:
        """The partial record `p`, continued by `header` on this stream."""
        o = cls(lsn, header)
        o.fd, o.staged, o.hashes, o.dirty, o.upto = p.fd, p.staged, p.hashes, p.dirty, p.blocks
        o.high = p.blocks
        p.fd = -1  # the fd is the record's now
        return o

    def partial(self, store: PartialStore) -> Partial | None:
        """What a stream broken now leaves resumable of this record, if anything."""
        if not self.resumable():
            return None
        return Partial(self.lsn, self.header, self.fd, self.staged, self.hashes, self.upto,
                       self.dirty, store)

    def resumable(self) -> bool:
        return self.fd >= 0 and self.ascending and self.upto > 0

    def arrived(self, index: int) -> bool:
        """Notes that block `index` arrived; True if it is below one that arrived before
        (it may overwrite data: the record's blocks are no longer in ascending order)."""
        below = index < self.high
        if below:
            self.ascending = False
        else:
            self.high = index + 1
        return below


def _stageable(h: Header) -> bool:
    return h.op is Op.FILE and h.base is Base.EMPTY and h.size >= STAGE_MIN_SIZE


class Session:
    def __init__(self, receiver: Receiver, peer: str) -> None:
        self.receiver = receiver
        self.peer = peer
        self.source = ""
        self.datasets: list[ReceiverDataset] = []
        self._open: list[_Open | None] = []
        self._dirty: set[int] = set()
        self._resync: dict[int, list[str]] = {}
        self._wake = asyncio.Event()
        self._stream_bytes = 0
        self._clock = ClockOffset()
        self._reader: asyncio.Task[None] | None = None
        # One worker thread for the frame work of this session's batches; `_busy` is the
        # batch in it, which a newer stream waits for before it touches the journals.
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._busy: concurrent.futures.Future[tuple[set[int], Exception | None]] | None = None
        self._closing = False
        self._malformed = False  # a bad frame ended the stream: keep no partial record
        self._closer: asyncio.Future[None] | None = None
        self._released: asyncio.Future[None] | None = None  # release_open, once

    async def run(self, requests: AsyncIterator[pb.AgentMessage | RawBatch],
                  context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ReceiverMessage]:
        try:
            async with asyncio.timeout(HELLO_TIMEOUT):  # not wait_for: see Link._session
                first = await anext(requests)
        except (StopAsyncIteration, TimeoutError):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no hello")
            return
        try:
            try:
                welcome = await self._hello(first)
            except ProtocolError as e:
                log.warning("stream refused peer=%s error=%s", self.peer, e.message)
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, e.message)
                return
            except PermissionError as e:
                log.warning("stream refused peer=%s error=%s", self.peer, e)
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(e))
                return
            except OSError as e:  # a journal that could not be repaired yet
                await self._storage_failed(e, context)
                return
            yield pb.ReceiverMessage(welcome=welcome)
            self._reader = asyncio.create_task(self._read(requests), name=f"read {self.source}")
            while True:
                waiter = asyncio.create_task(self._wake.wait())
                done, _ = await asyncio.wait({waiter, self._reader},
                                             return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                if self._dirty:
                    yield pb.ReceiverMessage(ack=self._ack())
                if self._reader in done:
                    break
            error = self._reader.exception()
            if isinstance(error, ProtocolError):
                log.warning("stream ended source=%s peer=%s error=%s", self.source, self.peer,
                            error.message)
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, error.message)
            elif isinstance(error, OSError):
                await self._storage_failed(error, context)
            elif error is not None:
                raise error
        finally:
            # in a task of its own: gRPC may cancel this handler again while the close
            # awaits the worker, and a close cut short would leave the dataset shown as
            # connected, and its records unreleased, until the receiver restarts
            self._closer = asyncio.ensure_future(self._close())
            await asyncio.shield(self._closer)

    async def _storage_failed(self, error: OSError, context: grpc.aio.ServicerContext) -> None:
        """The receiver's own storage failed (a full disk, an I/O error): nothing was
        acknowledged that is not durable, the agent keeps its changes and retries, and its
        next hello repairs the journals."""
        message = f"receiver storage: {error.strerror or error}"
        log.error("stream ended source=%s peer=%s error=%s", self.source, self.peer, message)
        for ds in self.datasets:
            ds.storage_error = message
        full = error.errno in (errno.ENOSPC, errno.EDQUOT)
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED if full
                            else grpc.StatusCode.UNAVAILABLE, message)

    async def _hello(self, msg: pb.AgentMessage | RawBatch) -> pb.Welcome:
        if isinstance(msg, RawBatch) or msg.WhichOneof("kind") != "hello":
            raise ProtocolError("the stream must open with a hello")
        hello = msg.hello
        if hello.protocol_version != PROTOCOL_VERSION:
            raise ProtocolError(f"protocol version {hello.protocol_version} is not supported "
                                f"(this receiver speaks {PROTOCOL_VERSION})")
        if not 0 < len(hello.datasets) <= MAX_DATASETS:
            raise ProtocolError(f"hello with {len(hello.datasets)} datasets")
        self.source = self.receiver.check_source(hello.source_id, self.peer)
        names = [d.name for d in hello.datasets]
        if len(set(names)) != len(names):
            raise ProtocolError("a dataset is named twice in the hello")
        older = self.receiver.sessions.get(self.source)
        self.receiver.attach(self)
        if older is not None and older is not self:
            await older.quiesce()
            await older.release_open()  # now, so that its partials are in this welcome
        welcome = pb.Welcome(protocol_version=PROTOCOL_VERSION,
                             capabilities=[CAPABILITY_RECORDS])
        for i, d in enumerate(hello.datasets):
            ds = self.receiver.dataset(self.source, d.name, d.type)
            self.datasets.append(ds)  # now, so that a failed hello still closes it
            self._open.append(None)
            if ds.journal.failed is not None:
                # an earlier stream failed on our storage: cut the journal back to what was
                # durable and go on (this raises again while the disk is still full)
                await asyncio.to_thread(ds.journal.repair)
                ds.storage_error = None
            # an older stream may have left a partial record, or complete records whose
            # group commit it did not live to see: drop the one, make the others durable,
            # so that the position we announce is exactly what the journal holds
            ds.journal.discard_open()
            await asyncio.to_thread(ds.journal.sync)
            ds.flushed()
            partial = ds.partial
            if partial is not None and partial.lsn != ds.flushed_lsn + 1:
                ds.partial = None
                partial.discard(ds.mirror, ds.label, "not_the_next_record")
            ds.connected = True
            ds.last_contact_at = time.time()
            ds.agent_lag = AgentLag(state="starting", agent_time=time.time())
            ds.on_applied = self._applied
            position = welcome.datasets.add(
                dataset=i, epoch=1, written_lsn=ds.flushed_lsn, flushed_lsn=ds.flushed_lsn,
                applied_lsn=ds.applied_lsn, state="error" if ds.error else "streaming")
            if ds.partial is not None:
                position.partial.CopyFrom(ds.partial.position())
        log.info("agent connected source=%s peer=%s datasets=%s", self.source, self.peer,
                 ",".join(names))
        return welcome

    async def _read(self, requests: AsyncIterator[pb.AgentMessage | RawBatch]) -> None:
        """Takes the messages `_receive` queues, in order. Batches that are already waiting
        go to the worker together (up to GROUP_BYTES), so a burst costs one group commit per
        group instead of one per batch; a batch that arrives alone is committed at once."""
        inbox: asyncio.Queue[pb.Heartbeat | RawBatch | BaseException | None] = asyncio.Queue(
            INBOX_MESSAGES)
        receiving = asyncio.create_task(self._receive(requests, inbox),
                                        name=f"receive {self.source}")
        held: list[pb.Heartbeat | RawBatch | BaseException | None] = []  # taken while grouping
        try:
            while (item := held.pop() if held else await inbox.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, pb.Heartbeat):
                    self._heartbeat(item)
                    continue
                group, size = [item], len(item)
                while size < GROUP_BYTES and not inbox.empty():
                    after = inbox.get_nowait()
                    if not isinstance(after, RawBatch):
                        held.append(after)  # handled in order, after this group
                        break
                    group.append(after)
                    size += len(after)
                await self._batch(group)
                self._stream_bytes += size
        finally:
            receiving.cancel()
            with contextlib.suppress(BaseException):
                await receiving

    async def _receive(self, requests: AsyncIterator[pb.AgentMessage | RawBatch],
                       inbox: asyncio.Queue[pb.Heartbeat | RawBatch | BaseException | None]
                       ) -> None:
        """Reads the stream into `inbox` (bounded: gRPC's flow control holds the agent
        back when it is full); then None, or the error that ended it."""
        end: BaseException | None = None
        try:
            async for msg in requests:
                now = time.time()
                item: pb.Heartbeat | RawBatch
                if isinstance(msg, RawBatch):
                    item = msg
                else:
                    kind = msg.WhichOneof("kind")
                    if kind == "heartbeat":
                        item = msg.heartbeat
                    elif kind == "batch":  # a batch whose encoding did not start with it
                        item = RawBatch.of(msg)
                    else:
                        raise ProtocolError(f"unexpected {kind or 'empty'} message after the "
                                            "hello")
                for ds in self.datasets:
                    ds.last_contact_at = now
                await inbox.put(item)
        except Exception as e:
            end = e
        await inbox.put(end)

    async def _batch(self, batches: list[RawBatch]) -> None:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix=f"ingest {self.source}")
        self._busy = self._pool.submit(self._ingest, batches)
        touched, error = await asyncio.wrap_future(self._busy)
        # what was appended before a bad frame is still made durable and acknowledged
        if touched:
            for i in touched:
                self.datasets[i].storage_error = None
                self.datasets[i].flushed()
                self._dirty.add(i)
            self._wake.set()
        if error is not None:
            raise error

    def _ingest(self, batches: list[RawBatch]) -> tuple[set[int], Exception | None]:
        """In the worker thread: every frame of the batches, then the group commit. Returns
        the datasets made durable and the error that stopped the batches, if one did."""
        touched: set[int] = set()
        error: Exception | None = None
        try:
            for raw in batches:
                for f, payload in raw.frames():
                    if self._closing:
                        break
                    self._frame(f, payload)
                    touched.add(f.dataset)
        except Exception as e:
            error = e
            self._malformed = isinstance(e, ProtocolError)
        try:  # no block waits in memory once the worker is done: a partial may be kept now
            for open_ in self._open:
                if open_ is not None and open_.fd >= 0:
                    open_.flush()
        except OSError as e:
            error = error or e
        if touched:
            _sync_all([self.datasets[i].journal for i in touched])
            if error is None:
                self._save_partials(touched)
        return touched, error

    def _save_partials(self, touched: set[int]) -> None:
        """After a group commit: saves the progress of each big new file being received
        every SAVE_EVERY_BYTES (for a restart to continue it; in the store's thread, so
        that the blocks keep coming meanwhile), and forgets a saved one whose record is
        over (journaled, aborted or replaced), its END now durable."""
        for i in touched:
            ds, open_ = self.datasets[i], self._open[i]
            store = ds.partials
            if ds.partial is None:
                store.keep_only(open_.staged if open_ is not None and open_.fd >= 0 else "")
            if open_ is None or not open_.resumable():
                if open_ is not None and not open_.ascending:
                    # a block below the saved ones was rewritten: they no longer match
                    # their hashes, and no restart may continue from them
                    store.forget(open_.staged)
                continue
            saved = store.saved_blocks(open_.staged)
            if (open_.upto - saved) * open_.header.block_size >= SAVE_EVERY_BYTES:
                store.save_soon(open_.lsn, open_.header, open_.fd, open_.staged,
                                open_.hashes, open_.upto)

    async def quiesce(self) -> None:
        """Stops taking frames and waits for the batch in the worker thread to finish."""
        self._closing = True
        busy = self._busy
        if busy is not None and not busy.done():
            await asyncio.to_thread(concurrent.futures.wait, [busy])

    def _frame(self, f: pb.Frame, payload: bytes) -> None:
        """One frame, `payload` its serialized bytes as they came: what is journaled."""
        if f.dataset >= len(self.datasets):
            raise ProtocolError(f"frame for dataset #{f.dataset}, which the hello did not name")
        frame = frame_from_pb(f)
        ds = self.datasets[f.dataset]
        open_ = self._open[f.dataset]
        body = frame.body
        kind = _KINDS[f.WhichOneof("body")]
        ds.wire_bytes += len(payload)
        if kind is EntryKind.RECORD:
            assert isinstance(body, Whole)
            self._whole(ds, open_, frame.lsn, body, payload)
            return
        if kind is EntryKind.HEADER:
            assert isinstance(body, Header)
            _check_header(body, ds.label, frame.lsn)
            if open_ is not None:  # checked here too, so that its staged file is not lost
                raise ProtocolError(f"{ds.label} LSN {frame.lsn}: header inside record "
                                    f"{open_.lsn}")
            partial, ds.partial = ds.partial, None
            if body.resume_from:
                if partial is None or not partial.continued_by(body, frame.lsn):
                    if partial is not None:
                        partial.discard(ds.mirror, ds.label, "resumed_differently")
                    raise ProtocolError(f"{ds.label} LSN {frame.lsn}: resume of a record "
                                        "the receiver does not hold")
                # the open record owns the staged file from here, so it is kept or dropped
                # with it however this stream ends
                self._open[f.dataset] = _Open.resumed(frame.lsn, body, partial)
                log.info("record resumed dataset=%s lsn=%d path=%r from_block=%d of=%d",
                         ds.label, frame.lsn, body.path, body.resume_from,
                         block_count(body.size, body.block_size))
                self._append(ds, frame.lsn, kind, payload)
                return
            if partial is not None:
                partial.discard(ds.mirror, ds.label, "another_record")
            open_ = _Open(frame.lsn, body)
            self._open[f.dataset] = open_
            if _stageable(body):
                self._append(ds, frame.lsn, kind, payload)
                self._start_staged(ds, open_, frame.lsn)
                return
        elif open_ is None:
            raise ProtocolError(f"{ds.label} LSN {frame.lsn}: {kind.name.lower()} frame "
                                "outside a record")
        elif kind is EntryKind.BLOCK:
            _check_block(open_, f.block, ds.label, frame.lsn)
            if open_.staged:
                assert isinstance(body, Block)
                below = open_.arrived(body.index)
                if below:
                    # what is saved of this record (its hashes) may no longer match the
                    # staged file once this is written: no restart may find it, even one
                    # right after this write
                    ds.partials.forget(open_.staged, durable=True)
                _stage_block(open_, body, below, ds.label, frame.lsn)
                return
        else:
            self._open[f.dataset] = None
            if open_.staged:
                assert isinstance(body, End)
                self._finish_staged(ds, open_, frame.lsn, body)
        self._append(ds, frame.lsn, kind, payload)

    def _whole(self, ds: ReceiverDataset, open_: _Open | None, lsn: int, whole: Whole,
               payload: bytes) -> None:
        """A whole record in one frame: checked as its header, blocks and end would be,
        journaled as one RECORD entry. Only small records travel whole (a big one would
        hold a message for its whole size, and is staged or patched in place)."""
        h = whole.header
        _check_header(h, ds.label, lsn)
        if open_ is not None:
            raise ProtocolError(f"{ds.label} LSN {lsn}: record inside record {open_.lsn}")
        if h.op is Op.FILE and h.size >= STAGE_MIN_SIZE:
            raise ProtocolError(f"{ds.label} LSN {lsn}: a whole record of {h.size} bytes "
                                f"(at most {STAGE_MIN_SIZE - 1} travel whole)")
        if ds.partial is not None:
            partial, ds.partial = ds.partial, None
            partial.discard(ds.mirror, ds.label, "another_record")
        checked = _Open(lsn, h)
        for b in whole.blocks:
            _check_block(checked, b, ds.label, lsn)
        self._append(ds, lsn, EntryKind.RECORD, payload)
        ds.applier.decoded.put(lsn, payload, whole)  # spares the applier decoding it again

    @staticmethod
    def _append(ds: ReceiverDataset, lsn: int, kind: EntryKind, payload: bytes) -> None:
        try:
            ds.journal.append(lsn, kind, payload)
        except ValueError as e:
            raise ProtocolError(f"{ds.label}: {e}") from None

    @staticmethod
    def _start_staged(ds: ReceiverDataset, open_: _Open, lsn: int) -> None:
        h = open_.header
        open_.hashes = new_hashes(h)
        open_.fd, open_.staged = ds.mirror.new_incoming(lsn)

    def _finish_staged(self, ds: ReceiverDataset, open_: _Open, lsn: int, end: End) -> None:
        """The staged file made durable, then its STAGED entries journaled; the caller
        appends the END. An aborted record's file is deleted and no STAGED is journaled."""
        open_.flush()
        fd, open_.fd = open_.fd, -1
        try:
            try:
                if not end.aborted:
                    os.ftruncate(fd, open_.header.size)  # trailing holes
                    os.fdatasync(fd)
            finally:
                os.close(fd)
            if end.aborted:
                ds.mirror.discard_staged(open_.staged)
                return
            ds.mirror.sync_staging()
            name = os.fsencode(os.path.basename(open_.staged))
            step = STAGED_HASHES_PER_ENTRY * HASH_SIZE
            view = memoryview(open_.hashes)
            for at in range(0, len(view), step):
                self._append(ds, lsn, EntryKind.STAGED, encode_staged(name, view[at:at + step]))
        except BaseException:
            ds.mirror.discard_staged(open_.staged)
            raise

    async def release_open(self) -> None:
        """Lets go of the records this stream did not finish (call once no batch is in the
        worker thread): a big new file broken off part way becomes its dataset's partial
        (unless a malformed frame ended the stream), made durable and saved for a restart;
        any other staged file is deleted, since no record can name it (its END was never
        journaled). The work runs once, in a thread (it fdatasyncs); every caller waits
        for it."""
        if self._released is None:
            self._released = asyncio.ensure_future(asyncio.to_thread(self._release_open))
        await asyncio.shield(self._released)

    def _release_open(self) -> None:
        for i, (ds, open_) in enumerate(zip(self.datasets, self._open, strict=True)):
            self._open[i] = None
            if open_ is None or open_.fd < 0:
                continue
            partial = None if self._malformed else open_.partial(ds.partials)
            if partial is None:
                os.close(open_.fd)
                ds.partials.forget(open_.staged)
                ds.mirror.discard_staged(open_.staged)
                continue
            if ds.partial is not None:
                ds.partial.discard(ds.mirror, ds.label, "replaced")
            try:
                ds.partials.save(partial.lsn, partial.header, partial.fd, partial.staged,
                                 partial.hashes, partial.blocks)
            except OSError as e:  # kept all the same: a restart resumes from an earlier save
                log.warning("partial record not saved dataset=%s lsn=%d error=%s", ds.label,
                            partial.lsn, e.strerror or e)
            ds.partial = partial
            log.info("partial record kept dataset=%s lsn=%d path=%r blocks=%d of=%d saved=%d",
                     ds.label, partial.lsn, open_.header.path, partial.blocks, open_.nblocks,
                     ds.partials.saved_blocks(partial.staged))

    def _heartbeat(self, hb: pb.Heartbeat) -> None:
        mono = time.monotonic()
        offset = self._clock.update(hb.agent_time, mono)
        for d in hb.datasets:
            if d.dataset >= len(self.datasets):
                raise ProtocolError(f"heartbeat for dataset #{d.dataset}")
            self.datasets[d.dataset].agent_lag = AgentLag(
                state=d.state or "streaming", error=d.error, last_lsn=d.last_lsn,
                oldest_unwritten_at=d.oldest_unwritten_at,
                oldest_unflushed_at=d.oldest_unflushed_at,
                oldest_unapplied_at=d.oldest_unapplied_at, pending_bytes=d.pending_bytes,
                pending_changes=d.pending_changes, agent_time=hb.agent_time, received_mono=mono,
                clock_offset=offset)

    def _applied(self, ds: ReceiverDataset) -> None:
        i = self.datasets.index(ds)
        if ds.applier.resync_paths:
            self._resync.setdefault(i, []).extend(ds.applier.resync_paths)
            ds.applier.resync_paths.clear()
        self._dirty.add(i)
        self._wake.set()

    def _ack(self) -> pb.Ack:
        self._wake.clear()
        ack = pb.Ack(stream_bytes=self._stream_bytes)
        for i in sorted(self._dirty):
            ds = self.datasets[i]
            ack.datasets.append(pb.DatasetAck(
                dataset=i, written_lsn=ds.written_lsn, flushed_lsn=ds.flushed_lsn,
                applied_lsn=ds.applied_lsn, state="error" if ds.error else "",
                error=ds.error or "",
                resync_paths=[encode_name(p) for p in self._resync.pop(i, [])]))
        self._dirty.clear()
        return ack

    def cancel(self) -> None:
        """A newer stream of the same source replaces this one."""
        if self._reader is not None:
            self._reader.cancel()

    async def _close(self) -> None:
        self._closing = True
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()
            with contextlib.suppress(BaseException):  # the stream is over either way
                await self._reader
        await self.quiesce()
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        await self.release_open()
        if self.receiver.detach(self):
            for ds in self.datasets:
                ds.journal.discard_open()
                ds.connected = False
                ds.on_applied = None
            if self.source:
                log.info("agent disconnected source=%s peer=%s", self.source, self.peer)


def _sync_all(journals: list) -> None:  # type: ignore[type-arg]
    for j in journals:
        j.sync()


def _check_header(h: Header, label: str, lsn: int) -> None:
    try:
        split_relpath(h.path)
        if h.op is Op.RENAME:
            split_relpath(h.new_path)
    except PathRefused as e:
        raise ProtocolError(f"{label} LSN {lsn}: {e.message}") from None
    if h.op is Op.FILE and h.base is Base.EMPTY and h.base_digest:
        raise ProtocolError(f"{label} LSN {lsn}: a whole file carries a base digest")


def _stage_block(open_: _Open, b: Block, below: bool, label: str, lsn: int) -> None:
    """Stages block `b`; `below`: it came after a higher one (see `_Open.arrived`)."""
    bs = open_.header.block_size
    i = b.index
    if b.codec is Codec.ZERO:
        if b.data:
            raise ProtocolError(f"{label} LSN {lsn}: zero block carries data")
        h = zero_hash(b.raw_len)
        if not below:  # a new staged file is all holes already
            open_.flush()  # blocks before this hole first: `upto` counts in order
            open_.hashes[i * HASH_SIZE:(i + 1) * HASH_SIZE] = h
            open_.upto = i + 1
            return
        data: bytes | memoryview = bytes(b.raw_len)  # a hole over what may be data
    else:
        try:
            data = decode_block(b.codec, b.raw_len, b.data, bs)
        except ProtocolError as e:
            raise ProtocolError(f"{label} LSN {lsn}: block {i}: {e.message}") from None
        h = block_hash(data)
    open_.hashes[i * HASH_SIZE:(i + 1) * HASH_SIZE] = h
    open_.write(i, data)


def _check_block(open_: _Open, b: pb.Block | Block, label: str, lsn: int) -> None:
    h = open_.header
    if h.op is not Op.FILE:
        raise ProtocolError(f"{label} LSN {lsn}: block in a {h.op.name} record")
    if b.index >= open_.nblocks:
        raise ProtocolError(f"{label} LSN {lsn}: block {b.index} of a {open_.nblocks}-block file")
    if b.raw_len != block_length(b.index, h.size, h.block_size):
        raise ProtocolError(f"{label} LSN {lsn}: block {b.index} has length {b.raw_len}")
