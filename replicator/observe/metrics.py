"""Prometheus exposition of the agent's counters, through prometheus-client.

A custom collector reads the live counters at scrape time, so nothing is updated on the
hot path. This is the first part of the contract's metrics; the lag gauges, the
change-latency histogram and the receiver's side follow with the observability work.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from replicator.observe.http import Route

if TYPE_CHECKING:
    from replicator.agent.agent import Agent


class AgentCollector(Collector):
    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        agent = self.agent
        data = CounterMetricFamily("replicator_bytes", "Bytes shipped, before (raw) and "
                                   "after (wire) compression and framing",
                                   labels=["source", "dataset", "stage"])
        records = CounterMetricFamily("replicator_records", "Change records shipped",
                                      labels=["source", "dataset"])
        for source in agent.sources:
            labels = [agent.source_id, source.name]
            data.add_metric([*labels, "raw"], source.raw_bytes_sent)
            data.add_metric([*labels, "wire"], agent.link.dataset_bytes[source.dataset])
            records.add_metric(labels, source.records_sent)
        yield data
        yield records


def agent_metrics_route(agent: Agent) -> Route:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(agent))
    return lambda: (CONTENT_TYPE_LATEST, generate_latest(registry))
