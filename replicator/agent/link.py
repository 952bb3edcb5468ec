"""The agent's one stream to the receiver.

`Link` keeps a single bidirectional gRPC stream open for every dataset of the agent:
hello and welcome, frames batched into messages of about 1 MiB, a window of bytes sent
but not yet journaled by the receiver (a slow receiver slows the producers, it never
grows the agent's memory), heartbeats, and acks routed back to the datasets. When the
stream breaks it reconnects with capped exponential backoff; every connection has a new
generation number, and a producer that started a record under an older generation gets
`Disconnected` so that it drops the record and lets the rescan after the reconnect find
the change again.

Producers batch naturally: the sender task takes everything queued (up to BATCH_BYTES)
each time it is free, so a lone small change goes out at once and a bulk transfer fills
whole messages.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc

from replicator import __version__
from replicator.core.records import Frame
from replicator.errors import StateUnwritable
from replicator.wire import CAPABILITY_RECORDS, PROTOCOL_VERSION, pb
from replicator.wire.framing import Buffer, batch_message, encode_frame, parts_size
from replicator.wire.stream import agent_stream

log = logging.getLogger(__name__)

BATCH_BYTES = 1 << 20
WINDOW_BYTES = 32 << 20
HEARTBEAT_INTERVAL = 1.0
BACKOFF_INITIAL = 0.2
BACKOFF_MAX = 10.0
CONNECT_TIMEOUT = 10.0
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", 16 << 20),
    ("grpc.max_send_message_length", 16 << 20),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.enable_retries", 0),
]


class Disconnected(Exception):
    """The stream a record was being sent on is gone."""


@dataclass(frozen=True, slots=True)
class Announce:
    """What a dataset says of itself in the hello."""

    name: str
    type: str
    block_size: int
    acked_lsn: int


class Endpoint(Protocol):
    """A dataset as the link sees it. Every method is called on the event loop."""

    def announce(self) -> Announce: ...

    def on_welcome(self, generation: int, position: pb.DatasetPosition) -> None:
        """The stream is (re)opened; `position` is the receiver's. Called before any send."""

    def on_ack(self, ack: pb.DatasetAck) -> None:
        """Positions moved (and maybe paths to resend whole)."""

    def on_disconnect(self) -> None:
        """The stream broke; on_welcome follows when it is back."""

    def lag(self) -> pb.DatasetLag:
        """The dataset's lag figures for a heartbeat (agent clock)."""

    def before_send(self) -> None:
        """Frames queued so far are about to go on the wire: persist what must survive.

        Raises StateUnwritable if that cannot be done yet (a full disk): the link holds
        the frames back and asks again later, with backoff.
        """


