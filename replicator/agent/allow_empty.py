"""The operator's one-shot confirmation that a dataset's root was emptied on purpose.

The agent's safety guard (agent/directory.py) stops a dataset whose root becomes empty in
one go, because that is what an unmounted disk looks like, and shipping it would wipe the
mirror. An operator who emptied the dataset deliberately says so with `replicator
allow-empty`, which leaves this small file in the dataset's state directory. The agent
takes it at its next guard check (no restart, no connection to the running process: the
file is the message), ships the deletions once, and removes it, so that the next emptying
is guarded again. A confirmation older than ALLOW_EMPTY_TTL is void: an emptying that comes
hours later is not the one the operator meant.

The file is JSON that names itself (`kind`, `version`), the dataset and the time it was
given; it is written temp file, fsync, rename, fsync directory, so that the agent never
reads half of one and one that was confirmed survives a crash.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

FILE_NAME = "allow-empty"
KIND = "replicator-allow-empty"
VERSION = 1
ALLOW_EMPTY_TTL = 600.0     # seconds a confirmation stays good
FILE_MODE = 0o644           # the agent may run as another user than the operator
MAX_FILE_BYTES = 4096       # a confirmation is a few dozen bytes; more is not one


def dataset_dir(agent_state_dir: Path, dataset: str) -> Path:
    """Where the agent keeps the state of `dataset` (its index, and the confirmation)."""
    return agent_state_dir / "datasets" / dataset


@dataclass(frozen=True, slots=True)
class Confirmation:
    dataset: str
    granted_at: float   # Unix seconds, on this host's clock (the agent's too)

    def age(self, now: float) -> float:
        return now - self.granted_at

    def fresh(self, now: float) -> bool:
        # a confirmation "from the future" beyond the TTL means the clock was stepped:
        # it cannot be trusted to be recent either
        return abs(self.age(now)) <= ALLOW_EMPTY_TTL


class BadConfirmation(ValueError):
    """The file is there but is not a confirmation this version understands."""


def grant(directory: Path, dataset: str, now: float | None = None) -> Confirmation:
    """Writes the confirmation for `dataset` into its state `directory`, durably.

    Replaces an earlier one (the newer time counts). Raises OSError when it cannot be
    written; `directory` must exist (the agent made it when it first ran the dataset).
    """
    c = Confirmation(dataset, time.time() if now is None else now)
    data = json.dumps({"kind": KIND, "version": VERSION, "dataset": c.dataset,
                       "granted_at": c.granted_at}).encode() + b"\n"
    final = directory / FILE_NAME
    tmp = directory / f".{FILE_NAME}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
    try:
        try:
            os.fchmod(fd, FILE_MODE)  # the umask may have taken read bits away
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(directory)
    return c


def read(directory: Path) -> Confirmation | None:
    """The confirmation in `directory`, None if there is none.

    Raises BadConfirmation for a file that is not one, OSError when it cannot be read.
    """
    try:
        with open(directory / FILE_NAME, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
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


def exists(directory: Path) -> bool:
    return (directory / FILE_NAME).exists()


def discard(directory: Path) -> None:
    """Removes the confirmation durably (missing is fine); raises OSError if it cannot."""
    try:
        (directory / FILE_NAME).unlink()
    except FileNotFoundError:
        return
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
