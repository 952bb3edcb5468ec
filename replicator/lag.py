"""The one lag model that every view reads (/status, /metrics, MQTT, GetStatus).

Lag is measured on the agent's clock only: the agent knows when it first saw each change
and which LSNs the receiver has written, flushed and applied, so it computes the age of the
oldest change not yet written / flushed / applied. It sends those first-seen times with its
own clock reading in heartbeats; the receiver turns them into ages by adding the time that
passed on its own monotonic clock since the heartbeat arrived. Clock skew between the two
sites therefore never enters the figures.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field

CLOCK_WINDOW = 60   # heartbeats (about a minute) over which the agent's clock is estimated
STATES = ("starting", "catching_up", "streaming", "disconnected", "fenced", "promoted", "error")


@dataclass(slots=True)
class AgentLag:
    """What an agent reports about one dataset, on its own clock."""

    state: str = "starting"
    error: str = ""
    last_lsn: int = 0
    oldest_unwritten_at: float = 0.0   # 0: nothing outstanding
    oldest_unflushed_at: float = 0.0
    oldest_unapplied_at: float = 0.0
    pending_bytes: int = 0
    pending_changes: int = 0
    agent_time: float = 0.0            # the agent's clock when it measured the above
    received_mono: float = field(default_factory=time.monotonic)  # receiver's clock

    # agent clock minus our monotonic clock, the best estimate over recent heartbeats (see
    # ClockOffset); None: from this heartbeat alone
    clock_offset: float | None = None

    def agent_now(self, now_mono: float | None = None) -> float:
        """The agent's clock now, estimated on our monotonic clock."""
        now_mono = time.monotonic() if now_mono is None else now_mono
        if self.clock_offset is not None:
            return now_mono + self.clock_offset
        return self.agent_time + max(0.0, now_mono - self.received_mono)

    def age(self, oldest_at: float, now_mono: float | None = None) -> float:
        """Seconds since `oldest_at` (agent clock), carried forward on the local clock."""
        if not oldest_at:
            return 0.0
        return max(0.0, self.agent_now(now_mono) - oldest_at)


class ClockOffset:
    """The agent's clock relative to our monotonic clock, from heartbeats.

    A heartbeat that waited in transit (a stalled receiver reads a backlog of them) makes
    the agent's clock look earlier than it is, never later: the largest offset of the
    recent heartbeats is the one with the least delay, as NTP's minimum-delay filter has
    it. Only recent ones count, so that a stepped clock is followed within a window.
    """

    def __init__(self, window: int = CLOCK_WINDOW) -> None:
        self._recent: collections.deque[float] = collections.deque(maxlen=window)

    def update(self, agent_time: float, received_mono: float) -> float:
        self._recent.append(agent_time - received_mono)
        return max(self._recent)


@dataclass(slots=True)
class DatasetStatus:
    """One row of the status document (CONTRACT.md, "Status document")."""

    source: str
    dataset: str
    type: str
    state: str
    epoch: int = 1
    written_lsn: int = 0
    flushed_lsn: int = 0
    applied_lsn: int = 0
    write_lag_seconds: float | None = None
    flush_lag_seconds: float | None = None
    replay_lag_seconds: float | None = None
    pending_bytes: int = 0
    pending_changes: int = 0
    last_applied_at: float | None = None
    last_contact_at: float | None = None
    error: str | None = None

    def to_json(self) -> dict[str, object]:
        doc: dict[str, object] = {
            "source": self.source, "dataset": self.dataset, "type": self.type,
            "state": self.state, "epoch": self.epoch,
            "written_lsn": self.written_lsn, "flushed_lsn": self.flushed_lsn,
            "applied_lsn": self.applied_lsn,
            "write_lag_seconds": _round(self.write_lag_seconds),
            "flush_lag_seconds": _round(self.flush_lag_seconds),
            "replay_lag_seconds": _round(self.replay_lag_seconds),
            "pending_bytes": self.pending_bytes, "pending_changes": self.pending_changes,
            "last_applied_at": self.last_applied_at, "last_contact_at": self.last_contact_at,
        }
        if self.error:
            doc["error"] = self.error
        return doc


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 6)


def status_document(role: str, version: str, rows: list[DatasetStatus]) -> dict[str, object]:
    return {"role": role, "version": version, "now": time.time(),
            "datasets": [r.to_json() for r in rows]}
