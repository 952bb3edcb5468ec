"""File system events of a directory dataset -> coalesced batches of dirty paths, in asyncio.

watchdog's inotify observer runs in its own threads (one reading the inotify fd, one per
watch turning raw events into watchdog events, one dispatching them, idle here: the
emitter hands each event on itself). `_deliver` turns each event into relative paths and
appends them to an inbox; only the event that finds the inbox empty wakes the event loop
(`call_soon_threadsafe`), which then takes everything the inbox holds. So a burst (an
untar, a copy: several events per file) costs one wake-up per burst, not a write to the
loop's self-pipe and a loop iteration per event. From the inbox on everything runs on the
loop.

Coalescing. A path is pending from its first event until it is handed on. It is due
`settle` seconds after its latest event, or `max_delay` after its first, whichever comes
first: a burst of writes ships once, and a file written without pause still ships at
least every `max_delay`. Because `settle` and `max_delay` are the same for every path,
pending paths ordered by latest event are also ordered by settle-due time, and ordered by
first event also by max-delay-due time: two OrderedDicts give the due paths and the next
wake-up in O(1) per event, with no timer per path.

Lost events. The reconciler downstream treats `RESCAN` as "compare the whole tree". It is
put in a batch when:
- the kernel's inotify queue overflowed (IN_Q_OVERFLOW). watchdog 7 rebuilds its
  recursive watches but tells no handler, so our InotifyFD subclass reports it after
  watchdog's own handling, i.e. once the watches are back and a rescan sees everything
  that it could have missed;
- a watch could not be added (ENOSPC: out of inotify watches; watchdog swallows this for
  subdirectories), a watchdog thread died, or the root was deleted, moved or replaced.
  The watcher is then not `healthy`: it logs a warning once, and every `retry_interval`
  restarts the observer (which re-adds every watch) and puts RESCAN in a batch, until a
  restart succeeds and it logs that it recovered;
- more than MAX_PENDING_PATHS paths are pending (a consumer that does not keep up): they
  are dropped for one RESCAN, which keeps memory bounded.

Excluded directories are not watched at all (an excluded build or cache tree would
otherwise use watches and fill the event queue); events for excluded paths are dropped.
Opens and reads are not subscribed to.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from watchdog.events import (
    DirAttribEvent,
    DirCreatedEvent,
    DirDeletedEvent,
    DirModifiedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver
from watchdog.observers.inotify import InotifyEmitter, InotifyWatchGroup
from watchdog.observers.inotify_c import InotifyEvent, InotifyFD, Mask, WatchDescriptor

from replicator.agent.excludes import Excludes

log = logging.getLogger(__name__)

RESCAN = "<rescan>"
"""Key put in a batch when events may have been lost: compare the whole tree."""

Batch = dict[str, float]
"""Dirty relative path ('/'-separated, surrogateescape) -> time.time() of the first event of
the pending change. May hold RESCAN."""

DEFAULT_SETTLE = 0.01  # seconds without events before a path is handed on
DEFAULT_MAX_DELAY = 1.0
DEFAULT_CHECK_INTERVAL = 1.0
"""How often the supervisor checks watchdog's threads and the root's identity."""
DEFAULT_RETRY_INTERVAL = 10.0
"""While unhealthy: how often to restart the observer and ask for a rescan."""
MAX_PENDING_PATHS = 200_000
OVERFLOW_LOG_INTERVAL = 60.0
"""Overflows come in bursts: one warning per this many seconds, with the count."""

# Read and open events change nothing; not subscribing keeps them out of the kernel queue.
_EVENT_FILTER: list[type[FileSystemEvent]] = [
    FileCreatedEvent, DirCreatedEvent, FileModifiedEvent, DirModifiedEvent,
    FileAttribEvent, DirAttribEvent, FileMovedEvent, DirMovedEvent,
    FileDeletedEvent, DirDeletedEvent, FileClosedEvent,
]
# Failing to watch something that just vanished is not a fault.
_VANISHED = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ESTALE})
# asyncio timers may fire a little early; a path due within this is treated as due.
_DUE_SLACK = 0.0005


class _Hooks(Protocol):
    """What watchdog's threads report to the Watcher. Called from those threads."""

    def overflowed(self) -> None: ...
    def watch_failed(self, path: bytes, exc: OSError) -> None: ...
    def thread_died(self, name: str, exc: BaseException) -> None: ...


