"""Convergence under a random workload, through crashes and broken links."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from tests.integration.conftest import Pair, make_pair
from tests.integration.harness import get_json, snapshot, wait_converged, wait_for
from tests.integration.tcpproxy import TcpProxy
from tests.integration.workload import Workload


def run_steps(w: Workload, n: int, pause: float = 0.002) -> None:
    for _ in range(n):
        w.step()
        time.sleep(pause)


# WORKLOAD_SEEDS=3,4,5,... runs more seeds (a soak); the suite runs two
SEEDS = [int(s) for s in os.environ.get("WORKLOAD_SEEDS", "1,2").split(",")]


@pytest.mark.parametrize("seed", SEEDS)
def test_random_workload_converges(pair: Pair, seed: int) -> None:
    pair.receiver.start()
    pair.agent.start()
    w = Workload(pair.src, seed)
    run_steps(w, 150)
    wait_converged(pair.src, pair.dst)
    run_steps(w, 150)
    wait_converged(pair.src, pair.dst)
    assert pair.agent.stop() == 0
    assert pair.receiver.stop() == 0


@pytest.mark.parametrize("victim", ["receiver", "agent"])
def test_kill9_mid_workload_then_converge(pair: Pair, victim: str) -> None:
    pair.receiver.start()
    pair.agent.start()
    w = Workload(pair.src, 7)
    run_steps(w, 100)
    daemon = pair.receiver if victim == "receiver" else pair.agent
    daemon.kill()  # SIGKILL, mid-stream
    run_steps(w, 100)
    if victim == "receiver":
        pair.restart_receiver()
    else:
        pair.restart_agent()
    run_steps(w, 50)
    wait_converged(pair.src, pair.dst, timeout=90)
    assert pair.agent.stop() == 0
    assert pair.receiver.stop() == 0


async def pair_through_proxy(tmp_path: Path) -> tuple[Pair, TcpProxy]:
    """A receiver and an agent whose link runs through a TcpProxy."""
    proxy = TcpProxy("127.0.0.1", 0)  # aimed at the receiver once its port is known
    port = await proxy.start()
    p = make_pair(tmp_path, agent_target_port=port)
    proxy.target_port = p.receiver_port
    return p, proxy


async def test_link_cut_resumes_without_resending(tmp_path: Path) -> None:
    p, proxy = await pair_through_proxy(tmp_path)
    files = 60
    for i in range(files):
        (p.src / f"f{i:03d}").write_bytes(os.urandom(512 * 1024))
    try:
        p.receiver.start()
        p.agent.start()
        await asyncio.to_thread(wait_for, lambda: proxy.bytes_up > 8 << 20, 60, 0.01,
                                "8 MiB through the proxy")
        await proxy.cut()
        await asyncio.sleep(0.5)
        proxy.resume()
        await asyncio.to_thread(wait_converged, p.src, p.dst, 90)
        row = await asyncio.to_thread(
            wait_for, lambda: (r := get_json(p.receiver_status)["datasets"][0])
            and r["applied_lsn"] == r["written_lsn"] and r, 30)
        # one record per file: nothing the receiver acknowledged was sent again
        assert row["applied_lsn"] == files, row
        assert proxy.bytes_up < files * 512 * 1024 + (34 << 20)
    finally:
        p.agent.kill()
        p.receiver.kill()
        await proxy.stop()


async def test_rename_of_a_big_file_sends_almost_nothing(tmp_path: Path) -> None:
    p, proxy = await pair_through_proxy(tmp_path)
    (p.src / "dir").mkdir()
    (p.src / "dir" / "big.bin").write_bytes(os.urandom(50 << 20))
    try:
        p.receiver.start()
        p.agent.start()
        await asyncio.to_thread(wait_converged, p.src, p.dst, 120)
        before = proxy.bytes_up
        assert before > 50 << 20
        (p.src / "dir" / "big.bin").rename(p.src / "dir" / "renamed.bin")
        (p.src / "dir").rename(p.src / "dir2")
        await asyncio.to_thread(wait_converged, p.src, p.dst, 60)
        sent = proxy.bytes_up - before
        assert sent < 64 * 1024, f"a rename sent {sent} bytes"
    finally:
        p.agent.kill()
        p.receiver.kill()
        await proxy.stop()


def test_safety_guard_never_wipes_the_mirror(pair: Pair) -> None:
    for i in range(20):
        (pair.src / f"f{i}").write_text(str(i))
    pair.receiver.start()
    pair.agent.start()
    wait_converged(pair.src, pair.dst)
    before = snapshot(pair.dst)
    # the whole tree vanishes in one go (as when a disk is unmounted)
    moved = pair.tmp / "elsewhere"
    pair.src.rename(moved)
    pair.src.mkdir()
    wait_for(lambda: get_json(pair.agent_status)["datasets"][0]["state"] == "error", 30,
             message="the agent to report an error")
    row = get_json(pair.agent_status)["datasets"][0]
    assert "empty" in row.get("error", "") or "file system" in row.get("error", "")
    time.sleep(1.0)  # a wrongly shipped wipe would have had time to land
    assert snapshot(pair.dst) == before
    # the disk comes back: shipping resumes
    pair.src.rmdir()
    moved.rename(pair.src)
    (pair.src / "after").write_text("back")
    wait_converged(pair.src, pair.dst)
