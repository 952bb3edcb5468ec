"""The five benchmarks, each run side by side with rsync where rsync has a counterpart.

Fairness: both tools get the same source data, a destination in the same state, and (when
the page cache can be dropped) a cold cache before every timed run; the tool that goes
first alternates between repetitions. Times are wall clock from process start to done:
rsync's process exit; replicator's first `/status` poll (every 10 ms) that shows it caught
up with the destination file in place. So replicator's times include its start-up.
Every timed result is then checked against the source (untimed); a mismatch is reported,
never silently timed.

Trees of many small files are never deleted between runs, only set aside (renamed into
`trash/`, emptied when the whole run is over): on an ext4 without a journal, creating files
within minutes of deleting thousands costs a scan of the recently freed inodes per new
inode (`recently_deleted`), which made whichever run came after a delete up to ten times
slower, for either tool. A real initial sync writes to a file system that did not just
lose 20,000 files. Big files are deleted at once (a few inodes, and 1 GiB each).
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import datagen
from benchmarks.mirror import (
    MirrorFailed,
    MirrorProcess,
    MirrorUnavailable,
    SplitProcess,
    is_caught_up,
)
from benchmarks.report import MIB, Row, Target, median, percentile
from benchmarks.rsyncd import RsyncDaemon
from benchmarks.util import count_files, drop_caches, file_stamps, files_equal, trees_equal

log = logging.getLogger("bench")

SYNC_TIMEOUT = 300.0
CATCH_UP_POLL = 0.01
LATENCY_FILE_SIZE = 64 * 1024
LATENCY_FILE_POLL = 0.001
LATENCY_STATUS_POLL = 0.002
LATENCY_TIMEOUT = 5.0  # a write not visible/durable by then counts as this long


def _ms(seconds: float | None) -> float:
    return (LATENCY_TIMEOUT if seconds is None else seconds) * 1000


@dataclass
class Settings:
    workdir: Path
    reps: int = 3
    big_size: int = 1024 * MIB
    small_files: int = 20_000
    small_dirs: int = 100
    small_size: int = 4096
    resync_fraction: float = 0.01
    latency_writes: int = 100
    latency_hz: float = 20.0
    drop_caches: bool = True
    seed: int = 42
    rsync_fsync: bool = True   # also time rsync --fsync on the initial syncs
    split: bool = True         # also time agent + receiver as two processes there
    replicator: list[str] | None = None


def size_label(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"


@dataclass
class Bench:
    settings: Settings
    rsyncd: RsyncDaemon
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    replicator_error: str | None = None
    _synced: set[str] = field(default_factory=set)  # "big:rsync", "big:replicator"
    _runs: int = 0
    _set_aside_count: int = 0
    _failed_in: str | None = None  # benchmark in which replicator failed: skip its other runs
    current: str = ""  # the benchmark running

    # --- paths -----------------------------------------------------------------------

    def _dir(self, *parts: str) -> Path:
        return self.settings.workdir.joinpath(*parts)

    @property
    def big_src(self) -> Path:
        return self._dir("src-big", "big.bin")

    # --- helpers ---------------------------------------------------------------------

    def cold(self) -> None:
        if not self.settings.drop_caches:
            return
        t0 = time.perf_counter()
        if not drop_caches():
            self.settings.drop_caches = False
            self.notes.append("could not drop the page cache: runs are warm after the first")
        log.info("page cache dropped seconds=%.1f", time.perf_counter() - t0)

    def rsync(self, src: Path, subpath: str, *, fsync: bool = False) -> tuple[float, int]:
        self.cold()
        r = self.rsyncd.sync(src, subpath, fsync=fsync)
        log.info("rsync done module_path=%s fsync=%s seconds=%.3f wire_bytes=%d",
                 subpath, fsync, r.seconds, r.wire_bytes)
        return r.seconds, r.wire_bytes

    def replicator(self, src: Path, dst: Path, state: Path, dst_ready: Callable[[], bool],
                   *, split: bool = False) -> tuple[float, int | None] | None:
        """Start a mirror (`split`: a receiver and an agent, with `dst` as mirror root),
        time it to caught up, read the wire bytes, stop it. None when replicator cannot
        run (then its columns read n/a)."""
        if self.replicator_error is not None or self._failed_in == self.current:
            return None
        self.cold()
        self._runs += 1
        proc = self._mirror(src, dst, state, f"{self.current}-{self._runs}", split=split)
        try:
            proc.start()
            done = proc.wait_caught_up(SYNC_TIMEOUT, CATCH_UP_POLL, dst_ready)
            seconds = done - proc.started_at
            wire = proc.wire_bytes()
        except (MirrorFailed, TimeoutError) as e:
            self._failed(proc, e)
            return None
        finally:
            proc.stop()
        log.info("replicator done src=%s seconds=%.3f wire_bytes=%s", src.name, seconds, wire)
        return seconds, wire

    def _mirror(self, src: Path, dst: Path, state: Path, name: str, *,
                split: bool = False) -> MirrorProcess:
        logs = self._dir("logs")
        logs.mkdir(exist_ok=True)
        kind = SplitProcess if split else MirrorProcess
        return kind(src, dst, state, logs / f"{'split' if split else 'mirror'}-{name}.log",
                    self.settings.replicator)

    def _failed(self, proc: MirrorProcess, e: Exception) -> None:
        """A mirror that never answered cannot run at all: skip replicator everywhere.
        One that failed along the way: skip the rest of this benchmark only."""
        if isinstance(e, MirrorUnavailable) and not proc.answered:
            self.replicator_error = str(e)
            self.notes.append(f"replicator skipped from here on: {e}")
            log.warning("replicator unavailable reason=%r", str(e))
        else:
            self._failed_in = self.current
            self.notes.append(f"replicator failed in {self.current}, its other runs there "
                              f"skipped: {e} (log {proc.log_path.name})")
            log.warning("replicator failed benchmark=%s reason=%r", self.current, str(e))

    def _check(self, ok: bool, what: str) -> None:
        if not ok:
            self.failures.append(what)
            log.error("verification failed what=%r", what)

    @staticmethod
    def _fresh(*paths: Path) -> None:
        for p in paths:
            shutil.rmtree(p, ignore_errors=True)

    @property
    def trash(self) -> Path:
        return self._dir("trash")

    def _set_aside(self, *paths: Path) -> None:
        """As `_fresh`, for trees of many small files: moved into `trash` instead of deleted
        (see the module's docstring); deleted where they cannot be moved."""
        for p in paths:
            if not p.exists():
                continue
            self.trash.mkdir(exist_ok=True)
            self._set_aside_count += 1
            try:
                p.rename(self.trash / f"{self._set_aside_count}-{p.name}")
            except OSError:
                shutil.rmtree(p, ignore_errors=True)

    def empty_trash(self) -> None:
        """Deletes what `_set_aside` kept; once no run is timed any more."""
        shutil.rmtree(self.trash, ignore_errors=True)

    def _same_file(self, src: Path, dst: Path) -> Callable[[], bool]:
        def ready() -> bool:
            try:
                a, b = src.stat(), dst.stat()
            except OSError:
                return False
            return a.st_size == b.st_size and a.st_mtime_ns == b.st_mtime_ns
        return ready

    def _ordered(self, rep: int, *steps: Callable[[], None]) -> None:
        """Reverse the order of the runs every other repetition, so that no tool always
        gets the warmer (or the busier) machine."""
        for step in (steps if rep % 2 == 0 else reversed(steps)):
            step()

    def _extra_rows(self, main: Row, what: str) -> tuple[Row | None, Row | None]:
        """The rows that put a timed initial sync in context, when asked for: replicator's
        figures against `rsync --fsync` (durable, like for like), and the two-process
        topology's figures against plain rsync. They share the main row's lists."""
        target = main.target
        fsync = Row(f"  {what}: against rsync --fsync (durable, like replicator)", "s",
                    replicator=main.replicator, target=target) \
            if self.settings.rsync_fsync else None
        split = Row(f"  {what}: agent and receiver as two processes", "s",
                    rsync=main.rsync, target=target) if self.settings.split else None
        return fsync, split

    def _split_dirs(self, name: str) -> tuple[Path, Path]:
        """The two-process runs' mirror root and state dir."""
        return self._dir(f"dst-{name}-split"), self._dir(f"state-{name}-split")

    def _context_runs(self, fsync: Row | None, split: Row | None, src: Path, name: str,
                      ready: Callable[[Path], Callable[[], bool]],
                      same: Callable[[Path], bool],
                      clear: Callable[..., None]) -> list[Callable[[], None]]:
        """One repetition's runs for the rows of `_extra_rows`: `rsync --fsync` into the
        module's `name`, and the two-process topology. `ready(tree)` is the cheap check that
        a tree has arrived, `same(tree)` the full comparison with the source, `clear` empties
        a destination (`_fresh` or `_set_aside`)."""
        runs: list[Callable[[], None]] = []
        if fsync is not None:
            def run_rsync_fsync() -> None:
                rs_dst = self.rsyncd.root / name
                clear(rs_dst)
                fsync.rsync.append(self.rsync(src, name, fsync=True)[0])
                self._check(same(rs_dst), f"rsync --fsync {name}")
            runs.append(run_rsync_fsync)
        if split is not None:
            def run_split() -> None:
                root, state = self._split_dirs(name)
                tree = SplitProcess.tree_in(root)
                clear(root, state)
                r = self.replicator(src, root, state, ready(tree), split=True)
                if r is not None:
                    split.replicator.append(r[0])
                    self._check(same(tree), f"replicator agent + receiver {name}")
            runs.append(run_split)
        return runs

    # --- data ------------------------------------------------------------------------

    def prepare_big(self) -> None:
        if self.big_src.exists():
            return
        self.big_src.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        datagen.make_big_file(self.big_src, self.settings.big_size, self.settings.seed)
        log.info("generated big file bytes=%d seconds=%.1f", self.settings.big_size,
                 time.perf_counter() - t0)

    def prepare_small(self) -> Path:
        src = self._dir("src-small")
        if not src.exists():
            s = self.settings
            datagen.make_small_tree(src, s.small_files, s.small_dirs, s.small_size, s.seed)
            log.info("generated small files count=%d dirs=%d", s.small_files, s.small_dirs)
        return src

    # --- 1. initial sync of the big file ---------------------------------------------

    def initial_big(self) -> None:
        self.prepare_big()
        label = size_label(self.settings.big_size)
        t = Row(f"initial sync, {label} file (half random, half text)", "s",
                target=Target("ratio", 1 / 1.5, "<= 0.67 (1.5x faster)"))
        w = Row(f"initial sync, {label} file: bytes on the wire", "MiB")
        src, rs_dst = self.big_src.parent, self.rsyncd.root / "big"
        dst, state = self._dir("dst-big"), self._dir("state-big")
        fsync, split = self._extra_rows(t, label)

        def big_ready(tree: Path) -> Callable[[], bool]:
            return self._same_file(self.big_src, tree / "big.bin")

        def big_same(tree: Path) -> bool:
            return files_equal(self.big_src, tree / "big.bin")

        for rep in range(self.settings.reps):
            def run_rsync() -> None:
                self._fresh(rs_dst)
                seconds, wire = self.rsync(src, "big")
                t.rsync.append(seconds)
                w.rsync.append(wire / MIB)
                self._check(files_equal(self.big_src, rs_dst / "big.bin"), "rsync big file")
                self._synced.add("big:rsync")

            def run_replicator() -> None:
                self._fresh(dst, state)
                self._synced.discard("big:replicator")
                r = self.replicator(src, dst, state, big_ready(dst))
                if r is None:
                    return
                t.replicator.append(r[0])
                if r[1] is not None:
                    w.replicator.append(r[1] / MIB)
                self._check(big_same(dst), "replicator big file")
                self._synced.add("big:replicator")

            self._ordered(rep, run_rsync, run_replicator,
                          *self._context_runs(fsync, split, src, "big", big_ready, big_same,
                                              self._fresh))
        self._fresh(*self._split_dirs("big"))
        self.rows += [t, *filter(None, (fsync, split)), w]

    # --- 2. initial sync of many small files -----------------------------------------

    def initial_small(self) -> None:
        s = self.settings
        src = self.prepare_small()
        t = Row(f"initial sync, {s.small_files} x {size_label(s.small_size)} files "
                f"in {s.small_dirs} dirs", "s",
                target=Target("ratio", 1.0, "<= 1.00 (as fast)"))
        rs_dst, dst, state = self.rsyncd.root / "small", self._dir("dst-small"), \
            self._dir("state-small")

        fsync, split = self._extra_rows(t, f"{s.small_files} files")

        def small_ready(tree: Path) -> Callable[[], bool]:
            return lambda: count_files(tree) >= s.small_files

        def small_same(tree: Path) -> bool:
            return trees_equal(src, tree)

        for rep in range(s.reps):
            def run_rsync() -> None:
                self._set_aside(rs_dst)
                t.rsync.append(self.rsync(src, "small")[0])
                self._check(trees_equal(src, rs_dst), "rsync small files")

            def run_replicator() -> None:
                self._set_aside(dst, state)
                r = self.replicator(src, dst, state, small_ready(dst))
                if r is None:
                    return
                t.replicator.append(r[0])
                self._check(trees_equal(src, dst), "replicator small files")

            self._ordered(rep, run_rsync, run_replicator, *self._context_runs(
                fsync, split, src, "small", small_ready, small_same, self._set_aside))
        self._set_aside(rs_dst, dst, state, *self._split_dirs("small"))
        self.rows += [t, *filter(None, (fsync, split))]

    # --- 3. resync after 1% scattered change ------------------------------------------

    def resync(self) -> None:
        s = self.settings
        self.prepare_big()
        src, rs_dst = self.big_src.parent, self.rsyncd.root / "big"
        dst, state = self._dir("dst-big"), self._dir("state-big")
        same = self._same_file(self.big_src, dst / "big.bin")
        # both destinations must hold the current file first; untimed
        if "big:rsync" not in self._synced:
            self.rsync(src, "big")
            self._synced.add("big:rsync")
        if "big:replicator" not in self._synced:
            self._fresh(dst, state)
            if self.replicator(src, dst, state, same) is not None:
                self._synced.add("big:replicator")

        pct = f"{s.resync_fraction * 100:g}%"
        t = Row(f"resync after {pct} changed in scattered 4 KiB writes", "s",
                target=Target("ratio", 0.5, "<= 0.50"))
        w = Row(f"resync after {pct} changed: bytes on the wire", "MiB")
        touched_row = Row("  touched 64 KiB blocks x 64 KiB (same for both)", "MiB")
        wt = Row("  wire bytes / touched blocks", "x",
                 target=Target("absolute", 1.25, "replicator <= 1.25"))

        for rep in range(s.reps):
            offsets = datagen.scatter_writes(self.big_src, s.resync_fraction,
                                             s.seed + 1000 + rep)
            touched = datagen.touched_blocks(offsets) * datagen.BLOCK_SIZE
            touched_row.replicator.append(touched / MIB)
            touched_row.rsync.append(touched / MIB)
            log.info("modified big file writes=%d touched_bytes=%d", len(offsets), touched)

            def run_rsync(touched: int = touched) -> None:
                seconds, wire = self.rsync(src, "big")
                t.rsync.append(seconds)
                w.rsync.append(wire / MIB)
                wt.rsync.append(wire / touched)
                self._check(files_equal(self.big_src, rs_dst / "big.bin"), "rsync resync")

            def run_replicator(touched: int = touched) -> None:
                if "big:replicator" not in self._synced:
                    return
                r = self.replicator(src, dst, state, same)
                if r is None:
                    self._synced.discard("big:replicator")
                    return
                t.replicator.append(r[0])
                if r[1] is not None:
                    w.replicator.append(r[1] / MIB)
                    wt.replicator.append(r[1] / touched)
                self._check(files_equal(self.big_src, dst / "big.bin"), "replicator resync")

            self._ordered(rep, run_rsync, run_replicator)
        self.rows += [t, w, touched_row, wt]

    # --- 4. latency of single small changes ---------------------------------------------

    def latency(self) -> None:
        s = self.settings
        vis_med = Row("latency write -> visible in mirror, median", "ms",
                      target=Target("absolute", 25, "<= 25 ms"))
        vis_p99 = Row("latency write -> visible in mirror, p99", "ms",
                      target=Target("absolute", 100, "<= 100 ms"))
        dur_med = Row("latency write -> applied_lsn (durable), median", "ms",
                      target=Target("absolute", 25, "<= 25 ms"))
        dur_p99 = Row("latency write -> applied_lsn (durable), p99", "ms",
                      target=Target("absolute", 100, "<= 100 ms"))
        rows = [vis_med, vis_p99, dur_med, dur_p99]
        for rep in range(s.reps):
            if self.replicator_error is not None or self._failed_in == self.current:
                break
            proc = self._mirror(self._dir("src-lat"), self._dir("dst-lat"),
                                self._dir("state-lat"), f"latency{rep}")
            try:
                visible, durable = self._latency_run(rep, proc)
            except (MirrorFailed, TimeoutError) as e:
                self._failed(proc, e)
                break
            vis_med.replicator.append(_ms(median(visible)))
            vis_p99.replicator.append(_ms(percentile(visible, 99)))
            dur_med.replicator.append(_ms(median(durable)))
            dur_p99.replicator.append(_ms(percentile(durable, 99)))
        self.rows += rows

    def _latency_run(self, rep: int, proc: MirrorProcess) -> tuple[list[float], list[float]]:
        s = self.settings
        src, dst, state = proc.src, proc.dst, proc.state_dir
        self._fresh(src, dst, state)
        src.mkdir(parents=True)
        rng = random.Random(s.seed + 2000 + rep)
        hot, mirrored = src / "hot.bin", dst / "hot.bin"
        hot.write_bytes(rng.randbytes(LATENCY_FILE_SIZE))
        visible: list[float] = []
        durable: list[float] = []
        misses = 0
        try:
            proc.start()
            proc.wait_caught_up(SYNC_TIMEOUT, CATCH_UP_POLL, lambda: files_equal(hot, mirrored))
            ds = proc.dataset()
            assert ds is not None
            baseline = int(ds["written_lsn"])
            first_lsn = baseline
            slots = LATENCY_FILE_SIZE // datagen.WRITE_SIZE
            period = 1 / s.latency_hz
            next_at = time.perf_counter()
            for i in range(s.latency_writes):
                time.sleep(max(0.0, next_at - time.perf_counter()))
                next_at = max(next_at + period, time.perf_counter())
                off = (i % slots) * datagen.WRITE_SIZE
                payload = f"write {i:06d} ".encode() + rng.randbytes(datagen.WRITE_SIZE - 13)
                with open(hot, "r+b") as f:
                    f.seek(off)
                    f.write(payload)
                t0 = time.perf_counter()
                vis, dur = self._watch(proc, mirrored, off, payload, baseline + 1, t0)
                misses += vis is None or dur is None
                visible.append(LATENCY_TIMEOUT if vis is None else vis)
                durable.append(LATENCY_TIMEOUT if dur is None else dur)
                baseline = self._settle(proc, baseline + 1)
            per_write = (baseline - first_lsn) / s.latency_writes
        finally:
            proc.stop()
        self._check(files_equal(hot, mirrored), "replicator latency file")
        log.info("latency run rep=%d writes=%d misses=%d records_per_write=%.2f "
                 "visible_p50_ms=%.1f durable_p50_ms=%.1f", rep, s.latency_writes, misses,
                 per_write, _ms(median(visible)), _ms(median(durable)))
        if misses:
            self.notes.append(f"latency rep {rep}: {misses} writes not seen within "
                              f"{LATENCY_TIMEOUT:.0f}s, counted as {LATENCY_TIMEOUT:.0f}s")
        if per_write != 1:
            self.notes.append(f"latency rep {rep}: {per_write:.2f} records per write "
                              "(durable = applied_lsn reached the first of them)")
        return visible, durable

    @staticmethod
    def _watch(proc: MirrorProcess, mirrored: Path, off: int, payload: bytes,
               expected_lsn: int, t0: float) -> tuple[float | None, float | None]:
        """Seconds from t0 until the mirror file shows payload at off (polled every 1 ms)
        and until applied_lsn >= expected_lsn (polled every 2 ms); None on timeout.

        The status is polled from its own thread: an HTTP round trip takes about as long
        as the poll interval, and must not delay the file polls."""
        result: dict[str, float] = {}

        def poll_status() -> None:
            while time.perf_counter() - t0 < LATENCY_TIMEOUT:
                ds = proc.dataset()
                if ds is not None and int(ds.get("applied_lsn") or 0) >= expected_lsn:
                    result["durable"] = time.perf_counter() - t0
                    return
                time.sleep(LATENCY_STATUS_POLL)

        poller = threading.Thread(target=poll_status, daemon=True)
        poller.start()
        vis: float | None = None
        while vis is None and time.perf_counter() - t0 < LATENCY_TIMEOUT:
            try:
                fd = os.open(mirrored, os.O_RDONLY)
                try:
                    seen = os.pread(fd, len(payload), off)
                finally:
                    os.close(fd)
            except OSError:
                seen = b""
            if seen == payload:
                vis = time.perf_counter() - t0
            else:
                time.sleep(LATENCY_FILE_POLL)
        poller.join()
        return vis, result.get("durable")

    @staticmethod
    def _settle(proc: MirrorProcess, at_least: int) -> int:
        """Wait until caught up again; the LSN the next write builds on."""
        end = time.perf_counter() + LATENCY_TIMEOUT
        while time.perf_counter() < end:
            proc.check_alive()
            doc = proc.status()
            if is_caught_up(doc) and doc is not None:
                lsn = int(doc["datasets"][0]["written_lsn"])
                if lsn >= at_least:
                    return lsn
            time.sleep(LATENCY_STATUS_POLL)
        ds = proc.dataset()
        return max(at_least, int(ds["written_lsn"])) if ds else at_least

    # --- 5. a bulk copy into a live tree -----------------------------------------------

    def live_small(self) -> None:
        """The small tree copied with `cp -a` into a source that is already mirrored: the
        time from the copy's start until the copy is safe at the DR site. replicator runs
        throughout and takes the files as they are written; rsync runs once, right after
        the copy, the best a cron job could do. No target: the issue sets none."""
        s = self.settings
        tree = self.prepare_small()
        t = Row(f"bulk copy of {s.small_files} files into a live tree, until mirrored", "s")
        cp_row = Row("  of which the copy itself (cp -a)", "s")
        src, rs_dst = self._dir("src-live"), self.rsyncd.root / "live"
        dst, state = self._dir("dst-live"), self._dir("state-live")

        def fresh_source() -> None:
            self._set_aside(src)
            src.mkdir(parents=True)
            (src / "marker").write_bytes(b"mirrored before the copy\n")

        for rep in range(s.reps):
            def run_rsync() -> None:
                fresh_source()
                self._set_aside(rs_dst)
                self.rsyncd.sync(src, "live")  # the tree before the copy, untimed
                self.cold()
                t0 = time.perf_counter()
                copy = _Copy(tree, src / "tree")
                copy.wait()
                self.rsyncd.sync(src, "live")
                t.rsync.append(time.perf_counter() - t0)
                cp_row.rsync.append(copy.seconds)
                self._check(copy.ok and trees_equal(src, rs_dst), "rsync live copy")

            def run_replicator() -> None:
                fresh_source()
                self._set_aside(dst, state)
                r = self._live_replicator(tree, src, dst, state)
                if r is None:
                    return
                t.replicator.append(r[0])
                cp_row.replicator.append(r[1])
                self._check(trees_equal(src, dst), "replicator live copy")

            self._ordered(rep, run_rsync, run_replicator)
        self._set_aside(src, rs_dst, dst, state)
        self.rows += [t, cp_row]

    def _live_replicator(self, tree: Path, src: Path, dst: Path,
                         state: Path) -> tuple[float, float] | None:
        """A mirror of `src`, caught up; then `tree` copied into it. Returns the seconds from
        the copy's start to caught up with every file's size and mtime in place, and the
        copy's own seconds; None when replicator cannot run."""
        if self.replicator_error is not None or self._failed_in == self.current:
            return None
        self._runs += 1
        proc = self._mirror(src, dst, state, f"{self.current}-{self._runs}")
        copy: _Copy | None = None
        seen_at = 0.0

        def copied() -> bool:
            # only once the status says caught up; the walks are left for last, so that
            # they do not compete with the mirror while the copy runs (a failed copy ends
            # the wait too: it is reported below)
            nonlocal seen_at
            seen_at = time.perf_counter()
            return copy is not None and copy.done and (
                not copy.ok or (count_files(dst) >= count_files(src)
                                and file_stamps(src) == file_stamps(dst)))

        try:
            proc.start()
            proc.wait_caught_up(SYNC_TIMEOUT, CATCH_UP_POLL,
                                self._same_file(src / "marker", dst / "marker"))
            self.cold()
            copy = _Copy(tree, src / "tree")
            proc.wait_caught_up(SYNC_TIMEOUT, CATCH_UP_POLL, copied)
        except (MirrorFailed, TimeoutError) as e:
            self._failed(proc, e)
            return None
        finally:
            proc.stop()
            if copy is not None:
                copy.wait()
        if not copy.ok:
            self._check(False, "cp -a into the live tree")
            return None
        log.info("replicator live copy seconds=%.3f copy_seconds=%.3f",
                 seen_at - copy.started, copy.seconds)
        return seen_at - copy.started, copy.seconds


class _Copy:
    """`cp -a SRC DST` in the background; `ended` is the perf_counter time it exited."""

    def __init__(self, src: Path, dst: Path) -> None:
        self.started = time.perf_counter()
        self.ended: float | None = None
        self._proc = subprocess.Popen(["cp", "-a", "--", str(src), str(dst)])
        self._waiter = threading.Thread(target=self._wait, daemon=True)
        self._waiter.start()

    def _wait(self) -> None:
        self._proc.wait()
        self.ended = time.perf_counter()

    @property
    def done(self) -> bool:
        return self.ended is not None

    @property
    def ok(self) -> bool:
        return self._proc.returncode == 0

    @property
    def seconds(self) -> float:
        assert self.ended is not None
        return self.ended - self.started

    def wait(self) -> None:
        self._waiter.join()


BENCHMARKS: dict[str, Callable[[Bench], None]] = {
    "initial-big": Bench.initial_big,
    "initial-small": Bench.initial_small,
    "resync": Bench.resync,
    "latency": Bench.latency,
    "live-small": Bench.live_small,
}
