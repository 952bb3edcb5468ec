"""The rescan's hand-over from its scanning thread: in order, a chunk ahead, and a prefetch
hook that runs in that thread."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator

from replicator.agent.directory import RESCAN_CHUNK, _chunks_in_thread

ST = os.lstat(".")
TOTAL = 2 * RESCAN_CHUNK + 5


class Source:
    """Entries p0, p1, ...; `reached` is set once entry `mark` has been produced."""

    def __init__(self, total: int = TOTAL, mark: int = RESCAN_CHUNK) -> None:
        self.total, self.mark = total, mark
        self.produced = 0
        self.reached = threading.Event()

    def __iter__(self) -> Iterator[tuple[str, os.stat_result]]:
        for i in range(self.total):
            self.produced = i + 1
            if i == self.mark:
                self.reached.set()
            yield f"p{i}", ST


async def test_every_entry_arrives_in_order_in_chunks() -> None:
    chunks = [c async for c in _chunks_in_thread(iter(Source()))]
    assert [len(c) for c in chunks] == [RESCAN_CHUNK, RESCAN_CHUNK, 5]
    assert [p for c in chunks for p, _ in c] == [f"p{i}" for i in range(TOTAL)]


async def test_the_next_chunk_is_scanned_while_the_caller_holds_this_one() -> None:
    source = Source()
    chunks = _chunks_in_thread(iter(source))
    first = await anext(chunks)
    assert len(first) == RESCAN_CHUNK
    # nothing more is asked for, yet the thread goes on into the next chunk
    assert await asyncio.to_thread(source.reached.wait, 10.0)
    await chunks.aclose()


async def test_ahead_runs_in_the_scanning_thread_before_the_hand_over() -> None:
    seen: list[tuple[int, str]] = []

    def ahead(chunk: list[tuple[str, os.stat_result]]) -> None:
        seen.append((threading.get_ident(), chunk[0][0]))

    async for chunk in _chunks_in_thread(iter(Source()), ahead):
        assert chunk[0][0] in [first for _, first in seen]
    assert [first for _, first in seen] == ["p0", f"p{RESCAN_CHUNK}", f"p{2 * RESCAN_CHUNK}"]
    assert threading.get_ident() not in {tid for tid, _ in seen}


async def test_a_caller_that_stops_early_leaves_one_chunk_scanned_ahead_at_most() -> None:
    source = Source(total=10 * RESCAN_CHUNK)
    handed = [threading.Event(), threading.Event()]  # `ahead` ran on chunk 0, chunk 1

    def ahead(chunk: list[tuple[str, os.stat_result]]) -> None:
        handed[int(chunk[0][0][1:]) // RESCAN_CHUNK].set()

    chunks = _chunks_in_thread(iter(source), ahead)
    await anext(chunks)
    assert await asyncio.to_thread(source.reached.wait, 10.0)  # chunk 1 is under way
    await chunks.aclose()
    assert await asyncio.to_thread(handed[1].wait, 10.0)  # and was finished, unclaimed
    assert source.produced == 2 * RESCAN_CHUNK  # nothing was scanned after it
