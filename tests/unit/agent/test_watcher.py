from __future__ import annotations

import asyncio
import errno
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from replicator.agent import watcher as watcher_mod
from replicator.agent.excludes import Excludes
from replicator.agent.watcher import RESCAN, Batch, Watcher, _InotifyFD

# watchdog adds a watch twice when nested directories appear at once, and says so
pytestmark = pytest.mark.filterwarnings("ignore:Callback with id:RuntimeWarning")

QUEUE_SYSCTL = Path("/proc/sys/fs/inotify/max_queued_events")


class Collector:
    """Consumes a watcher's batches in a task, recording when each arrived."""

    def __init__(self, w: Watcher) -> None:
        self.w = w
        self.batches: list[tuple[float, Batch]] = []
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for batch in self.w.batches():
            self.batches.append((time.monotonic(), batch))

    def paths(self) -> set[str]:
        return {p for _, b in self.batches for p in b}

    def count(self, path: str) -> int:
        return sum(1 for _, b in self.batches if path in b)

    async def wait_for(self, cond: Callable[[], bool], timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if self.task.done():
                self.task.result()
                raise AssertionError("batches() ended")
            if time.monotonic() > deadline:
                tail = [sorted(b)[:8] for _, b in self.batches[-5:]]
                raise AssertionError(f"timed out; {len(self.batches)} batches, last: {tail}")
            await asyncio.sleep(0.002)

    async def wait_paths(self, *paths: str, timeout: float = 5.0) -> None:
        await self.wait_for(lambda: set(paths) <= self.paths(), timeout)


@asynccontextmanager
async def watching(root: Path, patterns: list[str] | None = None,
                   **kw: Any) -> AsyncIterator[tuple[Watcher, Collector]]:
    async with Watcher(root, Excludes(patterns or []), **kw) as w:
        c = Collector(w)
        try:
            yield w, c
        finally:
            c.task.cancel()


async def test_burst_of_writes_to_one_file_is_one_entry(tmp_path: Path) -> None:
    async with watching(tmp_path, settle=0.05) as (w, c):
        t0 = time.time()
        with open(tmp_path / "f", "wb") as fh:
            for _ in range(200):
                fh.write(b"x" * 100)
                fh.flush()
        await c.wait_paths("f")
        batch = next(b for _, b in c.batches if "f" in b)
        assert t0 <= batch["f"] <= time.time()
        # and nothing more comes for it: no event since
        sentinel = tmp_path / "sentinel"
        sentinel.write_bytes(b"s")
        await c.wait_paths("sentinel")
        assert c.count("f") == 1
        assert w.healthy


async def test_file_written_continuously_ships_at_least_every_max_delay(tmp_path: Path) -> None:
    async with watching(tmp_path, settle=0.02, max_delay=1.0) as (_, c):
        start = time.monotonic()
        with open(tmp_path / "busy", "wb") as fh:
            while time.monotonic() - start < 2.5:
                fh.write(b"x")
                fh.flush()
                await asyncio.sleep(0.01)
        end = time.monotonic()
        during = [ts for ts, b in c.batches if "busy" in b and ts < end]
        assert len(during) >= 2, c.batches
        # never more than max_delay (plus scheduling slack) without it shipping
        assert during[0] - start < 1.25
        assert all(b - a < 1.25 for a, b in zip(during, during[1:], strict=False))
        await c.wait_for(lambda: c.count("busy") == len(during) + 1)  # the final settle


async def test_a_burst_of_events_wakes_the_loop_a_few_times_not_once_each(
    tmp_path: Path
) -> None:
    class Counting(Watcher):
        drains = 0

        def _drain(self) -> None:
            self.drains += 1
            super()._drain()

    names = [f"f{i}" for i in range(100)]
    async with Counting(tmp_path, Excludes([]), settle=0.05) as w:
        c = Collector(w)
        try:
            for name in names:  # three events each: created, modified, closed
                (tmp_path / name).write_bytes(b"x")
            # the loop stays blocked until watchdog's thread has put every file in the inbox
            deadline = time.monotonic() + 5
            while True:
                with w._inbox_lock:
                    held = {rel for rels, _, _ in w._inbox for rel in rels}
                if set(names) <= held:
                    break
                assert time.monotonic() < deadline, f"{len(held)} of 100 in the inbox"
                time.sleep(0.005)
            await c.wait_paths(*names)
            # one wake-up took the burst; events still arriving after it add a few more
            assert w.drains <= 5
        finally:
            c.task.cancel()


async def test_moved_file_dirties_both_paths(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "old").write_bytes(b"x")
    async with watching(tmp_path) as (_, c):
        os.rename(tmp_path / "old", tmp_path / "d" / "new")
        await c.wait_paths("old", "d/new", "d")


async def test_moved_directory_dirties_everything_in_it(tmp_path: Path) -> None:
    (tmp_path / "a" / "sub").mkdir(parents=True)
    (tmp_path / "a" / "sub" / "f").write_bytes(b"x")
    async with watching(tmp_path) as (_, c):
        os.rename(tmp_path / "a", tmp_path / "b")
        await c.wait_paths("a", "b", "a/sub", "b/sub", "a/sub/f", "b/sub/f")
        # the moved tree is still watched under its new name
        (tmp_path / "b" / "sub" / "g").write_bytes(b"y")
        await c.wait_paths("b/sub/g")


async def test_excluded_paths_never_appear(tmp_path: Path) -> None:
    patterns = ["*.swp", "tmp/**", "cache"]
    (tmp_path / "tmp").mkdir()
    async with watching(tmp_path, patterns) as (_, c):
        (tmp_path / "a.swp").write_bytes(b"x")
        (tmp_path / "tmp" / "t").write_bytes(b"x")
        (tmp_path / "cache" / "deep").mkdir(parents=True)
        (tmp_path / "cache" / "deep" / "c").write_bytes(b"x")
        (tmp_path / "src").mkdir()
        (tmp_path / "src" / ".x.swp").write_bytes(b"x")
        os.rename(tmp_path / "a.swp", tmp_path / "tmp" / "moved")
        (tmp_path / "sentinel").write_bytes(b"x")
        await c.wait_paths("sentinel", "src")
        seen = c.paths()
        for p in ["a.swp", "tmp/t", "cache", "cache/deep", "cache/deep/c", "src/.x.swp",
                  "tmp/moved"]:
            assert p not in seen
        # tmp/** keeps tmp itself
        assert "tmp" in seen


def _watch_count(w: Watcher) -> int:
    obs = w._observer
    assert obs is not None
    fd = obs.inotify._inotify_fd
    with open(f"/proc/self/fdinfo/{fd}") as fh:
        return sum(1 for line in fh if line.startswith("inotify wd:"))


async def test_excluded_directories_are_not_watched(tmp_path: Path) -> None:
    for d in ["keep/a", "node_modules/x/y/z", "src/node_modules/q"]:
        (tmp_path / d).mkdir(parents=True)
    async with watching(tmp_path, ["node_modules"]) as (w, c):
        # root, keep, keep/a, src
        assert _watch_count(w) == 4
        (tmp_path / "node_modules" / "new").mkdir()
        (tmp_path / "keep" / "b").mkdir()
        await c.wait_paths("keep/b")
        assert _watch_count(w) == 5
        assert not any("node_modules" in p for p in c.paths())


async def test_new_subdirectory_with_files_inside_right_away(tmp_path: Path) -> None:
    async with watching(tmp_path) as (_, c):
        (tmp_path / "new" / "deep").mkdir(parents=True)
        (tmp_path / "new" / "f1").write_bytes(b"1")
        (tmp_path / "new" / "deep" / "f2").write_bytes(b"2")
        await c.wait_paths("new", "new/deep", "new/f1", "new/deep/f2")
        # and it is watched from now on
        (tmp_path / "new" / "deep" / "f3").write_bytes(b"3")
        await c.wait_paths("new/deep/f3")


async def test_events_on_the_root_itself_are_ignored(tmp_path: Path) -> None:
    async with watching(tmp_path) as (_, c):
        os.chmod(tmp_path, 0o751)
        os.utime(tmp_path)
        (tmp_path / "sentinel").write_bytes(b"x")
        await c.wait_paths("sentinel")
        assert "" not in c.paths()
        assert RESCAN not in c.paths()


async def test_deletes_and_attribute_changes_are_dirty(tmp_path: Path) -> None:
    (tmp_path / "gone").write_bytes(b"x")
    (tmp_path / "mode").write_bytes(b"x")
    async with watching(tmp_path) as (_, c):
        os.unlink(tmp_path / "gone")
        os.chmod(tmp_path / "mode", 0o600)
        await c.wait_paths("gone", "mode")


async def test_reads_are_not_changes(tmp_path: Path) -> None:
    (tmp_path / "r").write_bytes(b"x")
    async with watching(tmp_path) as (_, c):
        for _ in range(5):
            (tmp_path / "r").read_bytes()
        (tmp_path / "sentinel").write_bytes(b"x")
        await c.wait_paths("sentinel")
        assert "r" not in c.paths()


async def test_non_utf8_names_use_surrogateescape(tmp_path: Path) -> None:
    async with watching(tmp_path) as (_, c):
        with open(os.path.join(os.fsencode(tmp_path), b"caf\xe9"), "wb"):
            pass
        await c.wait_paths("caf\udce9")


async def test_stop_ends_batches(tmp_path: Path) -> None:
    w = Watcher(tmp_path, Excludes([]))
    await w.start()
    assert w.healthy
    c = Collector(w)
    await w.stop()
    await asyncio.wait_for(c.task, 2.0)
    assert not w.healthy
    await w.stop()  # twice is fine


@pytest.mark.parametrize(("settle", "max_delay"), [(-0.1, 1.0), (0.5, 0.1)])
def test_bad_timings_are_refused(tmp_path: Path, settle: float, max_delay: float) -> None:
    with pytest.raises(ValueError):
        Watcher(tmp_path, Excludes([]), settle=settle, max_delay=max_delay)


async def test_root_must_be_a_directory(tmp_path: Path) -> None:
    with pytest.raises(NotADirectoryError):
        await Watcher(tmp_path / "missing", Excludes([])).start()


async def test_too_many_pending_paths_collapse_into_one_rescan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(watcher_mod, "MAX_PENDING_PATHS", 10)
    async with watching(tmp_path, settle=0.3, max_delay=1.0) as (_, c):
        t0 = time.time()
        for i in range(30):
            (tmp_path / f"f{i}").write_bytes(b"x")
        await c.wait_paths(RESCAN)
        rescan_batch = next(b for _, b in c.batches if RESCAN in b)
        # the rescan carries the first-seen time of the oldest dropped change
        assert t0 <= rescan_batch[RESCAN] <= time.time()
        assert len(c.paths()) < 30


@pytest.fixture
def small_inotify_queue() -> Iterator[Callable[[], None]]:
    """Lowers max_queued_events; the returned function restores it. The limit is taken
    when an inotify instance is created, so it is restored right after the watcher starts
    and other processes are affected for milliseconds only."""
    try:
        saved = QUEUE_SYSCTL.read_text()
        QUEUE_SYSCTL.write_text("4\n")
    except OSError as exc:
        pytest.skip(f"cannot lower {QUEUE_SYSCTL}: {exc}")

    def restore() -> None:
        QUEUE_SYSCTL.write_text(saved)

    try:
        yield restore
    finally:
        restore()


async def test_queue_overflow_yields_rescan_and_watching_goes_on(
    tmp_path: Path, small_inotify_queue: Callable[[], None]
) -> None:
    async with watching(tmp_path) as (w, c):
        small_inotify_queue()
        assert w.overflows == 0
        # far more events than a 4-event queue holds, from another process (as real
        # bursts come) so that the writer does not share our GIL with the reader thread
        burst = ("import os, sys\n"
                 "for i in range(2000):\n"
                 "    os.close(os.open(f'{sys.argv[1]}/burst{i}', os.O_CREAT | os.O_WRONLY))\n")
        await asyncio.to_thread(subprocess.run, [sys.executable, "-c", burst, str(tmp_path)],
                                check=True, timeout=60)
        await c.wait_paths(RESCAN)
        assert w.overflows >= 1
        assert w.healthy  # watchdog rebuilt the watches; nothing more is wrong
        (tmp_path / "sub").mkdir()
        (tmp_path / "sub" / "after").write_bytes(b"x")
        await c.wait_paths("sub/after")


async def test_watch_that_cannot_be_added_makes_it_unhealthy_until_recovered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Running out of inotify watches for real would break every other process of this
    # user on the machine, so ENOSPC is injected where watchdog calls inotify_add_watch.
    out_of_watches = True
    real = _InotifyFD._get_or_create_watch

    def fake(self: _InotifyFD, path: bytes, mask: Any) -> Any:
        if out_of_watches and path.endswith(b"/full"):
            raise OSError(errno.ENOSPC, "inotify watch limit reached")
        return real(self, path, mask)

    monkeypatch.setattr(_InotifyFD, "_get_or_create_watch", fake)
    caplog.set_level(logging.WARNING, logger="replicator.agent.watcher")
    async with watching(tmp_path, check_interval=0.05, retry_interval=0.3) as (w, c):
        assert w.healthy
        (tmp_path / "full").mkdir()
        await c.wait_paths(RESCAN)
        assert not w.healthy
        assert "full" in (w.fault or "")
        # RESCAN keeps coming while unhealthy
        await c.wait_for(lambda: c.count(RESCAN) >= 3, timeout=5.0)
        warnings = [r for r in caplog.records if "unhealthy" in r.getMessage()]
        assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
        out_of_watches = False
        await c.wait_for(lambda: w.healthy, timeout=5.0)
        (tmp_path / "full" / "f").write_bytes(b"x")
        await c.wait_paths("full/f")


async def test_dead_observer_is_detected_and_restarted(tmp_path: Path) -> None:
    async with watching(tmp_path, check_interval=0.05, retry_interval=0.2) as (w, c):
        obs = w._observer
        assert obs is not None

        def kill() -> None:  # behind the watcher's back, as if its threads had crashed
            obs.stop()
            obs.join()

        await asyncio.to_thread(kill)
        await c.wait_paths(RESCAN)
        await c.wait_for(lambda: w.healthy and w._observer is not obs, timeout=5.0)
        (tmp_path / "after").write_bytes(b"x")
        await c.wait_paths("after")


async def test_deleted_root_yields_rescan_and_recovers_when_it_is_back(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    async with watching(root, check_interval=0.05, retry_interval=0.2) as (w, c):
        shutil.rmtree(root)
        await c.wait_paths(RESCAN)
        assert not w.healthy
        root.mkdir()
        await c.wait_for(lambda: w.healthy, timeout=5.0)
        (root / "back").write_bytes(b"x")
        await c.wait_paths("back")


async def test_moved_root_is_noticed(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    async with watching(root, check_interval=0.05, retry_interval=10.0) as (w, c):
        os.rename(root, tmp_path / "elsewhere")
        await c.wait_paths(RESCAN)
        assert not w.healthy
        assert "root" in (w.fault or "")


async def test_latency_from_write_to_batch(tmp_path: Path) -> None:
    settle = 0.02
    async with watching(tmp_path, settle=settle) as (_, c):
        lat = []
        for i in range(50):
            name = f"l{i}"
            t0 = time.monotonic()
            (tmp_path / name).write_bytes(b"z")
            await c.wait_paths(name)
            lat.append(next(ts for ts, b in c.batches if name in b) - t0)
    med = statistics.median(lat)
    print(f"\nwrite -> batch latency, settle={settle * 1000:.0f} ms: median "
          f"{med * 1000:.1f} ms, max {max(lat) * 1000:.1f} ms (n=50)")
    assert settle <= med < settle + 0.015
