"""Session parts that need no stream: flow-control byte counts, waiting for a batch."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

import pytest

from replicator.receiver.session import Session
from replicator.wire import pb
from replicator.wire.convert import batch_message_size


def _batch(sizes: list[int]) -> pb.AgentMessage:
    m = pb.AgentMessage()
    m.batch.SetInParent()
    for i, n in enumerate(sizes):
        f = m.batch.frames.add()
        f.dataset = i % 3
        f.lsn = 1 + i * 1000
        if n < 0:
            f.header.path = b"d/" + b"x" * -n
            f.header.size = 1 << 40
        else:
            f.block.index = i
            f.block.raw_len = n
            f.block.data = bytes(n)
    return m


@pytest.mark.parametrize("sizes", [
    [],
    [0],
    [-5, 100, 0],
    [110, 111, 112, 113, 120, 127, 128, 129],           # frames around a varint step
    [16370, 16371, 16372, 16380, 16383, 16384, 16385],
    [65536] * 16,                                        # a 1 MiB batch
    [-300, (1 << 21) - 20, 3],                          # batch length past 2**21
])
def test_batch_message_size_is_what_the_agent_counts(sizes: list[int]) -> None:
    m = _batch(sizes)
    assert batch_message_size(m.batch) == m.ByteSize()


async def test_quiesce_waits_for_the_batch_in_the_worker_thread() -> None:
    s = Session(object(), "test")  # type: ignore[arg-type]
    busy: concurrent.futures.Future[tuple[set[int], Exception | None]] = \
        concurrent.futures.Future()
    busy.set_running_or_notify_cancel()
    s._busy = busy
    finished = threading.Event()

    def finish() -> None:
        finished.wait(5)
        busy.set_result((set(), None))

    threading.Thread(target=finish).start()
    task = asyncio.ensure_future(s.quiesce())
    await asyncio.sleep(0.05)
    assert not task.done()          # still waiting for the worker thread
    assert s._closing               # and the worker stops taking frames
    finished.set()
    await asyncio.wait_for(task, 5)
    assert busy.done()
