"""The HTTP views of one daemon (the dashboard, /status, /metrics) and its metrics registry.

One registry per process. In `mirror` the receiver's side is the one exported (its rows
are the DR site's view, its histogram measures up to the apply), with the agent's counters
merged in, so that no series appears twice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

from replicator.observe.dashboard import dashboard_route
from replicator.observe.http import Route, json_route
from replicator.observe.metrics import (
    ChangeLatency,
    CountersCollector,
    CounterSource,
    StatusCollector,
    metrics_route,
    new_registry,
)

if TYPE_CHECKING:
    from replicator.agent.agent import Agent
    from replicator.receiver.receiver import Receiver


def daemon_routes(status: Callable[[], object], registry: CollectorRegistry) -> dict[str, Route]:
    return {"/": dashboard_route(), "/status": json_route(status),
            "/metrics": metrics_route(registry)}


def agent_registry(agent: Agent) -> CollectorRegistry:
    registry = new_registry(StatusCollector(agent.status_rows, agent.connected),
                            CountersCollector(agent.counters))
    agent.measure_latency(ChangeLatency(registry))
    return registry


def receiver_registry(receiver: Receiver, *also: CounterSource) -> CollectorRegistry:
    """The receiver's metrics, with the counters of `also` (the agent in `mirror`) merged."""
    registry = new_registry(StatusCollector(receiver.status_rows, receiver.connected),
                            CountersCollector(receiver.counters, *also))
    receiver.measure_latency(ChangeLatency(registry))
    return registry
