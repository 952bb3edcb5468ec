"""What the agent's safety guard keeps in a dataset's state directory.

The guard (agent/directory.py) stops a dataset whose root vanishes, moves to another file
system, becomes unreadable or becomes empty in one go, because that is what an unmounted
disk looks like and shipping it would wipe the mirror. Two small files help it:

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
import os
import time
from dataclasses import dataclass
from pathlib import Path

from replicator.durable import fsync_dir, write_atomic

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
