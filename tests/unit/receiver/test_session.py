"""Session parts that need no stream: waiting for the batch in the worker thread."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

from replicator.receiver.session import Session


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
