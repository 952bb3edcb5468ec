"""The agent: one link to the receiver and a source per dataset."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc

from replicator import __version__
from replicator.agent.directory import DirectorySource
from replicator.agent.link import Link
from replicator.config import AgentConfig, DatasetConfig
from replicator.errors import ConfigError
from replicator.lag import DatasetStatus, status_document
from replicator.observe.metrics import ChangeLatency, DatasetCounters


class Agent:
    def __init__(self, source_id: str, receiver: str, state_dir: Path,
                 datasets: tuple[DatasetConfig, ...], *, block_size: int,
                 rescan_interval: float = 300.0, compress: bool = True,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
        self.source_id = source_id
        self.link = Link(receiver, source_id, credentials=credentials)
        self.sources: list[DirectorySource] = []
        for ds in datasets:
            if ds.type != "directory":
                raise ConfigError(f"dataset {ds.name}: type {ds.type!r} is not supported yet")
            self.sources.append(DirectorySource(
                ds, state_dir / "datasets" / ds.name, self.link, block_size=block_size,
                rescan_interval=rescan_interval, compress=compress))

    @classmethod
    def from_config(cls, config: AgentConfig,
                    credentials: grpc.ChannelCredentials | None = None) -> Agent:
        return cls(config.source_id, config.receiver, config.state_dir, config.datasets,
                   block_size=config.block_size, rescan_interval=config.rescan_interval,
                   compress=config.compress(),
                   credentials=credentials)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.link.run(), name="link")
            for s in self.sources:
                tg.create_task(s.run(), name=f"dataset {s.name}")

    def status_rows(self) -> list[DatasetStatus]:
        now = time.time()
        rows = []
        for s in self.sources:
            lag = s.lag()
            connected = self.link.connected.is_set()

            def age(at: float) -> float | None:
                return round(max(0.0, now - at), 6) if at else 0.0

            rows.append(DatasetStatus(
                source=self.source_id, dataset=s.name, type="directory",
                state=(s.state if connected or s.state == "error" else "disconnected"),
                written_lsn=s.written_lsn, flushed_lsn=s.flushed_lsn, applied_lsn=s.applied_lsn,
                write_lag_seconds=age(lag.oldest_unwritten_at),
                flush_lag_seconds=age(lag.oldest_unflushed_at),
                replay_lag_seconds=age(lag.oldest_unapplied_at),
                pending_bytes=lag.pending_bytes, pending_changes=lag.pending_changes,
                error=s.error or self.link.last_error,
            ))
        return rows

    def status_document(self) -> dict[str, object]:
        return status_document("agent", __version__, self.status_rows())

    def connected(self) -> dict[str, bool]:
        return {self.source_id: self.link.connected.is_set()}

    def counters(self) -> list[DatasetCounters]:
        return [DatasetCounters(self.source_id, s.name, raw_bytes=s.raw_bytes_sent,
                                wire_bytes=self.link.dataset_bytes[s.dataset],
                                records=s.records_sent, errors=dict(s.error_kinds))
                for s in self.sources]

    def measure_latency(self, latency: ChangeLatency) -> None:
        """Feed `latency` from the receiver's applied acks (on this agent's clock)."""
        for s in self.sources:
            s.observe_latency = latency.observer(self.source_id, s.name)
