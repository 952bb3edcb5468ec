"""Prometheus exposition of the lag model and the counters, through prometheus-client.

Custom collectors read live state at scrape time (the status rows, the counters), so
nothing is updated on the hot path; only the change-latency histogram is a real
`Histogram`, observed once per applied record. Each process serves one registry: the
all-in-one `mirror` command combines the receiver's rows and histogram with the agent's
counters (`CountersCollector` merges the two sides), so that no series appears twice.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from replicator.lag import DatasetStatus
from replicator.observe.http import Route

# from a local change applied in a millisecond to a mirror minutes behind
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
METRIC_NAMES = (
    "replicator_replay_lag_seconds", "replicator_flush_lag_seconds",
    "replicator_write_lag_seconds", "replicator_pending_bytes", "replicator_pending_changes",
    "replicator_applied_lsn", "replicator_connected", "replicator_bytes_total",
    "replicator_records_total", "replicator_change_latency_seconds",
    "replicator_errors_total",
)


@dataclass(frozen=True, slots=True)
class DatasetCounters:
    """One dataset's counters as one side (agent or receiver) knows them."""

    source: str
    dataset: str
    wire_bytes: int
    records: int
    raw_bytes: int | None = None          # None: this side does not know it
    errors: Mapping[str, int] = field(default_factory=dict)


StatusRows = Callable[[], Iterable[DatasetStatus]]
Connected = Callable[[], Mapping[str, bool]]
CounterSource = Callable[[], Iterable[DatasetCounters]]

_GAUGES = (
    ("replicator_replay_lag_seconds", "replay_lag_seconds",
     "Age of the oldest change seen on the primary and not yet applied on the mirror"),
    ("replicator_flush_lag_seconds", "flush_lag_seconds",
     "Age of the oldest change seen on the primary and not yet durable in the journal"),
    ("replicator_write_lag_seconds", "write_lag_seconds",
     "Age of the oldest change seen on the primary and not yet received"),
    ("replicator_pending_bytes", "pending_bytes", "Bytes changed and not yet applied"),
    ("replicator_pending_changes", "pending_changes", "Changes not yet applied"),
    ("replicator_applied_lsn", "applied_lsn", "Last LSN visible and durable in the mirror"),
)


class StatusCollector(Collector):
    """The gauges of the status rows; a lag that is unknown (no contact) has no sample."""

    def __init__(self, rows: StatusRows, connected: Connected) -> None:
        self.rows = rows
        self.connected = connected

    def collect(self) -> Iterator[Metric]:
        rows = list(self.rows())
        for name, attr, doc in _GAUGES:
            family = GaugeMetricFamily(name, doc, labels=["source", "dataset"])
            for row in rows:
                value = getattr(row, attr)
                if value is not None:
                    family.add_metric([row.source, row.dataset], float(value))
            yield family
        up = GaugeMetricFamily("replicator_connected", "1 while the agent's stream is open",
                               labels=["source"])
        for source, connected in sorted(self.connected().items()):
            up.add_metric([source], 1.0 if connected else 0.0)
        yield up


class CountersCollector(Collector):
    """Bytes, records and errors of one or more sides, merged per dataset.

    Where both sides of one process count the same thing (bytes and records, in `mirror`)
    the larger figure is the one exported; errors of different components add up.
    """

    def __init__(self, *sources: CounterSource) -> None:
        self.sources = sources

    def collect(self) -> Iterator[Metric]:
        merged: dict[tuple[str, str], _Merged] = {}
        for counters in self.sources:
            for c in counters():
                m = merged.setdefault((c.source, c.dataset), _Merged())
                if c.raw_bytes is not None:
                    m.raw = max(m.raw or 0, c.raw_bytes)
                m.wire = max(m.wire, c.wire_bytes)
                m.records = max(m.records, c.records)
                m.errors.update(c.errors)
        data = CounterMetricFamily("replicator_bytes", "Bytes of changes, before (raw) and "
                                   "after (wire) compression and framing",
                                   labels=["source", "dataset", "stage"])
        records = CounterMetricFamily("replicator_records", "Change records",
                                      labels=["source", "dataset"])
        errors = CounterMetricFamily("replicator_errors", "Errors by kind",
                                     labels=["source", "dataset", "kind"])
        for (source, dataset), m in sorted(merged.items()):
            if m.raw is not None:
                data.add_metric([source, dataset, "raw"], m.raw)
            data.add_metric([source, dataset, "wire"], m.wire)
            records.add_metric([source, dataset], m.records)
            for kind, count in sorted(m.errors.items()):
                errors.add_metric([source, dataset, kind], count)
        yield data
        yield records
        yield errors


@dataclass(slots=True)
class _Merged:
    raw: int | None = None
    wire: int = 0
    records: int = 0
    errors: Counter[str] = field(default_factory=Counter)


class ChangeLatency:
    """replicator_change_latency_seconds: first seen on the primary -> applied on the mirror.

    `registry=None` makes one that counts but is not exported (the agent's, inside
    `mirror`, where the receiver's is the one that counts).
    """

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.histogram = Histogram(
            "replicator_change_latency_seconds",
            "Seconds from when a change was seen on the primary to when it was applied",
            labelnames=["source", "dataset"], buckets=LATENCY_BUCKETS, registry=registry)

    def observer(self, source: str, dataset: str) -> Callable[[float], None]:
        """A thread-safe observe() for one dataset."""
        return self.histogram.labels(source, dataset).observe


def new_registry(*collectors: Collector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    for c in collectors:
        registry.register(c)
    return registry


def metrics_route(registry: CollectorRegistry) -> Route:
    return lambda: (CONTENT_TYPE_LATEST, generate_latest(registry))