class _InotifyFD(InotifyFD):
    """watchdog's inotify reader, reporting what watchdog handles silently."""

    def __init__(self, hooks: _Hooks) -> None:
        super().__init__()
        self._hooks = hooks

    def add_callback(self, path: bytes, mask: Mask, callback: Any, id_: Any) -> WatchDescriptor:
        try:
            return super().add_callback(path, mask, callback, id_)
        except OSError as exc:
            if exc.errno not in _VANISHED:
                self._hooks.watch_failed(path, exc)
            raise

    def handle_event(self, event: InotifyEvent) -> None:
        super().handle_event(event)
        if event.is_queue_overflow:
            # after watchdog has rebuilt the watches: a rescan from now on misses nothing
            self._hooks.overflowed()

    def run(self) -> None:
        try:
            super().run()
        except BaseException as exc:
            self._hooks.thread_died("inotify", exc)
            raise


@dataclass
class _WatchGroup(InotifyWatchGroup):
    """watchdog's recursive watch set, leaving excluded directories unwatched."""

    skip_dir: Callable[[bytes], bool] | None = field(default=None)

    def _add_callback(self, path: bytes) -> None:
        if path != self.path and self.skip_dir is not None and self.skip_dir(path):
            return
        super()._add_callback(path)


class _Emitter(InotifyEmitter):
    """watchdog's inotify emitter, handing each event to `deliver` in its own thread.

    watchdog puts events in a queue for its dispatch thread, which calls the handlers: one
    hand-over between threads per event, a lock and a wake-up each time, and about five
    events per file copied into the tree. `deliver` only appends to the Watcher's inbox,
    so it runs here instead, and the dispatch thread idles."""

    def __init__(self, *args: Any, deliver: Callable[[FileSystemEvent], None],
                 skip_dir: Callable[[bytes], bool] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._skip_dir = skip_dir
        self._deliver = deliver
        # the event types to hand on, as watchdog's queue_event filters them (isinstance)
        self._accept: tuple[type[FileSystemEvent], ...] | None = (
            None if self._event_filter is None else tuple(self._event_filter))

    def queue_event(self, event: FileSystemEvent) -> None:
        if self._accept is None or isinstance(event, self._accept):
            self._deliver(event)

    def on_thread_start(self) -> None:
        # as InotifyEmitter.on_thread_start, with our watch group
        self._inotify = _WatchGroup(
            self._inotify_fd,
            os.fsencode(self.watch.path),
            is_recursive=self.watch.is_recursive,
            event_mask=self.get_event_mask_from_filter(),
            follow_symlink=self.watch.follow_symlink,
            skip_dir=self._skip_dir,
        )


class _Observer(BaseObserver):
    """An inotify observer with its own _InotifyFD (as watchdog's InotifyObserver)."""

    def __init__(self, hooks: _Hooks, skip_dir: Callable[[bytes], bool],
                 deliver: Callable[[FileSystemEvent], None]) -> None:
        self._hooks = hooks
        self.inotify = _InotifyFD(hooks)
        self.inotify.start()
        super().__init__(_Emitter, inotify_fd=self.inotify, skip_dir=skip_dir,
                         deliver=deliver)

    def run(self) -> None:
        try:
            super().run()
        except BaseException as exc:
            self._hooks.thread_died("dispatch", exc)
            raise

    def on_thread_stop(self) -> None:
        super().on_thread_stop()
        self.inotify.stop()
        self.inotify.join()

    def dead_thread(self) -> str | None:
        """The name of a thread that should run and does not, if any."""
        if not self.is_alive():
            return "dispatch"
        if not self.inotify.is_alive():
            return "inotify"
        if not self.emitters or not all(e.is_alive() for e in self.emitters):
            return "emitter"
        return None


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


class Watcher:
    """watchdog events -> coalesced batches of dirty relative paths, in asyncio.

    Start it before the initial scan, so that nothing changed during the scan is missed.
    `batches()` has one consumer at a time.
    """

    def __init__(
        self,
        root: Path,
        excludes: Excludes,
        *,
        settle: float = DEFAULT_SETTLE,
        max_delay: float = DEFAULT_MAX_DELAY,
        check_interval: float = DEFAULT_CHECK_INTERVAL,
        retry_interval: float = DEFAULT_RETRY_INTERVAL,
    ) -> None:
        if settle < 0 or max_delay < settle:
            raise ValueError(f"need 0 <= settle <= max_delay, got {settle=} {max_delay=}")
        self.root = Path(os.path.abspath(root))
        self._root_s = str(self.root)
        self._prefix = self._root_s.rstrip("/") + "/"
        self._excludes = excludes
        self._settle = settle
        self._max_delay = max_delay
        self._check_interval = check_interval
        self._retry_interval = retry_interval

        self.overflows = 0
        """Number of inotify queue overflows seen."""

        # pending paths: by latest event (settle order) and by first event (max_delay order)
        self._by_last: OrderedDict[str, float] = OrderedDict()
        self._by_first: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._wakeup = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._observer: _Observer | None = None
        self._root_id: tuple[int, int] | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._fault: str | None = "not started"
        self._next_retry = 0.0
        self._last_overflow_log = float("-inf")
        self._overflows_logged = 0
        self._warned_unhealthy = False
        self._restarting = False
        self._restart_problem: str | None = None
        self._running = False
        self._lock = asyncio.Lock()  # start/stop/restart of the observer
        # (relative paths, wall, monotonic) from watchdog's emitter thread, for `_drain`
        self._inbox: list[tuple[list[str], float, float]] = []
        self._inbox_lock = threading.Lock()

    # ---- status

    @property
    def healthy(self) -> bool:
        """Whether every change is being reported. When not, RESCAN comes periodically."""
        return self._fault is None

    @property
    def fault(self) -> str | None:
        """Why the watcher is not healthy, for status."""
        return self._fault

    @property
    def pending(self) -> int:
        """Number of dirty paths waiting to settle."""
        return len(self._by_first)

    @property
    def oldest_pending(self) -> float:
        """time.time() of the first event of the oldest path waiting to settle; 0.0 if none."""
        return next(iter(self._by_first.values()))[0] if self._by_first else 0.0

    # ---- lifecycle

    async def start(self) -> None:
        """Watch root recursively. Raises OSError if root is not a directory; any other
        failure to watch leaves the watcher running unhealthy (RESCAN periodically)."""
        if self._running:
            return
        if not os.path.isdir(self._root_s):
            raise NotADirectoryError(errno.ENOTDIR, "dataset root is not a directory",
                                     self._root_s)
        self._loop = asyncio.get_running_loop()
        self._running = True
        self._fault = None
        async with self._lock:
            await self._start_observer()
        self._supervisor = asyncio.create_task(self._supervise(), name=f"watcher {self.root}")
        log.debug("watcher started root=%s settle=%s max_delay=%s",
                  self._root_s, self._settle, self._max_delay)

    async def stop(self) -> None:
        """Stop watching; a running `batches()` ends. Pending paths are dropped: the next
        start's scan finds them again. Safe to call twice."""
        if not self._running:
            return
        self._running = False
        self._wakeup.set()
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None
        async with self._lock:
            await self._stop_observer()
        self._by_first.clear()
        self._by_last.clear()
        with self._inbox_lock:
            self._inbox.clear()
        self._fault = "stopped"
        log.debug("watcher stopped root=%s", self._root_s)

    async def __aenter__(self) -> Watcher:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def batches(self) -> AsyncIterator[Batch]:
        """Yield batches of due paths until the watcher stops. Never yields an empty batch."""
        while self._running:
            now = time.monotonic()
            batch = self._take_due(now)
            if batch:
                yield batch
                continue
            nxt = self._next_due()
            self._wakeup.clear()
            timeout = None if nxt is None else max(0.0, nxt - now)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wakeup.wait()

    # ---- coalescing (on the loop)

    def _note(self, rel: str, wall: float, mono: float) -> None:
        if rel in self._by_first:
            self._by_last[rel] = mono
            self._by_last.move_to_end(rel)
            return
        if not self._by_first:
            # the only case where the next due time moves earlier
            self._wakeup.set()
        self._by_first[rel] = (wall, mono)
        self._by_last[rel] = mono
        if len(self._by_first) > MAX_PENDING_PATHS:
            self._collapse_to_rescan()

    def _collapse_to_rescan(self) -> None:
        oldest_wall, oldest_mono = next(iter(self._by_first.values()))
        count = len(self._by_first)
        self._by_first.clear()
        self._by_last.clear()
        self._by_first[RESCAN] = (oldest_wall, oldest_mono)
        self._by_last[RESCAN] = time.monotonic()
        log.warning("watcher dropped pending paths for a rescan root=%s pending=%d",
                    self._root_s, count)

    def _note_rescan(self) -> None:
        self._note(RESCAN, time.time(), time.monotonic())

    def _take_due(self, now: float) -> Batch:
        batch: Batch = {}
        settle_cut = now + _DUE_SLACK - self._settle
        by_last, by_first = self._by_last, self._by_first
        while by_last:
            rel = next(iter(by_last))
            if by_last[rel] > settle_cut:
                break
            by_last.popitem(last=False)
            batch[rel] = by_first.pop(rel)[0]
        first_cut = now + _DUE_SLACK - self._max_delay
        while by_first:
            rel = next(iter(by_first))
            wall, mono = by_first[rel]
            if mono > first_cut:
                break
            by_first.popitem(last=False)
            del by_last[rel]
            batch[rel] = wall
        return batch

    def _next_due(self) -> float | None:
        if not self._by_first:
            return None
        last = self._by_last[next(iter(self._by_last))] + self._settle
        first = self._by_first[next(iter(self._by_first))][1] + self._max_delay
        return min(last, first)

    # ---- from watchdog's threads

    def _threadsafe(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: we are shutting down
            loop.call_soon_threadsafe(fn, *args)

    def _deliver(self, event: FileSystemEvent) -> None:
        """Runs in watchdog's emitter thread; must never raise (it would kill the thread)."""
        try:
            wall, mono = time.time(), time.monotonic()
            rels: list[str] = []
            for raw in (event.src_path, event.dest_path):
                if not raw:
                    continue
                path = os.fsdecode(raw)
                if not path.startswith(self._prefix):
                    if path == self._root_s and isinstance(event, DirDeletedEvent):
                        self._threadsafe(self._set_fault, "dataset root deleted")
                    continue  # the root itself: its own changes are not replicated
                rel = path[len(self._prefix):]
                if not self._excludes.match(rel, event.is_directory):
                    rels.append(rel)
            if rels:
                with self._inbox_lock:
                    wake = not self._inbox
                    self._inbox.append((rels, wall, mono))
                if wake:
                    self._threadsafe(self._drain)
        except Exception:
            log.exception("watcher failed to handle an event root=%s event=%r",
                          self._root_s, event)
            self._threadsafe(self._note_rescan)

    def _drain(self) -> None:
        """On the loop: notes everything in the inbox, in the order it arrived."""
        with self._inbox_lock:
            taken, self._inbox = self._inbox, []
        if not self._running:
            return  # stopped: pending paths are dropped (the next start's scan finds them)
        note = self._note
        for rels, wall, mono in taken:
            for rel in rels:
                note(rel, wall, mono)

    def _skip_dir(self, path: bytes) -> bool:
        """Whether watchdog should not watch directory `path` (runs in its threads)."""
        prefix = os.fsencode(self._prefix)
        if not path.startswith(prefix):
            return False
        return self._excludes.match(os.fsdecode(path[len(prefix):]), True)

    # _Hooks: called from watchdog's threads, not for users of the Watcher
    def overflowed(self) -> None:
        self._threadsafe(self._on_overflow)

    def watch_failed(self, path: bytes, exc: OSError) -> None:
        self._threadsafe(
            self._set_fault,
            f"cannot watch path={os.fsdecode(path)!r} error={exc.strerror or exc}",
        )

    def thread_died(self, name: str, exc: BaseException) -> None:
        self._threadsafe(self._set_fault, f"watchdog thread died thread={name} error={exc!r}")

    # ---- faults and recovery (on the loop)

    def _on_overflow(self) -> None:
        self.overflows += 1
        self._note_rescan()
        now = time.monotonic()
        if now - self._last_overflow_log >= OVERFLOW_LOG_INTERVAL:
            log.warning(
                "watcher lost events (inotify queue overflow), rescan requested "
                "root=%s overflows=%d since_last_warning=%d",
                self._root_s, self.overflows, self.overflows - self._overflows_logged,
            )
            self._last_overflow_log = now
            self._overflows_logged = self.overflows

    def _set_fault(self, reason: str) -> None:
        if not self._running:
            return
        if self._restarting:
            self._restart_problem = self._restart_problem or reason
            return
        if self._fault is not None:
            log.debug("watcher still unhealthy root=%s reason=%s", self._root_s, reason)
            return
        self._fault = reason
        self._next_retry = time.monotonic() + self._retry_interval
        self._note_rescan()
        if self._warned_unhealthy:
            # a restart attempt failed again: said already
            log.debug("watcher still unhealthy root=%s reason=%s", self._root_s, reason)
        else:
            self._warned_unhealthy = True
            log.warning("watcher unhealthy, rescanning every %ss until it recovers "
                        "root=%s reason=%s", self._retry_interval, self._root_s, reason)

    def _check(self) -> str | None:
        obs = self._observer
        if obs is None:
            return "no observer"
        dead = obs.dead_thread()
        if dead is not None:
            return f"watchdog thread stopped thread={dead}"
        ident = _identity(self._root_s)
        if ident != self._root_id:
            return "dataset root vanished" if ident is None else "dataset root replaced"
        return None

    async def _supervise(self) -> None:
        while True:
            await asyncio.sleep(self._check_interval)
            try:
                await self._supervise_once()
            except Exception:
                # the supervisor is what gets the watcher out of trouble: it must go on
                log.exception("watcher supervisor failed root=%s", self._root_s)
                self._set_fault("supervisor error")

    async def _supervise_once(self) -> None:
        if self._fault is None:
            problem = self._check()
            if problem is not None:
                self._set_fault(problem)
            return
        if time.monotonic() < self._next_retry:
            return
        async with self._lock:
            if not self._running:
                return
            await self._stop_observer()
            # the fault stays until the new observer has proven itself: `healthy` must
            # never be true while nothing is watched
            self._restart_problem = None
            self._restarting = True
            try:
                await self._start_observer()
            finally:
                self._restarting = False
            self._fault = self._restart_problem or self._check()
        self._next_retry = time.monotonic() + self._retry_interval
        # after the restart, so that the rescan covers the time without watches
        self._note_rescan()
        if self._fault is None:
            self._warned_unhealthy = False
            log.info("watcher recovered root=%s", self._root_s)
        else:
            log.debug("watcher restart did not help root=%s reason=%s",
                      self._root_s, self._fault)

    async def _start_observer(self) -> None:
        """Start a fresh observer. Failures set the fault (via hooks or here)."""
        self._root_id = _identity(self._root_s)
        try:
            # adding the watches walks the tree: not on the loop
            self._observer = await asyncio.to_thread(self._new_observer)
        except OSError as exc:
            self._set_fault(f"cannot watch root={self._root_s} error={exc.strerror or exc}")
        # let the hooks that the start triggered (call_soon_threadsafe) run first
        await asyncio.sleep(0)

    def _new_observer(self) -> _Observer:
        obs = _Observer(self, self._skip_dir, self._deliver)
        try:
            # schedule() wants a handler; it is never called: the emitter delivers
            obs.schedule(FileSystemEventHandler(), self._root_s, recursive=True,
                         event_filter=_EVENT_FILTER)
            obs.start()
        except BaseException:
            obs.inotify.stop()
            obs.inotify.join()
            raise
        return obs

    async def _stop_observer(self) -> None:
        obs, self._observer = self._observer, None
        if obs is None:
            return
        await asyncio.to_thread(_stop_and_join, obs)


def _stop_and_join(obs: _Observer) -> None:
    if obs.is_alive():
        obs.stop()
        obs.join()
    else:
        # it died: its emitters and inotify reader may still run and hold the inotify fd
        with contextlib.suppress(Exception):
            obs.stop()
        obs.inotify.stop()
        if obs.inotify.is_alive():
            obs.inotify.join()
