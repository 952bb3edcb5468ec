"""The test proxy forwards both ways, counts what crosses, half-closes, and cuts with RST."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import pytest

from tests.integration.tcpproxy import TcpProxy

DEADLINE = 5.0


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()
    except ConnectionError:
        writer.transport.abort()


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()


async def _connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), DEADLINE)


async def _roundtrip(port: int, payload: bytes) -> bytes:
    reader, writer = await _connect(port)
    writer.write(payload)
    await writer.drain()
    got = await asyncio.wait_for(reader.readexactly(len(payload)), DEADLINE)
    writer.close()
    return got


async def _wait_for(cond: object, what: str) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + DEADLINE
    while not cond():  # type: ignore[operator]
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


@pytest.mark.parametrize("size", [1, 4096, 65536 + 17, 3 * 1024 * 1024])
async def test_forwards_and_counts_both_ways(echo_port: int, size: int) -> None:
    payload = os.urandom(size)
    async with TcpProxy("127.0.0.1", echo_port) as proxy:
        assert proxy.port > 0
        assert await _roundtrip(proxy.port, payload) == payload
        await _wait_for(lambda: proxy.bytes_down == size, "bytes_down")
        assert proxy.bytes_up == size
        assert proxy.bytes_down == size
        assert proxy.connections_total == 1


async def test_counts_accumulate_over_connections(echo_port: int) -> None:
    async with TcpProxy("127.0.0.1", echo_port) as proxy:
        for size in (10, 20, 30):
            await _roundtrip(proxy.port, b"x" * size)
        await _wait_for(lambda: proxy.bytes_down == 60, "bytes_down")
        assert (proxy.bytes_up, proxy.connections_total) == (60, 3)


async def test_half_close_is_passed_on(echo_port: int) -> None:
    async with TcpProxy("127.0.0.1", echo_port) as proxy:
        reader, writer = await _connect(proxy.port)
        writer.write(b"last words")
        writer.write_eof()
        # the echo server only closes after it sees our EOF, so reading to EOF proves
        # the EOF went up and the server's close came back down
        assert await asyncio.wait_for(reader.read(), DEADLINE) == b"last words"
        writer.close()
        await _wait_for(lambda: proxy.open_connections == 0, "link closed")


async def test_cut_resets_open_connections_and_refuses_until_resume(echo_port: int) -> None:
    async with TcpProxy("127.0.0.1", echo_port) as proxy:
        reader, writer = await _connect(proxy.port)
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), DEADLINE) == b"ping"

        await proxy.cut()
        assert proxy.paused
        assert proxy.open_connections == 0
        # SO_LINGER 0: the peer sees a reset, not an orderly EOF
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(1), DEADLINE)
        writer.transport.abort()

        # while paused, a new connection is accepted by the kernel and then reset
        reader2, writer2 = await _connect(proxy.port)
        writer2.write(b"anyone?")
        with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
            await asyncio.wait_for(reader2.readexactly(7), DEADLINE)
        writer2.transport.abort()
        assert proxy.connections_total == 1

        proxy.resume()
        assert not proxy.paused
        assert await _roundtrip(proxy.port, b"back") == b"back"
        assert proxy.connections_total == 2


async def test_cut_without_pause_lets_new_connections_through(echo_port: int) -> None:
    async with TcpProxy("127.0.0.1", echo_port) as proxy:
        reader, writer = await _connect(proxy.port)
        await proxy.cut(pause=False)
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(1), DEADLINE)
        writer.transport.abort()
        assert not proxy.paused
        assert await _roundtrip(proxy.port, b"again") == b"again"


async def test_unreachable_target_resets_the_client() -> None:
    # a port that was free a moment ago: nothing listens on it
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    dead_port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    async with TcpProxy("127.0.0.1", dead_port) as proxy:
        reader, writer = await _connect(proxy.port)
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(1), DEADLINE)
        writer.transport.abort()


async def test_stop_closes_listener_and_connections(echo_port: int) -> None:
    proxy = TcpProxy("127.0.0.1", echo_port)
    port = await proxy.start()
    reader, writer = await _connect(port)
    await proxy.stop()
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(1), DEADLINE)
    writer.transport.abort()
    with pytest.raises(ConnectionRefusedError):
        await _connect(port)
    await proxy.stop()  # twice is fine


async def test_cut_after_stops_at_the_mark(echo_port: int) -> None:
    async with TcpProxy("127.0.0.1", echo_port) as proxy:
        done = proxy.cut_after(100_000)
        reader, writer = await _connect(proxy.port)
        writer.write(os.urandom(1 << 20))
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await asyncio.wait_for(reader.readexactly(1 << 20), DEADLINE)
        await asyncio.wait_for(done.wait(), DEADLINE)
        assert 100_000 <= proxy.bytes_up < 100_000 + 64 * 1024
        assert proxy.paused and proxy.open_connections == 0
        writer.transport.abort()


async def test_hold_after_stops_forwarding_until_released(echo_port: int) -> None:
    async with TcpProxy("127.0.0.1", echo_port) as proxy:
        holding = proxy.hold_after(100_000)
        reader, writer = await _connect(proxy.port)
        payload = os.urandom(1 << 20)
        writer.write(payload)
        await asyncio.wait_for(holding.wait(), DEADLINE)
        await asyncio.sleep(0.2)  # nothing more goes up while it holds
        assert 100_000 <= proxy.bytes_up < 100_000 + 64 * 1024
        assert proxy.open_connections == 1 and not proxy.paused
        proxy.release()
        assert await asyncio.wait_for(reader.readexactly(1 << 20), DEADLINE) == payload
        assert proxy.bytes_up == 1 << 20
        writer.close()