class Link:
    def __init__(self, target: str, source_id: str, *,
                 credentials: grpc.ChannelCredentials | None = None,
                 window: int = WINDOW_BYTES, batch_bytes: int = BATCH_BYTES) -> None:
        self.target = target
        self.source_id = source_id
        self.credentials = credentials
        self.window = window
        self.batch_bytes = batch_bytes
        self.endpoints: list[Endpoint] = []
        self.generation = 0
        # the receiver takes a small record as one frame (its Welcome said "records")
        self.whole_records = False
        self.connected = asyncio.Event()
        self.last_error: str | None = None
        self.bytes_sent = 0              # wire bytes of all streams, for metrics
        self.dataset_bytes: list[int] = []  # frame bytes queued per dataset, for metrics
        # frames encoded as they will be in the batch (see wire.framing), with their sizes
        self._queue: collections.deque[tuple[list[Buffer], int]] = collections.deque()
        self._queued_bytes = 0
        self._sent = 0                   # stream bytes of the current stream
        self._acked = 0                  # stream bytes the receiver has journaled
        self._has_data = asyncio.Event()
        self._room = asyncio.Condition()
        self._call: grpc.aio.StreamStreamCall | None = None
        self._write_lock = asyncio.Lock()  # grpc.aio allows one write at a time per call
        self._heartbeat_due = asyncio.Event()

    def add(self, endpoint: Endpoint) -> int:
        self.endpoints.append(endpoint)
        self.dataset_bytes.append(0)
        return len(self.endpoints) - 1

    # ---- producers ----

    async def wait_connected(self) -> int:
        await self.connected.wait()
        return self.generation

    async def send(self, generation: int, dataset: int, frames: Sequence[Frame]) -> None:
        """Queues frames of one dataset; waits while the window is full.

        The frames are encoded here, keeping block payloads as the buffers given: the
        caller may reuse those buffers once this returns only if they are immutable
        (bytes, or a view of bytes), as the reader's are.
        """
        encoded = [encode_frame(dataset, f) for f in frames]
        sizes = [parts_size(p) for p in encoded]
        size = sum(sizes)
        async with self._room:
            await self._room.wait_for(lambda: generation != self.generation or self._fits(size))
            if generation != self.generation or not self.connected.is_set():
                raise Disconnected()
            self._queue.extend(zip(encoded, sizes, strict=True))
            self._queued_bytes += size
            self.dataset_bytes[dataset] += size
        self._has_data.set()

    def _fits(self, size: int) -> bool:
        in_flight = self._sent - self._acked + self._queued_bytes
        return in_flight == 0 or in_flight + size <= self.window

    def heartbeat_soon(self) -> None:
        """A dataset's state changed: tell the receiver now, not at the next tick."""
        self._heartbeat_due.set()

    # ---- the connection ----

    async def run(self) -> None:
        """Connects, and reconnects, until cancelled."""
        backoff = BACKOFF_INITIAL
        while True:
            started = time.monotonic()
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as e:
                self._lost(f"{e.code().name}: {e.details()}")
            except Exception as e:  # keep the agent alive; say what happened
                self._lost(f"{type(e).__name__}: {e}")
            if time.monotonic() - started > 30:
                backoff = BACKOFF_INITIAL
            await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
            backoff = min(backoff * 2, BACKOFF_MAX)

    def _lost(self, error: str) -> None:
        if error != self.last_error:
            log.warning("receiver link down target=%s error=%s", self.target, error)
        self.last_error = error

    async def _session(self) -> None:
        if self.credentials is None:
            channel = grpc.aio.insecure_channel(self.target, options=GRPC_OPTIONS)
        else:
            channel = grpc.aio.secure_channel(self.target, self.credentials, options=GRPC_OPTIONS)
        async with channel:
            call = agent_stream(channel)(wait_for_ready=False)
            self._call = call
            hello = pb.Hello(protocol_version=PROTOCOL_VERSION, source_id=self.source_id,
                             agent_version=__version__)
            for ep in self.endpoints:
                a = ep.announce()
                hello.datasets.append(pb.DatasetHello(name=a.name, type=a.type,
                                                      block_size=a.block_size,
                                                      acked_lsn=a.acked_lsn))
            await call.write(pb.AgentMessage(hello=hello))
            # asyncio.timeout, not wait_for: in 3.11 wait_for loses a cancellation that
            # arrives as the welcome does, and the agent then never stops (seen: SIGINT
            # right at start-up left `replicator mirror` running, 1 run in 20)
            async with asyncio.timeout(CONNECT_TIMEOUT):
                first = await call.read()
            if first is grpc.aio.EOF or first.WhichOneof("kind") != "welcome":
                raise ConnectionError("the receiver did not answer the hello")
            self.generation += 1
            self.whole_records = CAPABILITY_RECORDS in first.welcome.capabilities
            self._sent = self._acked = 0
            self._queue.clear()
            self._queued_bytes = 0
            for pos in first.welcome.datasets:
                if pos.dataset < len(self.endpoints):
                    self.endpoints[pos.dataset].on_welcome(self.generation, pos)
            if self.last_error is not None:
                log.info("receiver link recovered target=%s", self.target)
            else:
                log.info("receiver link up target=%s", self.target)
            self.last_error = None
            self.connected.set()
            async with self._room:
                self._room.notify_all()
            tasks = [asyncio.create_task(self._reader(call)),
                     asyncio.create_task(self._sender(call)),
                     asyncio.create_task(self._heartbeats(call))]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    t.result()
                raise ConnectionError("the stream ended")
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                self.connected.clear()
                self._call = None
                self.generation += 1
                self._queue.clear()
                self._queued_bytes = 0
                async with self._room:
                    self._room.notify_all()
                for ep in self.endpoints:
                    ep.on_disconnect()
                call.cancel()

    async def _reader(self, call: grpc.aio.StreamStreamCall) -> None:
        while True:
            msg = await call.read()
            if msg is grpc.aio.EOF:
                return
            if msg.WhichOneof("kind") != "ack":
                continue
            ack = msg.ack
            if ack.stream_bytes > self._acked:
                self._acked = ack.stream_bytes
                async with self._room:
                    self._room.notify_all()
            for d in ack.datasets:
                if d.dataset < len(self.endpoints):
                    self.endpoints[d.dataset].on_ack(d)

    async def _sender(self, call: grpc.aio.StreamStreamCall) -> None:
        while True:
            await self._has_data.wait()
            self._has_data.clear()
            while self._queue:
                parts: list[Buffer] = []
                taken = 0
                while self._queue and (taken == 0 or taken < self.batch_bytes):
                    frame, n = self._queue.popleft()
                    parts += frame
                    taken += n
                self._queued_bytes = max(0, self._queued_bytes - taken)
                await self._before_send()
                msg = batch_message(parts, taken)
                del parts  # the payload views: what they keep alive is in msg now
                size = len(msg)
                self._sent += size
                self.bytes_sent += size
                async with self._write_lock:
                    await call.write(msg)

    async def _before_send(self) -> None:
        """Nothing reaches the receiver that a restarted agent would not know of: while an
        endpoint cannot persist its records, the message waits (heartbeats and acks go on)."""
        delay = BACKOFF_INITIAL
        while True:
            try:
                for ep in self.endpoints:
                    ep.before_send()
                return
            except StateUnwritable:
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)

    async def _heartbeats(self, call: grpc.aio.StreamStreamCall) -> None:
        while True:
            hb = pb.Heartbeat(agent_time=time.time())
            for i, ep in enumerate(self.endpoints):
                lag = ep.lag()
                lag.dataset = i
                hb.datasets.append(lag)
            self._heartbeat_due.clear()
            async with self._write_lock:
                await call.write(pb.AgentMessage(heartbeat=hb))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(HEARTBEAT_INTERVAL):
                    await self._heartbeat_due.wait()

