"""A small asyncio HTTP server for /status (and, as they arrive, /metrics and /).

Deliberately tiny: GET only, one response per connection, no keep-alive. It serves
operators and Prometheus on a trusted address, not the internet.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable

from replicator.config import parse_hostport

log = logging.getLogger(__name__)

MAX_REQUEST = 8192
Route = Callable[[], tuple[str, bytes]]   # -> (content type, body)


class HttpServer:
    def __init__(self, address: str, routes: dict[str, Route]) -> None:
        self.host, self.port = parse_hostport(address)
        self.routes = routes
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("http listening address=%s port=%d", self.host, self.port)
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = line.split()
            if len(parts) != 3 or parts[0] not in ("GET", "HEAD"):
                await _respond(writer, 405, "text/plain", b"only GET\n")
                return
            path = parts[1].split("?", 1)[0]
            route = self.routes.get(path)
            if route is None:
                await _respond(writer, 404, "text/plain", b"not found\n")
                return
            ctype, body = route()
            await _respond(writer, 200, ctype, b"" if parts[0] == "HEAD" else body)
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


async def _respond(writer: asyncio.StreamWriter, code: int, ctype: str, body: bytes) -> None:
    reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed",
              500: "Internal Server Error"}[code]
    writer.write(f"HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\n"
                 f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\n"
                 "Connection: close\r\n\r\n".encode() + body)
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
