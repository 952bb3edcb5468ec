"""One dataset on the receiver: journal, mirror, manifest, applier and positions.

The session appends frames and calls `flushed()` after each group commit; the dataset's
apply task runs the applier in a worker thread whenever the flushed LSN moves ahead of the
applied LSN, and tells whoever listens (the session, to send an ack) when it advanced.

A record that fails on the receiver's own storage (a full disk, an I/O error)
stops applying as any failed record does, but is tried again, with a capped exponential
backoff, by a fresh applier and manifest over the same files, exactly as a restart would
replay it: applying is idempotent, and the journal still holds every record not applied.

The applier runs in a thread of the dataset's own, which cancelling the apply task does not
stop: `stop()` waits for a group under way to end before it closes the journal, mirror
and manifest that the group uses (the mirror's cached directory fds among them).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from replicator.lag import AgentLag, DatasetStatus
from replicator.receiver.applier import Applier, ApplyError
from replicator.receiver.journal import Journal
from replicator.receiver.manifest import Manifest
from replicator.receiver.mirror import Mirror
from replicator.receiver.partial import STORE_DIR, Partial, PartialStore
from replicator.receiver.syscalls import Calls

log = logging.getLogger(__name__)

STORAGE_RETRY_INITIAL = 1.0   # seconds before a record that failed on our storage is retried
STORAGE_RETRY_MAX = 30.0


class ReceiverDataset:
    def __init__(self, source: str, name: str, kind: str, mirror_dir: Path,
                 state_dir: Path, *, calls: Calls | None = None) -> None:
        self.source = source
        self.name = name
        self.kind = kind
        self.label = f"{source}/{name}"
        self.state_dir = state_dir
        self.mirror_dir = mirror_dir
        self.journal = Journal(state_dir / "journal")
        self.manifest = Manifest(state_dir / "manifest.db")
        self.mirror = Mirror(mirror_dir, state_dir / "staging", calls)
        self.applier = self._new_applier()
        self.connected = False
        self.last_contact_at: float | None = None
        self.agent_lag: AgentLag | None = None
        self.error: str | None = None
        self.storage_error: str | None = None   # the last stream failed on our own storage
        self.on_applied: Callable[[ReceiverDataset], None] | None = None
        self.wire_bytes = 0          # frame bytes received, for metrics
        self.records_applied = 0
        self.observe_latency: Callable[[float], None] | None = None
        self.applier.on_applied = self._applied_records
        self._storage_failed = False  # `error` came from our storage: retry it
        # a big new file the last stream broke off, kept for the next one (session only),
        # and where it is saved so that a restart can continue it too
        self.partial: Partial | None = None
        self.partials = PartialStore(state_dir / STORE_DIR, self.mirror, self.label)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._busy: concurrent.futures.Future[object] | None = None  # in the apply thread

    def _new_applier(self) -> Applier:
        return Applier(self.journal, self.mirror, self.manifest, self.state_dir / "keep",
                       label=self.label)

    def _restart_applier(self) -> None:
        """A fresh manifest (what was not committed is discarded, as a crash would) and
        applier, which replays from the durable applied LSN. Blocking: a worker thread."""
        self.manifest.close()
        self.manifest = Manifest(self.state_dir / "manifest.db")
        self.applier = self._new_applier()

    def open(self) -> None:
        """Recover: replay what is journaled beyond the durable applied LSN, keeping the
        staged file of a saved partial record that is the next one (see `partial`)."""
        self.journal.open(self.applier.applied_lsn)
        self.partial = self.partials.load(self.journal.flushed_lsn + 1)
        self.applier.recover(keep_incoming=self.partial.staged if self.partial else "")
        self.journal.release(self.applier.applied_lsn)
        log.info("dataset opened dataset=%s applied_lsn=%d flushed_lsn=%d", self.label,
                 self.applier.applied_lsn, self.journal.flushed_lsn)

    @property
    def applied_lsn(self) -> int:
        return self.applier.applied_lsn

    @property
    def flushed_lsn(self) -> int:
        return self.journal.flushed_lsn

    @property
    def written_lsn(self) -> int:
        return self.journal.written_lsn

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._apply_loop(),
                                                            name=f"apply {self.label}")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        busy = self._busy
        if busy is not None and not busy.done():
            await asyncio.to_thread(concurrent.futures.wait, [busy])
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
        if self.partial is not None:
            self.partial.close()  # its file and saved state stay for the next start
            self.partial = None
        self.partials.close()  # a save under way finishes first: it uses the mirror
        self.journal.close()
        self.mirror.close()
        self.manifest.close()

    def _applied_records(self, applied_lsn: int, first_seen: list[float]) -> None:
        """After each durable commit of the applier (in its worker thread).

        Latency is measured on the agent's clock, carried forward from its last heartbeat,
        as every lag is: the first-seen times are the agent's, and the clocks may differ.
        Records replayed before any agent spoke to us have no clock to compare with.
        """
        self.records_applied += len(first_seen)
        lag = self.agent_lag
        if self.observe_latency is None or lag is None or not first_seen:
            return
        now = lag.agent_now()
        for at in first_seen:
            if at:
                self.observe_latency(max(0.0, now - at))

    def flushed(self) -> None:
        """Called after a group commit: there may be records to apply."""
        self._wake.set()

    async def _in_apply_thread(self, fn: Callable[..., object], *args: object) -> object:
        """fn(*args) in the dataset's apply thread; see the module doc for why not to_thread."""
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix=f"apply {self.label}")
        self._busy = self._pool.submit(fn, *args)
        return await asyncio.wrap_future(self._busy)

    async def _apply_loop(self) -> None:
        backoff = STORAGE_RETRY_INITIAL
        retrying = False
        while True:
            if self._storage_failed:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, STORAGE_RETRY_MAX)
                try:
                    await self._in_apply_thread(self._restart_applier)
                except Exception as e:  # the manifest cannot even be opened: later, again
                    log.warning("apply retry failed dataset=%s error=%s", self.label, e)
                    continue
                self.error = None
                self._storage_failed = False
                retrying = True
            else:
                await self._wake.wait()
            self._wake.clear()
            while self.error is None and self.applier.applied_lsn < self.journal.flushed_lsn:
                target = self.journal.flushed_lsn
                try:
                    await self._in_apply_thread(self.applier.apply_upto, target)
                except ApplyError as e:
                    if not retrying:  # once per outage, not once per retry
                        log.error("apply stopped dataset=%s error=%s", self.label, e.message)
                    self.error = e.message
                    # SQLite says "database or disk is full" as an OperationalError
                    self._storage_failed = isinstance(e.__cause__,
                                                      (OSError, sqlite3.OperationalError))
                except Exception as e:  # a bug must not kill the daemon silently
                    self.error = f"apply failed: {e!r}"
                    log.exception("apply failed dataset=%s", self.label)
                self.journal.release(self.applier.applied_lsn)
                if self.on_applied is not None:
                    self.on_applied(self)
            if retrying and self.error is None:
                retrying = False
                backoff = STORAGE_RETRY_INITIAL
                log.info("apply recovered dataset=%s applied_lsn=%d", self.label,
                         self.applier.applied_lsn)

    def status(self) -> DatasetStatus:
        lag = self.agent_lag
        row = DatasetStatus(
            source=self.source, dataset=self.name, type=self.kind, state="disconnected",
            written_lsn=self.written_lsn, flushed_lsn=self.flushed_lsn,
            applied_lsn=self.applied_lsn, last_applied_at=self.applier.last_applied_at or None,
            last_contact_at=self.last_contact_at,
        )
        error = (self.error or self.applier.error or self.storage_error
                 or (lag.error if lag else ""))
        if error:
            row.error = error
        if not self.connected or lag is None:
            row.state = "error" if error else "disconnected"
            return row
        now = time.monotonic()
        caught_up = self.applied_lsn >= lag.last_lsn
        row.write_lag_seconds = 0.0 if self.written_lsn >= lag.last_lsn else lag.age(
            lag.oldest_unwritten_at, now)
        row.flush_lag_seconds = 0.0 if self.flushed_lsn >= lag.last_lsn else lag.age(
            lag.oldest_unflushed_at, now)
        row.replay_lag_seconds = 0.0 if caught_up and not lag.pending_changes else lag.age(
            lag.oldest_unapplied_at, now)
        row.pending_bytes = lag.pending_bytes
        row.pending_changes = lag.pending_changes
        row.state = "error" if error else lag.state
        return row
