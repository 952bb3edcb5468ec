"""The daemons' small HTTP server, over real sockets: routes, methods, keep-alive."""

from __future__ import annotations

import asyncio
import http.client
import socket
from collections.abc import AsyncIterator

import pytest

from replicator.observe.http import MAX_REQUEST, HttpServer, json_route

Calls = list[str]


@pytest.fixture
async def server() -> AsyncIterator[tuple[int, Calls]]:
    calls: Calls = []

    def status() -> tuple[str, bytes]:
        calls.append("status")
        return "application/json", b'{"ok": true}\n'

    s = HttpServer("127.0.0.1:0", {"/status": status,
                                    "/doc": json_route(lambda: {"n": len(calls)})})
    port = await s.start()
    try:
        yield port, calls
    finally:
        await s.stop()


def _get_many(port: int, paths: list[str]) -> list[tuple[int, bytes, int]]:
    """GETs on one kept-alive connection: (status, body, local port of the socket)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    out = []
    try:
        for p in paths:
            conn.request("GET", p)
            r = conn.getresponse()
            out.append((r.status, r.read(), conn.sock.getsockname()[1]))
    finally:
        conn.close()
    return out


async def test_polls_share_one_connection(server: tuple[int, Calls]) -> None:
    port, calls = server
    got = await asyncio.to_thread(_get_many, port, ["/status", "/missing", "/status?x=1",
                                                    "/doc"])
    assert [(s, b) for s, b, _ in got] == [(200, b'{"ok": true}\n'), (404, b"not found\n"),
                                           (200, b'{"ok": true}\n'), (200, b'{\n "n": 2\n}\n')]
    assert len({local for _, _, local in got}) == 1, "one TCP connection for every poll"
    assert calls == ["status", "status"]


def _raw(port: int, request: bytes) -> bytes:
    """Sends `request` and reads until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(request)
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:  # closed with unread bytes from us: a reset, not a FIN
            pass
    return b"".join(chunks)


@pytest.mark.parametrize("request_bytes, status, closes", [
    (b"GET /status HTTP/1.0\r\n\r\n", b"200", True),                    # 1.0: one request
    (b"GET /status HTTP/1.1\r\nConnection: close\r\n\r\n", b"200", True),
    (b"GET /status HTTP/1.1\r\nCONNECTION: Close\r\n\r\n", b"200", True),
    (b"POST /status HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc", b"405", True),
    (b"HEAD /status HTTP/1.1\r\nConnection: close\r\n\r\n", b"200", True),
])
async def test_connection_closes_when_it_should(server: tuple[int, Calls], request_bytes: bytes,
                                                status: bytes, closes: bool) -> None:
    port, _ = server
    reply = await asyncio.wait_for(asyncio.to_thread(_raw, port, request_bytes), 10)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.split()[1] == status
    assert b"Connection: close" in head
    if request_bytes.startswith(b"HEAD"):
        assert body == b"" and b"Content-Length: 13" in head


async def test_an_oversized_request_is_dropped(server: tuple[int, Calls]) -> None:
    port, calls = server
    huge = b"GET /status HTTP/1.1\r\nX: " + b"a" * (MAX_REQUEST * 2) + b"\r\n\r\n"
    reply = await asyncio.wait_for(asyncio.to_thread(_raw, port, huge), 10)
    assert reply == b"" and calls == []
