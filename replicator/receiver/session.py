"""One agent's stream on the receiver.

The stream opens with a Hello; the session answers with a Welcome carrying every dataset's
positions, then takes Batches of frames and Heartbeats. Each batch is checked frame by frame
(nothing from the wire is trusted: dataset index, LSN order, paths, block indexes and
lengths), appended to the datasets' journals, and made durable with one fsync per journal
(group commit) before it is acknowledged. Acks go back whenever a dataset's flushed or
applied LSN moves; several moves between two sends coalesce into one ack.

A malformed frame ends the stream with INVALID_ARGUMENT and a one-line reason; what was
journaled before it stays, the incomplete record is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc

from replicator.core.blocks import block_count, block_length
from replicator.core.paths import encode_name, split_relpath
from replicator.core.records import Base, Header, Op
from replicator.errors import PathRefused, ProtocolError
from replicator.lag import AgentLag
from replicator.receiver.dataset import ReceiverDataset
from replicator.receiver.journal import EntryKind
from replicator.wire import PROTOCOL_VERSION, pb
from replicator.wire.convert import frame_from_pb

if TYPE_CHECKING:
    from replicator.receiver.receiver import Receiver

log = logging.getLogger(__name__)

HELLO_TIMEOUT = 30.0
MAX_DATASETS = 1024
_KINDS = {"header": EntryKind.HEADER, "block": EntryKind.BLOCK, "end": EntryKind.END}


class _Open:
    """The record currently being received for one dataset."""

    __slots__ = ("header", "nblocks")

    def __init__(self, header: Header) -> None:
        self.header = header
        self.nblocks = block_count(header.size, header.block_size) if header.op is Op.FILE else 0


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
        self._reader: asyncio.Task[None] | None = None

    async def run(self, requests: AsyncIterator[pb.AgentMessage],
                  context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ReceiverMessage]:
        try:
            first = await asyncio.wait_for(anext(requests), HELLO_TIMEOUT)
        except (StopAsyncIteration, TimeoutError):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no hello")
            return
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
        try:
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
            elif error is not None:
                raise error
        finally:
            await self._close()

    async def _hello(self, msg: pb.AgentMessage) -> pb.Welcome:
        if msg.WhichOneof("kind") != "hello":
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
        self.receiver.attach(self)
        welcome = pb.Welcome(protocol_version=PROTOCOL_VERSION)
        for i, d in enumerate(hello.datasets):
            ds = self.receiver.dataset(self.source, d.name, d.type)
            # an older stream may have left a partial record, or complete records whose
            # group commit it did not live to see: drop the one, make the others durable,
            # so that the position we announce is exactly what the journal holds
            ds.journal.discard_open()
            await asyncio.to_thread(ds.journal.sync)
            ds.flushed()
            ds.connected = True
            ds.last_contact_at = time.time()
            ds.agent_lag = AgentLag(state="starting", agent_time=time.time())
            ds.on_applied = self._applied
            self.datasets.append(ds)
            self._open.append(None)
            welcome.datasets.append(pb.DatasetPosition(
                dataset=i, epoch=1, written_lsn=ds.flushed_lsn, flushed_lsn=ds.flushed_lsn,
                applied_lsn=ds.applied_lsn, state="error" if ds.error else "streaming"))
        log.info("agent connected source=%s peer=%s datasets=%s", self.source, self.peer,
                 ",".join(names))
        return welcome

    async def _read(self, requests: AsyncIterator[pb.AgentMessage]) -> None:
        async for msg in requests:
            now = time.time()
            kind = msg.WhichOneof("kind")
            if kind == "batch":
                await self._batch(msg.batch)
                self._stream_bytes += msg.ByteSize()
            elif kind == "heartbeat":
                self._heartbeat(msg.heartbeat)
            else:
                raise ProtocolError(f"unexpected {kind or 'empty'} message after the hello")
            for ds in self.datasets:
                ds.last_contact_at = now

    async def _batch(self, batch: pb.Batch) -> None:
        touched: set[int] = set()
        try:
            for f in batch.frames:
                self._frame(f)
                touched.add(f.dataset)
        finally:
            # what was appended before a bad frame is still made durable and acknowledged
            if touched:
                journals = [self.datasets[i].journal for i in touched]
                await asyncio.to_thread(_sync_all, journals)
                for i in touched:
                    self.datasets[i].flushed()
                    self._dirty.add(i)
                self._wake.set()

    def _frame(self, f: pb.Frame) -> None:
        if f.dataset >= len(self.datasets):
            raise ProtocolError(f"frame for dataset #{f.dataset}, which the hello did not name")
        frame = frame_from_pb(f)
        ds = self.datasets[f.dataset]
        open_ = self._open[f.dataset]
        body = frame.body
        kind = _KINDS[f.WhichOneof("body")]
        if kind is EntryKind.HEADER:
            assert isinstance(body, Header)
            _check_header(body, ds.label, frame.lsn)
            self._open[f.dataset] = _Open(body)
        elif open_ is None:
            raise ProtocolError(f"{ds.label} LSN {frame.lsn}: {kind.name.lower()} frame "
                                "outside a record")
        elif kind is EntryKind.BLOCK:
            _check_block(open_, f.block, ds.label, frame.lsn)
        else:
            self._open[f.dataset] = None
        try:
            ds.journal.append(frame.lsn, kind, f.SerializeToString())
        except ValueError as e:
            raise ProtocolError(f"{ds.label}: {e}") from None

    def _heartbeat(self, hb: pb.Heartbeat) -> None:
        mono = time.monotonic()
        for d in hb.datasets:
            if d.dataset >= len(self.datasets):
                raise ProtocolError(f"heartbeat for dataset #{d.dataset}")
            self.datasets[d.dataset].agent_lag = AgentLag(
                state=d.state or "streaming", error=d.error, last_lsn=d.last_lsn,
                oldest_unwritten_at=d.oldest_unwritten_at,
                oldest_unflushed_at=d.oldest_unflushed_at,
                oldest_unapplied_at=d.oldest_unapplied_at, pending_bytes=d.pending_bytes,
                pending_changes=d.pending_changes, agent_time=hb.agent_time, received_mono=mono)

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
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()
            with contextlib.suppress(BaseException):  # the stream is over either way
                await self._reader
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


def _check_block(open_: _Open, b: pb.Block, label: str, lsn: int) -> None:
    h = open_.header
    if h.op is not Op.FILE:
        raise ProtocolError(f"{label} LSN {lsn}: block in a {h.op.name} record")
    if b.index >= open_.nblocks:
        raise ProtocolError(f"{label} LSN {lsn}: block {b.index} of a {open_.nblocks}-block file")
    if b.raw_len != block_length(b.index, h.size, h.block_size):
        raise ProtocolError(f"{label} LSN {lsn}: block {b.index} has length {b.raw_len}")
