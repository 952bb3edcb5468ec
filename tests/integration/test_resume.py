"""A link cut in the middle of one big file continues that file; it does not start over."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

from tests.integration.conftest import Pair
from tests.integration.harness import get_json, wait_converged, wait_for
from tests.integration.tcpproxy import TcpProxy
from tests.integration.test_resilience import pair_through_proxy

SIZE = 80 << 20
CUT_AT = 40 << 20


@contextlib.asynccontextmanager
async def _big_file_through_proxy(tmp_path: Path) -> AsyncIterator[tuple[Pair, TcpProxy]]:
    """A pair whose link runs through a proxy, and one incompressible file (wire ~ raw)."""
    p, proxy = await pair_through_proxy(tmp_path)
    (p.src / "big.bin").write_bytes(os.urandom(SIZE))
    try:
        yield p, proxy
    finally:
        p.agent.kill()
        p.receiver.kill()
        await proxy.stop()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def _cut_mid_file(p: Pair, proxy: TcpProxy) -> None:
    """Starts both daemons, cuts the link halfway through the file and waits until the
    receiver has seen the stream go (and so kept what arrived)."""
    cut = proxy.cut_after(CUT_AT)
    p.receiver.start()
    p.agent.start()
    await asyncio.wait_for(cut.wait(), 60)
    await asyncio.to_thread(wait_for, lambda: "partial record kept" in p.receiver.log(), 30,
                            0.05, "the receiver to keep the partial file")


async def _converge_never_torn(p: Pair, name: str) -> None:
    """Waits for the mirror to match, checking on the way that the mirror's file, whenever
    it is there, is the whole file: a torn file is never installed."""
    want = _sha(p.src / name)
    dst = p.dst / name

    def whole_or_absent() -> bool:
        if dst.exists():
            assert _sha(dst) == want, "a torn file was installed"
            return True
        return False

    await asyncio.to_thread(wait_for, whole_or_absent, 90, 0.02, "the file in the mirror")
    await asyncio.to_thread(wait_converged, p.src, p.dst, 60)


def _incoming(p: Pair) -> list[str]:
    return [n for _, _, files in os.walk(p.tmp / "rstate") for n in files
            if n.startswith(".incoming-")]


async def test_link_cut_mid_file_resumes_from_where_it_broke(tmp_path: Path) -> None:
    async with _big_file_through_proxy(tmp_path) as (p, proxy):
        await _cut_mid_file(p, proxy)
        proxy.resume()
        await _converge_never_torn(p, "big.bin")
        sent = proxy.bytes_up
        # without the resume the first 40 MiB go twice: 120 MiB; with it, the file once
        # plus what was in flight when the link broke (the window is 32 MiB at most)
        assert sent < SIZE * 5 // 4, f"{sent} bytes sent for a file of {SIZE}"
        assert "record resumed" in p.receiver.log()
        row = get_json(p.receiver_status)["datasets"][0]
        assert row["applied_lsn"] == row["flushed_lsn"] == 1, row
        assert _incoming(p) == []


async def test_a_file_changed_while_the_link_was_down_is_sent_whole(tmp_path: Path) -> None:
    async with _big_file_through_proxy(tmp_path) as (p, proxy):
        await _cut_mid_file(p, proxy)
        # same size, new content: the blocks the receiver holds are stale
        (p.src / "big.bin").write_bytes(os.urandom(SIZE))
        proxy.resume()
        await _converge_never_torn(p, "big.bin")
        log = p.receiver.log()
        assert "partial record dropped" in log and "record resumed" not in log
        assert _incoming(p) == []


async def test_receiver_killed_with_a_partial_file_sends_it_whole(tmp_path: Path) -> None:
    async with _big_file_through_proxy(tmp_path) as (p, proxy):
        await _cut_mid_file(p, proxy)
        p.receiver.kill()  # SIGKILL: the partial lived in its memory only
        assert _incoming(p) != []  # the staged part is still on disk...
        p.restart_receiver()
        proxy.resume()
        await _converge_never_torn(p, "big.bin")
        assert _incoming(p) == []  # ...and recovery or the whole resend cleared it
        assert "record resumed" not in p.receiver.log()
