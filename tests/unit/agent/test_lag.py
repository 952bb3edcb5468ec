"""What the agent reports of a directory dataset's lag, with a real watcher and index."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from replicator.agent.directory import DirectorySource
from replicator.agent.excludes import Excludes
from replicator.agent.link import Link
from replicator.agent.watcher import Watcher
from replicator.config import DatasetConfig


async def test_a_change_settling_in_the_watcher_is_pending_and_lags(tmp_path: Path) -> None:
    root, state = tmp_path / "src", tmp_path / "state"
    root.mkdir()
    state.mkdir()
    source = DirectorySource(DatasetConfig("docs", "directory", root), state,
                             Link("127.0.0.1:9", "app1"), block_size=65536)
    source.full_rescan = False  # as after the initial scan: nothing else is pending
    try:
        assert source.lag().pending_changes == 0
        assert source.lag().oldest_unapplied_at == 0.0
        # a long settle: the change waits in the watcher, not yet handed to the source
        async with Watcher(root, Excludes([]), settle=30.0, max_delay=60.0) as watcher:
            source.watcher = watcher
            before = time.time()
            (root / "f").write_bytes(b"x")
            deadline = time.monotonic() + 5
            while watcher.pending == 0:
                assert time.monotonic() < deadline, "the watcher never saw the write"
                await asyncio.sleep(0.005)
            lag = source.lag()
            assert lag.pending_changes == 1
            # the change counts from its first event, so replay lag grows while it settles
            assert before <= lag.oldest_unapplied_at <= time.time()
            assert lag.oldest_unwritten_at == lag.oldest_unapplied_at
    finally:
        source.index.close()
