"""Retained MQTT status messages, through aiomqtt (CONTRACT.md, "MQTT").

Topics, under `[mqtt] topic_prefix`:
- `<prefix>/<source>/<dataset>/status`: the dataset's status object (JSON), retained,
  published when its state changes and at least every PUBLISH_INTERVAL seconds;
- `<prefix>/<role>/<name>/online`: `online`, retained, with a last will of `offline`
  (and `offline` published on a clean stop). `role` is `agent` or `receiver`; `name` is
  the agent's source_id, and for the receiver `[mqtt] name` or else the host name.

All QoS 1. The publisher is its own task that reads the status rows when it is about to
publish: nothing is queued for a broker that is away, so a broker that is down or slow
costs replication nothing, and what it receives after a reconnect is the current state.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import re
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import TYPE_CHECKING

from replicator.config import MqttConfig
from replicator.lag import DatasetStatus

if TYPE_CHECKING:
    import aiomqtt  # imported where a publisher runs: a daemon without [mqtt] never needs it

log = logging.getLogger(__name__)

PUBLISH_INTERVAL = 5.0    # seconds: the contract's "at least every 5 seconds"
CHECK_INTERVAL = 0.5      # seconds between looks for a state change
PUBLISH_TIMEOUT = 5.0     # seconds a publish may wait for the broker's PUBACK
CONNECT_TIMEOUT = 5.0
KEEPALIVE = 15            # seconds: a broker that vanished silently is noticed in ~1.5x this
BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 30.0


def default_name() -> str:
    """The host name, reduced to what a topic level and a name may hold."""
    return re.sub(r"[^a-zA-Z0-9_.-]", "_", socket.gethostname()) or "receiver"


class MqttPublisher:
    def __init__(self, config: MqttConfig, role: str, name: str,
                 rows: Callable[[], Iterable[DatasetStatus]]) -> None:
        self.config = config
        self.role = role
        self.name = name
        self.rows = rows
        self.online_topic = f"{config.topic_prefix}/{role}/{name}/online"
        self.connected = False
        self._last_error: str | None = None

    def status_topic(self, row: DatasetStatus) -> str:
        return f"{self.config.topic_prefix}/{row.source}/{row.dataset}/status"

    def _client(self) -> aiomqtt.Client:
        import aiomqtt

        c = self.config
        return aiomqtt.Client(
            c.host, c.port, username=c.username, password=c.password,
            identifier=f"replicator-{self.role}-{self.name}", keepalive=KEEPALIVE,
            timeout=CONNECT_TIMEOUT,
            will=aiomqtt.Will(self.online_topic, b"offline", qos=1, retain=True),
            tls_context=ssl.create_default_context() if c.secure else None)

    async def run(self) -> None:
        """Connects, publishes and reconnects with capped backoff, until cancelled."""
        import aiomqtt

        backoff = BACKOFF_INITIAL
        while True:
            try:
                async with self._client() as client:
                    await client.publish(self.online_topic, b"online", qos=1, retain=True,
                                         timeout=PUBLISH_TIMEOUT)
                    self.connected = True
                    log.info("mqtt %s broker=%s:%d topic=%s",
                             "recovered" if self._last_error else "connected",
                             self.config.host, self.config.port, self.online_topic)
                    self._last_error = None
                    backoff = BACKOFF_INITIAL
                    try:
                        await self._publish_loop(client)
                    except asyncio.CancelledError:
                        with contextlib.suppress(Exception):  # the will says it otherwise
                            await client.publish(self.online_topic, b"offline", qos=1,
                                                 retain=True, timeout=1.0)
                        raise
            except (aiomqtt.MqttError, OSError, TimeoutError) as e:
                self._lost(f"{type(e).__name__}: {e}")
            finally:
                self.connected = False
            await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
            backoff = min(backoff * 2, BACKOFF_MAX)

    def _lost(self, error: str) -> None:
        if error != self._last_error:  # a broker that stays away is logged once
            log.warning("mqtt broker unavailable broker=%s:%d error=%s", self.config.host,
                        self.config.port, error)
        self._last_error = error

    async def _publish_loop(self, client: aiomqtt.Client) -> None:
        published: dict[str, tuple[str, float]] = {}   # topic -> (state, when)
        while True:
            now = time.monotonic()
            for row in list(self.rows()):
                topic = self.status_topic(row)
                last = published.get(topic)
                if last is None or last[0] != row.state or now - last[1] >= PUBLISH_INTERVAL:
                    await client.publish(topic, json.dumps(row.to_json()).encode(), qos=1,
                                         retain=True, timeout=PUBLISH_TIMEOUT)
                    published[topic] = (row.state, now)
            await asyncio.sleep(CHECK_INTERVAL)


@contextlib.asynccontextmanager
async def publishing(config: MqttConfig | None, role: str, name: str | None,
                     rows: Callable[[], Iterable[DatasetStatus]],
                     ) -> AsyncIterator[MqttPublisher | None]:
    """Runs a publisher for the duration of the block (nothing when MQTT is not configured).

    `name` None: the receiver's `[mqtt] name`, else the host name.
    """
    if config is None:
        yield None
        return
    publisher = MqttPublisher(config, role, name or config.name or default_name(), rows)
    task = asyncio.create_task(publisher.run(), name="mqtt")
    try:
        yield publisher
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
