"""The receiver: datasets, sessions, the gRPC server and the status they add up to.

Datasets live in `<state_dir>/sources/<source>/<dataset>/` (journal, manifest, staging,
keep links) and are opened (recovered) at start, so that a restarted receiver replays what
it journaled before the agent even reconnects. Their mirrors are
`<mirror_root>/<source>/<dataset>/`, or whatever `mirror_dir` maps them to (the all-in-one
`mirror` command maps its one dataset to DST).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from replicator import __version__
from replicator.config import NAME_RE
from replicator.errors import ConfigError, ProtocolError
from replicator.lag import DatasetStatus, status_document
from replicator.observe.metrics import ChangeLatency, DatasetCounters
from replicator.receiver.dataset import ReceiverDataset
from replicator.receiver.service import ReplicatorServicer
from replicator.receiver.session import Session
from replicator.receiver.syscalls import make_calls
from replicator.wire import SERVICE_NAME
from replicator.wire.stream import add_replicator_servicer

log = logging.getLogger(__name__)

MAX_MESSAGE = 16 << 20
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
]
DATASET_TYPES = ("directory",)


class Receiver:
    def __init__(self, state_dir: Path, mirror_dir: Callable[[str, str], Path], *,
                 sources: tuple[str, ...] | None = None,
                 require_client_identity: bool = False, hold_lock: bool = False) -> None:
        self.state_dir = state_dir
        # the appliers' quick file-system calls keep the interpreter lock: for a receiver
        # that shares its process with an agent (`replicator mirror`; see syscalls)
        self.hold_lock = hold_lock
        # agents must present a certificate naming their source_id (tls.client_ca)
        self.require_client_identity = require_client_identity
        self.mirror_dir = mirror_dir
        self.sources = sources
        self.latency: ChangeLatency | None = None
        self.datasets: dict[tuple[str, str], ReceiverDataset] = {}
        self.sessions: dict[str, Session] = {}
        self.server: grpc.aio.Server | None = None
        self.port = 0

    # ---- datasets ----

    def _dataset_dir(self, source: str, name: str) -> Path:
        return self.state_dir / "sources" / source / name

    def load(self) -> None:
        """Opens (and recovers) every dataset this receiver has state for."""
        root = self.state_dir / "sources"
        if not root.is_dir():
            return
        for meta in sorted(root.glob("*/*/dataset.json")):
            info = json.loads(meta.read_text())
            self.dataset(info["source"], info["dataset"], info["type"])

    def find(self, source: str, name: str) -> ReceiverDataset | None:
        return self.datasets.get((source, name))

    def dataset(self, source: str, name: str, kind: str) -> ReceiverDataset:
        ds = self.datasets.get((source, name))
        if ds is not None:
            if ds.kind != kind:
                raise ProtocolError(f"dataset {source}/{name} is a {ds.kind}, not a {kind}")
            return ds
        if not NAME_RE.match(name):
            raise ProtocolError(f"dataset name {name[:100]!r} must match [a-zA-Z0-9_.-]+")
        if kind not in DATASET_TYPES:
            raise ProtocolError(f"dataset {source}/{name}: type {kind!r} is not supported")
        state = self._dataset_dir(source, name)
        state.mkdir(parents=True, exist_ok=True)
        meta = state / "dataset.json"
        if not meta.exists():
            tmp = meta.with_suffix(".tmp")
            tmp.write_text(json.dumps({"source": source, "dataset": name, "type": kind}))
            tmp.replace(meta)
        mirror = self.mirror_dir(source, name)
        ds = ReceiverDataset(source, name, kind, mirror, state,
                             calls=make_calls(self.hold_lock, mirror))
        if self.latency is not None:
            ds.observe_latency = self.latency.observer(source, name)
        ds.open()
        ds.start()
        self.datasets[(source, name)] = ds
        return ds

    # ---- sessions ----

    def check_source(self, source: str, peer: str) -> str:
        if not NAME_RE.match(source):
            raise ProtocolError(f"source id {source[:100]!r} must match [a-zA-Z0-9_.-]+")
        if self.sources is not None and source not in self.sources:
            raise PermissionError(f"source {source!r} is not in this receiver's [[sources]]")
        return source

    def attach(self, session: Session) -> None:
        old = self.sessions.get(session.source)
        if old is not None:
            log.warning("agent reconnected, dropping the older stream source=%s peer=%s",
                        session.source, old.peer)
            old.cancel()
        self.sessions[session.source] = session

    def detach(self, session: Session) -> bool:
        """True if `session` was the source's current one (and is now gone)."""
        if self.sessions.get(session.source) is session:
            del self.sessions[session.source]
            return True
        return False

    # ---- server ----

    async def start(self, listen: str, credentials: grpc.ServerCredentials | None = None) -> int:
        self.load()
        server = grpc.aio.server(options=GRPC_OPTIONS)
        add_replicator_servicer(ReplicatorServicer(self), server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        if credentials is None:
            port = server.add_insecure_port(listen)
        else:
            port = server.add_secure_port(listen, credentials)
        if port == 0:
            raise ConfigError(f"cannot listen on {listen}")
        await server.start()
        await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        self.server = server
        self.port = port
        log.info("receiver listening address=%s port=%d", listen, port)
        return port

    async def stop(self, grace: float = 2.0) -> None:
        if self.server is not None:
            await self.server.stop(grace)
            self.server = None
        for ds in self.datasets.values():
            await ds.stop()
        self.datasets.clear()

    # ---- status ----

    def status_rows(self) -> list[DatasetStatus]:
        return [ds.status() for _, ds in sorted(self.datasets.items())]

    def status_document(self) -> dict[str, object]:
        return status_document("receiver", __version__, self.status_rows())

    def measure_latency(self, latency: ChangeLatency) -> None:
        """Feed `latency` from every dataset's applier, now and as datasets appear."""
        self.latency = latency
        for (source, name), ds in self.datasets.items():
            ds.observe_latency = latency.observer(source, name)

    def connected(self) -> dict[str, bool]:
        """Per source that has datasets here: is its agent's stream open?"""
        out: dict[str, bool] = {}
        for (source, _), ds in self.datasets.items():
            out[source] = out.get(source, False) or ds.connected
        return out

    def counters(self) -> list[DatasetCounters]:
        return [DatasetCounters(source, name, wire_bytes=ds.wire_bytes,
                                records=ds.records_applied,
                                errors=dict(ds.applier.errors))
                for (source, name), ds in sorted(self.datasets.items())]
