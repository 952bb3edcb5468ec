"""MQTT against a real mosquitto: retained status, online and its last will, reconnects,
and a broker that is away costs replication nothing."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from tests.integration.conftest import Pair, make_pair
from tests.integration.harness import caught_up, free_port, running, wait_for

MOSQUITTO = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin")
pytestmark = pytest.mark.skipif(MOSQUITTO is None,
                                reason="needs the mosquitto broker (apt-get install mosquitto)")

class Broker:
    def __init__(self, tmp: Path, port: int) -> None:
        self.port = port
        self.conf = tmp / "mosquitto.conf"
        self.conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n"
                             "persistence false\n")
        self.log = tmp / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Broker:
        assert MOSQUITTO is not None
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=log,
                                         stderr=log)
        wait_for(self._accepts, 10, message="mosquitto to listen")
        return self

    def _accepts(self) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

class Subscriber:
    """Everything published under `topic`, the last payload per topic and all arrivals."""

    def __init__(self, port: int, topic: str = "replicator/#") -> None:
        self.last: dict[str, bytes] = {}
        self.count: dict[str, int] = {}
        self._lock = threading.Lock()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2)
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self.client.on_message = self._message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _message(self, client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.last[msg.topic] = msg.payload
            self.count[msg.topic] = self.count.get(msg.topic, 0) + 1

    def get(self, topic: str) -> bytes | None:
        with self._lock:
            return self.last.get(topic)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()

@pytest.fixture
def mqtt_pair(tmp_path: Path) -> Iterator[tuple[Pair, Broker]]:
    broker = Broker(tmp_path, free_port())
    p = make_pair(tmp_path)
    mqtt = f'\n[mqtt]\nurl = "mqtt://127.0.0.1:{broker.port}"\n'
    for daemon, name in ((p.receiver, 'name = "dr1"\n'), (p.agent, "")):
        config = Path(daemon.args[daemon.args.index("--config") + 1])
        text = config.read_text()
        if daemon is p.agent:  # the [mqtt] table must come before [[datasets]]
            head, sep, tail = text.partition("\n[[datasets]]")
            config.write_text(head + mqtt + "\n" + sep.lstrip("\n") + tail)
        else:
            config.write_text(text + mqtt + name)
    yield p, broker
    for d in (p.agent, p.receiver):
        d.kill()
    broker.stop()

def status(sub: Subscriber) -> dict[str, object] | None:
    raw = sub.get("replicator/app1/docs/status")
    return json.loads(raw) if raw else None

def test_mqtt_status_online_will_and_reconnects(mqtt_pair: tuple[Pair, Broker]) -> None:
    pair, broker = mqtt_pair
    with running(pair.receiver, pair.agent):
        # no broker yet: replication goes on regardless
        (pair.src / "a").write_text("one")
        wait_for(lambda: caught_up(pair.receiver_status), 30, message="sync without a broker")
        wait_for(lambda: "mqtt broker unavailable" in pair.receiver.log(), 10,
                 message="the receiver to say the broker is away")

        broker.start()
        sub = Subscriber(broker.port)
        try:
            wait_for(lambda: sub.get("replicator/receiver/dr1/online") == b"online", 40,
                     message="the receiver online after the broker came up")
            wait_for(lambda: sub.get("replicator/agent/app1/online") == b"online", 40,
                     message="the agent online")
            row = wait_for(lambda: (s := status(sub)) and s["state"] == "streaming" and s, 20,
                           message="a streaming status message")
            assert row["source"] == "app1" and row["dataset"] == "docs"
            assert row["applied_lsn"] >= 1 and "replay_lag_seconds" in row
            # republished at least every 5 seconds, even with nothing changing
            seen = sub.count["replicator/app1/docs/status"]
            wait_for(lambda: sub.count["replicator/app1/docs/status"] >= seen + 1, 8,
                     message="periodic status messages")

            pair.agent.kill()  # SIGKILL: only the last will can say it
            wait_for(lambda: sub.get("replicator/agent/app1/online") == b"offline", 20,
                     message="the agent's last will")
            wait_for(lambda: (s := status(sub)) and s["state"] == "disconnected", 20,
                     message="the receiver's status of the dataset as disconnected")
        finally:
            sub.close()

        # the broker goes away and comes back empty (no persistence): the receiver returns
        broker.stop()
        broker.start()
        sub = Subscriber(broker.port)
        try:
            wait_for(lambda: sub.get("replicator/receiver/dr1/online") == b"online", 40,
                     message="the receiver to reconnect to the restarted broker")
            wait_for(lambda: status(sub) is not None, 20, message="status after reconnecting")
        finally:
            sub.close()
        # a clean stop says offline itself
        sub = Subscriber(broker.port)
        try:
            wait_for(lambda: sub.get("replicator/receiver/dr1/online") == b"online", 10,
                     message="the retained online")
            assert pair.receiver.stop() == 0
            wait_for(lambda: sub.get("replicator/receiver/dr1/online") == b"offline", 10,
                     message="offline on a clean stop")
        finally:
            sub.close()

def test_a_silent_broker_does_not_slow_replication(tmp_path: Path) -> None:
    """A port that accepts and never answers (no CONNACK) must not hold anything up."""
    with socket.socket() as black_hole:
        black_hole.bind(("127.0.0.1", 0))
        black_hole.listen(16)
        port = black_hole.getsockname()[1]
        p = make_pair(tmp_path)
        config = Path(p.receiver.args[p.receiver.args.index("--config") + 1])
        config.write_text(config.read_text() + f'\n[mqtt]\nurl = "mqtt://127.0.0.1:{port}"\n')
        try:
            with running(p.receiver, p.agent):
                for i in range(20):
                    (p.src / f"f{i}").write_text(str(i))
                wait_for(lambda: caught_up(p.receiver_status), 30,
                         message="sync with a silent broker")
                assert (p.dst / "f19").read_text() == "19"
        finally:
            for d in (p.agent, p.receiver):
                d.kill()
