"""The exposition: every contract metric, labels as the contract says, merged sides."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from replicator.lag import DatasetStatus
from replicator.observe.metrics import (
    METRIC_NAMES,
    ChangeLatency,
    CountersCollector,
    DatasetCounters,
    StatusCollector,
    new_registry,
)


def scrape(*collectors: object, latency: bool = True) -> dict[tuple[str, tuple[tuple[str, str],
                                                                         ...]], float]:
    registry = new_registry(*collectors)  # type: ignore[arg-type]
    if latency:
        ChangeLatency(registry).observer("app1", "docs")(0.02)
    samples = {}
    text = generate_latest(registry).decode()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in samples, f"duplicate series {key}"
            samples[key] = s.value
    return samples


ROWS = [
    DatasetStatus("app1", "docs", "directory", "streaming", applied_lsn=40, written_lsn=42,
                  write_lag_seconds=0.0, flush_lag_seconds=0.5, replay_lag_seconds=1.5,
                  pending_bytes=65536, pending_changes=2),
    DatasetStatus("app2", "db", "directory", "disconnected", applied_lsn=7),
]


def test_every_contract_metric_is_exported() -> None:
    samples = scrape(StatusCollector(lambda: ROWS, lambda: {"app1": True, "app2": False}),
                     CountersCollector(lambda: [DatasetCounters("app1", "docs", 900, 3, 1000,
                                                                {"read": 2})]))
    names = {n for n, _ in samples}
    for name in METRIC_NAMES:
        base = name.removesuffix("_total")
        assert any(n == name or n.startswith(base + "_") for n in names), name
    docs = (("dataset", "docs"), ("source", "app1"))
    assert samples[("replicator_replay_lag_seconds", docs)] == 1.5
    assert samples[("replicator_flush_lag_seconds", docs)] == 0.5
    assert samples[("replicator_pending_bytes", docs)] == 65536
    assert samples[("replicator_applied_lsn", (("dataset", "db"), ("source", "app2")))] == 7
    assert samples[("replicator_connected", (("source", "app2"),))] == 0
    assert samples[("replicator_connected", (("source", "app1"),))] == 1
    assert samples[("replicator_bytes_total", (*docs, ("stage", "raw")))] == 1000
    assert samples[("replicator_bytes_total", (*docs, ("stage", "wire")))] == 900
    assert samples[("replicator_errors_total", (*docs[:1], ("kind", "read"), docs[1]))] == 2
    assert samples[("replicator_change_latency_seconds_count", docs)] == 1
    assert samples[("replicator_change_latency_seconds_bucket", (*docs[:1], ("le", "0.025"),
                                                                 docs[1]))] == 1


def test_unknown_lag_has_no_sample() -> None:
    samples = scrape(StatusCollector(lambda: ROWS, dict), latency=False)
    db = (("dataset", "db"), ("source", "app2"))
    assert ("replicator_replay_lag_seconds", db) not in samples
    assert ("replicator_applied_lsn", db) in samples


def test_two_sides_merge_into_one_series() -> None:
    agent = [DatasetCounters("local", "m", wire_bytes=500, records=10, raw_bytes=4000,
                             errors={"read": 1})]
    receiver = [DatasetCounters("local", "m", wire_bytes=480, records=9,
                                errors={"digest_mismatch": 2, "read": 1})]
    samples = scrape(CountersCollector(lambda: agent, lambda: receiver), latency=False)
    m = (("dataset", "m"), ("source", "local"))
    assert samples[("replicator_bytes_total", (*m, ("stage", "wire")))] == 500
    assert samples[("replicator_bytes_total", (*m, ("stage", "raw")))] == 4000
    assert samples[("replicator_records_total", m)] == 10
    assert samples[("replicator_errors_total", (m[0], ("kind", "read"), m[1]))] == 2
    assert samples[("replicator_errors_total", (m[0], ("kind", "digest_mismatch"), m[1]))] == 2


def test_unregistered_latency_counts_but_is_not_exported() -> None:
    latency = ChangeLatency(None)
    latency.observer("a", "b")(1.0)
    assert "change_latency" not in generate_latest(new_registry()).decode()
