"""A small asyncio HTTP server for /status (and, as they arrive, /metrics and /).

Deliberately tiny: GET and HEAD only, no request bodies. It serves operators, dashboards
and Prometheus on a trusted address, not the internet. HTTP/1.1 connections are kept open
for the next request (until the client says `Connection: close` or is idle for
IDLE_TIMEOUT): a dashboard or script polling /status every few milliseconds would otherwise
cost the daemon a TCP accept and teardown per poll, on the event loop that also runs gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable

from replicator.config import parse_hostport

log = logging.getLogger(__name__)

MAX_REQUEST = 8192    # bytes of request line and headers; more closes the connection
IDLE_TIMEOUT = 10.0   # seconds a kept-alive connection may wait for its next request
Route = Callable[[], tuple[str, bytes]]   # -> (content type, body)


class HttpServer:
    def __init__(self, address: str, routes: dict[str, Route]) -> None:
        self.host, self.port = parse_hostport(address)
        self.routes = routes
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, self.host, self.port,
                                                  limit=MAX_REQUEST)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("http listening address=%s port=%d", self.host, self.port)
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):  # not wait_for, which can lose a cancel
                    await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await self._request(reader, writer):
                pass
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                ConnectionError):
            pass
        except Exception:
            log.exception("http handler failed")
            with contextlib.suppress(Exception):
                await _respond(writer, 500, "text/plain", b"internal error\n")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _request(self, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> bool:
        """Serves one request; True if the connection stays open for another."""
        try:
            async with asyncio.timeout(IDLE_TIMEOUT):  # not wait_for: see stop()
                head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as e:
            if e.partial:
                raise
            return False  # the client closed an idle connection: nothing to say
        line, _, fields = head.partition(b"\r\n")
        parts = line.decode("latin-1").split()
        keep = (len(parts) == 3 and parts[2] == "HTTP/1.1"
                and b"\nconnection: close" not in b"\n" + fields.lower())
        if len(parts) != 3 or parts[0] not in ("GET", "HEAD"):
            # a request body we do not read would be taken for the next request: close
            await _respond(writer, 405, "text/plain", b"only GET\n", keep=False)
            return False
        route = self.routes.get(parts[1].split("?", 1)[0])
        if route is None:
            await _respond(writer, 404, "text/plain", b"not found\n", keep=keep)
            return keep
        ctype, body = route()
        await _respond(writer, 200, ctype, b"" if parts[0] == "HEAD" else body,
                       length=len(body), keep=keep)
        return keep


async def _respond(writer: asyncio.StreamWriter, code: int, ctype: str, body: bytes, *,
                   length: int | None = None, keep: bool = False) -> None:
    """`length`: the Content-Length to state when it is not len(body) (a HEAD request)."""
    reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed",
              500: "Internal Server Error"}[code]
    writer.write(f"HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\n"
                 f"Content-Length: {len(body) if length is None else length}\r\n"
                 "Cache-Control: no-store\r\n"
                 f"Connection: {'keep-alive' if keep else 'close'}\r\n\r\n".encode() + body)
    await writer.drain()


@contextlib.asynccontextmanager
async def serving(address: str | None, routes: dict[str, Route]) -> AsyncIterator[None]:
    """Serves `routes` on `address` for the duration of the block (nothing if None)."""
    if not address:
        yield
        return
    server = HttpServer(address, routes)
    await server.start()
    try:
        yield
    finally:
        await server.stop()


def json_route(doc: Callable[[], object]) -> Route:
    return lambda: ("application/json", (json.dumps(doc(), indent=1) + "\n").encode())
