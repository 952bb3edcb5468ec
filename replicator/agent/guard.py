"""The agent's safety guard for a directory dataset, and what it keeps in its state dir.

`RootGuard` stops a dataset whose root vanishes, moves to another file system, becomes
unreadable or becomes empty in one go, because that is what an unmounted disk looks like
and shipping it would wipe the mirror (the dataset, agent/directory.py, asks it before
every rescan and deletion). Two small files help it:

- The operator's confirmation (`allow-empty`): an operator who emptied a dataset on purpose
  says so with `replicator allow-empty`, which writes this file. The agent takes it at its
  next guard check (the file is the message: no restart, no connection to the running
  process), ships the deletions once and removes it, so that the next emptying is guarded
  again. One older than ALLOW_EMPTY_TTL is void: an emptying that comes hours later is not
  the one the operator meant. It is JSON that names itself (`kind`, `version`), the
  dataset and the time it was given.
- The root's mount point (`root-mount`): where the file system holding the root is mounted,
  as last seen with the root non-empty. Within one run the guard compares the root's
  device; across a restart (a reboot whose mount failed) only this tells an empty mount
  point from an emptied root: a path, unlike a device number, is stable across reboots.

Both are written temp file, fsync, rename, fsync directory: never read half-written, and
what was confirmed survives a crash.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import stat as st_mod
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from replicator.durable import fsync_dir, write_atomic
from replicator.errors import SourceUnsafe

log = logging.getLogger(__name__)

CONFIRMATION_FILE = "allow-empty"
ROOT_MOUNT_FILE = "root-mount"
KIND = "replicator-allow-empty"
VERSION = 1
ALLOW_EMPTY_TTL = 600.0     # seconds a confirmation stays good
FILE_MODE = 0o644           # the agent may run as another user than the operator
MAX_FILE_BYTES = 8192       # either file is a few dozen bytes (a path at most 4 KiB)


def dataset_dir(agent_state_dir: Path, dataset: str) -> Path:
    """Where the agent keeps the state of `dataset` (its index, and these files)."""
    return agent_state_dir / "datasets" / dataset


# ---- the operator's confirmation ----

@dataclass(frozen=True, slots=True)
class Confirmation:
    dataset: str
    granted_at: float   # Unix seconds, on this host's clock (the agent's too)

    def age(self, now: float) -> float:
        return now - self.granted_at

    def fresh(self, now: float) -> bool:
        # one "from the future" beyond the TTL means the clock was stepped: it cannot be
        # trusted to be recent either
        return abs(self.age(now)) <= ALLOW_EMPTY_TTL


class BadConfirmation(ValueError):
    """The file is there but is not a confirmation this version understands."""


def grant(directory: Path, dataset: str, now: float | None = None) -> Confirmation:
    """Writes the confirmation for `dataset` into its state `directory`, durably.

    Replaces an earlier one (the newer time counts). Raises OSError when it cannot be
    written; `directory` must exist (the agent made it when it first ran the dataset).
    """
    c = Confirmation(dataset, time.time() if now is None else now)
    _write(directory, CONFIRMATION_FILE, json.dumps(
        {"kind": KIND, "version": VERSION, "dataset": c.dataset, "granted_at": c.granted_at}
    ).encode() + b"\n")
    return c


def read(directory: Path) -> Confirmation | None:
    """The confirmation in `directory`, None if there is none.

    Raises BadConfirmation for a file that is not one, OSError when it cannot be read.
    """
    raw = _read(directory, CONFIRMATION_FILE)
    if raw is None:
        return None
    if len(raw) > MAX_FILE_BYTES:
        raise BadConfirmation(f"over {MAX_FILE_BYTES} bytes")
    try:
        doc = json.loads(raw)
    except ValueError:
        raise BadConfirmation("not JSON") from None
    if not isinstance(doc, dict) or doc.get("kind") != KIND:
        raise BadConfirmation("not an allow-empty confirmation")
    if doc.get("version") != VERSION:
        raise BadConfirmation(f"version {doc.get('version')!r}, this agent reads {VERSION}")
    dataset, granted_at = doc.get("dataset"), doc.get("granted_at")
    if not isinstance(dataset, str) or not isinstance(granted_at, (int, float)) \
            or isinstance(granted_at, bool):
        raise BadConfirmation("dataset or granted_at missing")
    return Confirmation(dataset, float(granted_at))


def discard(directory: Path) -> None:
    """Removes the confirmation durably (missing is fine); raises OSError if it cannot."""
    try:
        (directory / CONFIRMATION_FILE).unlink()
    except FileNotFoundError:
        return
    fsync_dir(directory)


# ---- the root's mount point ----

def mount_point(root: Path) -> bytes:
    """The mount point of the file system that holds the directory `root`, as bytes.

    Found by walking up while the device stays the same (bind mounts of one file system
    look alike; that is fine: they hold the same data). Raises OSError if `root` cannot
    be looked at.
    """
    path = os.path.realpath(os.fsencode(root))
    dev = os.stat(path).st_dev
    while True:
        parent = os.path.dirname(path)
        if parent == path:
            return path
        try:
            if os.stat(parent).st_dev != dev:
                return path
        except OSError:
            return path  # a parent we may not look at: the mount point is at or below it
        path = parent


def recorded_mount_point(directory: Path) -> bytes | None:
    """The mount point recorded by record_mount_point; None if none (or unreadable)."""
    try:
        raw = _read(directory, ROOT_MOUNT_FILE)
    except OSError:
        return None
    if raw is None or len(raw) > MAX_FILE_BYTES or not raw.startswith(b"/"):
        return None
    return raw


def record_mount_point(directory: Path, mount: bytes) -> None:
    """Records `mount` durably; raises OSError if it cannot."""
    _write(directory, ROOT_MOUNT_FILE, mount)


# ---- files ----

def _write(directory: Path, name: str, data: bytes) -> None:
    write_atomic(directory / name, data, FILE_MODE)


def _read(directory: Path, name: str) -> bytes | None:
    try:
        with open(directory / name, "rb") as f:
            return f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        return None


class RootGuard:
    """The safety guard of one directory dataset: stops it while its root looks unmounted
    or emptied in one go (see the module doc), lets an emptying through once the operator
    confirmed it, and records the root's mount point.

    `log_error(kind, key, message)` counts and logs (rate-limited) a failure of the
    guard's own files; they never stop the dataset by themselves.
    """

    def __init__(self, root: Path, state_dir: Path, name: str,
                 log_error: Callable[[str, str, str], None]) -> None:
        self.root = root
        self.state_dir = state_dir
        self.name = name
        self._log_error = log_error
        self._root_dev: int | None = None
        # the operator let this emptying through (allow-empty): it holds until the root
        # is non-empty again or its deletions are all shipped, across reconnects
        self._empty_allowed = False
        # a confirmation came while the root looked unmounted: it was refused, and the
        # error says so until the root is healthy again
        self._allow_refused = False
        # the root's mount point was compared with the recorded one, with the root non-empty
        self._mount_noted = False

    def check(self, known_entries: int) -> None:
        """Raises SourceUnsafe unless the root is still the directory it was;
        `known_entries`: how many entries the receiver holds at the root's top.

        An emptied root passes if the operator confirmed it (see _use_confirmation). The
        other failures look like an unmounted disk, and a confirmation never covers them.
        """
        try:
            st = os.stat(self.root)
        except OSError as e:
            raise self._unmounted(f"dataset root {self.root} is gone ({e.strerror})") from None
        if not st_mod.S_ISDIR(st.st_mode):
            raise self._unmounted(f"dataset root {self.root} is not a directory")
        if self._root_dev is None:
            self._root_dev = st.st_dev
        elif st.st_dev != self._root_dev:
            raise self._unmounted(f"dataset root {self.root} is on another file system now "
                                  "(unmounted?)")
        try:
            with os.scandir(self.root) as it:
                empty = next(it, None) is None
        except OSError as e:
            raise self._unmounted(f"dataset root {self.root} is unreadable "
                                  f"({e.strerror})") from None
        if empty and known_entries:
            moved = self._mount_moved()
            if moved is not None:
                raise self._unmounted(moved)
            self._allow_refused = False
            if not self._empty_allowed and not self._use_confirmation(known_entries, use=True):
                raise SourceUnsafe(
                    f"dataset root {self.root} became empty in one go; not wiping the mirror. "
                    f"If it was emptied on purpose, run: {self._allow_empty_command()}")
            self._empty_allowed = True
            return
        self._allow_refused = False
        self._empty_allowed = False
        if not empty:
            self._note_mount()
        self._use_confirmation(known_entries, use=False)  # a void one is removed, and said so, now

    def _mount_moved(self) -> str | None:
        """Why the root looks unmounted though it is on the same device as at start: it is
        no longer where the recorded mount point says (after a restart, `_root_dev` was
        learned from the empty mount point itself). None if it is where it was."""
        recorded = recorded_mount_point(self.state_dir)
        if recorded is None:
            return None
        try:
            now = mount_point(self.root)
        except OSError as e:
            return f"dataset root {self.root} is unreadable ({e.strerror})"
        if now == recorded:
            return None
        return (f"dataset root {self.root} is on the file system mounted at "
                f"{os.fsdecode(now)} now, not {os.fsdecode(recorded)} (unmounted?); if it "
                f"moved there on purpose, delete {self.state_dir / ROOT_MOUNT_FILE}")

    def _note_mount(self) -> None:
        """Records where the root's file system is mounted, once a run, with the root
        non-empty: what _mount_moved compares with after a restart."""
        if self._mount_noted:
            return
        self._mount_noted = True
        try:
            mount = mount_point(self.root)
            if recorded_mount_point(self.state_dir) != mount:
                record_mount_point(self.state_dir, mount)
                log.info("dataset root's file system noted dataset=%s mount_point=%s",
                         self.name, os.fsdecode(mount))
        except OSError as e:
            # not fatal: the guard still compares devices within this run
            self._log_error("state", "root-mount", "cannot note the root's mount point in "
                            f"{self.state_dir}: {e.strerror or e}")

    def _unmounted(self, message: str) -> SourceUnsafe:
        """The error for a root that looks unmounted. A confirmation to ship an emptied root
        that arrives now is refused and removed: it was given for something else."""
        self._empty_allowed = False
        try:
            confirmed = read(self.state_dir) is not None
        except (BadConfirmation, OSError):
            confirmed = True  # whatever it is, it must not be used later
        if confirmed and self._discard_confirmation():
            log.warning("allow-empty refused, confirmation removed dataset=%s reason=%r: "
                        "the root looks unmounted, not emptied", self.name, message)
            self._allow_refused = True
        if self._allow_refused:
            message += "; allow-empty refused: that is an unmount, not an emptying"
        return SourceUnsafe(message)

    def _use_confirmation(self, known_entries: int, *, use: bool) -> bool:
        """Looks at the operator's allow-empty confirmation; True if it lets this emptying
        through. A good one is used up when `use` (removed before anything is shipped, so
        that it never lets a second emptying through); a void one (expired, unreadable,
        for another dataset) is removed with a log line."""
        void: str | None = None
        now = time.time()
        age = 0.0
        try:
            c = read(self.state_dir)
            if c is None:
                return False
            age = c.age(now)
            if c.dataset != self.name:
                void = f"it names dataset {c.dataset!r}"
            elif not c.fresh(now):
                void = (f"expired: given {age:.0f} s ago, good for "
                        f"{ALLOW_EMPTY_TTL:.0f} s")
            elif not use:
                return False  # given before the emptying: it waits for it
        except (BadConfirmation, OSError) as e:
            void = f"unreadable: {e}"
        if not self._discard_confirmation():
            return False
        if void is not None:
            log.warning("allow-empty confirmation void, removed dataset=%s reason=%r",
                        self.name, void)
            return False
        log.warning("operator allowed shipping the emptied root (allow-empty) dataset=%s "
                    "root=%s given_seconds_ago=%.1f entries_to_delete=%d", self.name,
                    self.root, age, known_entries)
        return True

    def _discard_confirmation(self) -> bool:
        try:
            discard(self.state_dir)
        except OSError as e:
            self._log_error("state", "allow-empty", "cannot remove the allow-empty "
                            f"confirmation in {self.state_dir}: {e.strerror or e}; not using it")
            return False
        return True

    def _allow_empty_command(self) -> str:
        """The command that confirms this dataset's emptying, for the error text."""
        if self.state_dir.parent.name == "datasets":  # <state_dir>/datasets/<name>
            agent_state = shlex.quote(str(self.state_dir.parent.parent.absolute()))
            return (f"replicator allow-empty --state-dir {agent_state} "
                    f"--dataset {shlex.quote(self.name)}")
        return f"replicator allow-empty --config AGENT.toml --dataset {shlex.quote(self.name)}"
