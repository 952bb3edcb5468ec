"""A TCP proxy for integration tests: put it between an agent and a receiver to count the
bytes that cross, and to cut the link on demand.

`cut_after(n)` does the same as soon as `n` bytes have gone up, exactly, however fast the
peers are (a test that polls the counter may see the whole transfer pass first).

`hold_after(n)` stops forwarding upwards once `n` bytes have gone up, leaving connections
open (as a stalled path does), until `release()`: the receiver gets exactly those bytes and
the test can then do something to either end (kill it) at a known point of the transfer.

`cut()` resets every open connection (SO_LINGER 0, so the peers see RST rather than a
polite FIN, as when a network path dies or a middlebox drops state) and then keeps
resetting new connections until `resume()`. Each direction is pumped by its own task, so
a half-close (EOF one way) is passed on without closing the other direction.

Runs on the caller's event loop, no threads: usable straight from a pytest-asyncio test.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from types import TracebackType

LISTEN_HOST = "127.0.0.1"
CHUNK_SIZE = 64 * 1024
# struct linger {int l_onoff; int l_linger;}: on, 0 seconds -> close() sends RST
_LINGER_RST = struct.pack("ii", 1, 0)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close the writer's connection abruptly, with RST where the socket allows it."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    writer.transport.abort()


class _Link:
    """One proxied connection: the client side, the target side and their two pumps."""

    def __init__(self, client: asyncio.StreamWriter, target: asyncio.StreamWriter) -> None:
        self.client = client
        self.target = target
        self.tasks: list[asyncio.Task[None]] = []

    def reset(self) -> None:
        _reset(self.client)
        _reset(self.target)
        for task in self.tasks:
            task.cancel()


class TcpProxy:
    """Forwards connections on 127.0.0.1:<port> to target_host:target_port.

    `bytes_up` counts bytes forwarded client -> target, `bytes_down` target -> client.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.bytes_up = 0
        self.bytes_down = 0
        self.connections_total = 0
        self._paused = False
        self._server: asyncio.Server | None = None
        self._port = 0
        self._links: set[_Link] = set()
        self._connecting: set[asyncio.StreamWriter] = set()  # clients awaiting the target
        self._handlers: set[asyncio.Task[None]] = set()
        self._cut_after: int | None = None
        self._cut_done = asyncio.Event()
        self._cut_task: asyncio.Task[None] | None = None
        self._hold_after: int | None = None
        self._holding = asyncio.Event()
        self._released = asyncio.Event()

    @property
    def port(self) -> int:
        """The listening port; 0 before `start()`."""
        return self._port

    @property
    def paused(self) -> bool:
        """True between `cut()` and `resume()`: new connections are reset at once."""
        return self._paused

    @property
    def open_connections(self) -> int:
        return len(self._links)

    async def start(self) -> int:
        """Listen on 127.0.0.1, port chosen by the kernel; return the port."""
        self._server = await asyncio.start_server(self._accept, LISTEN_HOST, 0)
        self._port = self._server.sockets[0].getsockname()[1]
        return self._port

    async def cut(self, *, pause: bool = True) -> None:
        """Reset every open connection. With `pause` (the default), also reset every new
        connection until `resume()`; without it, new connections are proxied as usual."""
        self._paused = pause
        for writer in self._connecting:
            _reset(writer)
        self._connecting.clear()
        links = list(self._links)
        self._links.clear()
        for link in links:
            link.reset()
        tasks = [t for link in links for t in link.tasks]
        await asyncio.gather(*tasks, return_exceptions=True)

    def cut_after(self, nbytes: int) -> asyncio.Event:
        """Cut (and pause) once `bytes_up` reaches `nbytes`; the event is set when done.
        Nothing more goes up once the chunk that crossed the mark is forwarded."""
        self._cut_after = nbytes
        self._cut_done.clear()
        return self._cut_done

    async def _cut_now(self) -> None:
        await self.cut()
        self._cut_done.set()

    def hold_after(self, nbytes: int) -> asyncio.Event:
        """Stop forwarding upwards once `bytes_up` reaches `nbytes` (connections stay
        open) until `release()`; the event is set once it holds."""
        self._hold_after = nbytes
        self._holding.clear()
        self._released.clear()
        return self._holding

    def release(self) -> None:
        """Forward again what `hold_after` held, and everything after it."""
        self._hold_after = None
        self._released.set()

    def resume(self) -> None:
        """Accept and proxy new connections again."""
        self._paused = False

    async def stop(self) -> None:
        """Stop listening and reset every open connection. Safe to call twice."""
        if self._server is not None:
            self._server.close()
        await self.cut()
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> TcpProxy:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()

    async def _accept(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            # stop() cancels handlers still connecting to the target; this is the top of
            # the handler task, so end it quietly (asyncio 3.11 logs cancelled handlers)
            _reset(writer)
        finally:
            self._handlers.discard(task)

    async def _serve(self, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        if self._paused:
            _reset(writer)
            return
        self._connecting.add(writer)
        try:
            t_reader, t_writer = await asyncio.open_connection(self.target_host,
                                                               self.target_port)
        except OSError:
            # the target refuses: the client must see a failure, not a silent open socket
            _reset(writer)
            return
        finally:
            self._connecting.discard(writer)
        if writer.is_closing():  # cut() reset the client while we were connecting
            _reset(t_writer)
            return
        self.connections_total += 1
        link = _Link(writer, t_writer)
        link.tasks = [asyncio.create_task(self._pump(reader, t_writer, up=True)),
                      asyncio.create_task(self._pump(t_reader, writer, up=False))]
        self._links.add(link)
        try:
            done, _ = await asyncio.wait(link.tasks, return_when=asyncio.FIRST_EXCEPTION)
            if any(t.cancelled() or t.exception() is not None for t in done):
                link.reset()
            await asyncio.gather(*link.tasks, return_exceptions=True)
            if not any(t.cancelled() or t.exception() is not None for t in link.tasks):
                writer.close()
                t_writer.close()
        finally:
            self._links.discard(link)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                    *, up: bool) -> None:
        """Copy src to dst until EOF, then half-close dst. A reset on either side raises,
        and the caller resets the whole link, as a real broken path would."""
        while True:
            data = await src.read(CHUNK_SIZE)
            if not data:
                break
            dst.write(data)
            await dst.drain()
            if up:
                self.bytes_up += len(data)
                if self._cut_after is not None and self.bytes_up >= self._cut_after:
                    self._cut_after = None
                    self._cut_task = asyncio.create_task(self._cut_now())
                    await self._cut_done.wait()  # cancelled by the cut
                if self._hold_after is not None and self.bytes_up >= self._hold_after:
                    self._holding.set()
                    await self._released.wait()
            else:
                self.bytes_down += len(data)
        if dst.can_write_eof() and not dst.is_closing():
            dst.write_eof()
