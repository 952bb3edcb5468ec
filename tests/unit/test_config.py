from pathlib import Path

import pytest

from replicator.config import load_agent, load_receiver, parse_size
from replicator.errors import ConfigError

AGENT_OK = """
source_id = "app1"
receiver = "127.0.0.1:50051"
state_dir = "/var/lib/replicator/agent"
block_size = "64KiB"

[[datasets]]
name = "docs"
type = "directory"
path = "/srv/docs"
exclude = ["*.swp", "tmp/**"]
"""

RECEIVER_OK = """
listen = "127.0.0.1:50051"
state_dir = "/var/lib/replicator/receiver"
mirror_root = "/srv/mirror"
http = "127.0.0.1:9465"

[[sources]]
id = "app1"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_agent_ok(tmp_path: Path) -> None:
    c = load_agent(write(tmp_path, AGENT_OK))
    assert c.source_id == "app1"
    assert c.block_size == 65536
    assert c.datasets[0].exclude == ("*.swp", "tmp/**")


@pytest.mark.parametrize(("setting", "receiver", "compress"), [
    ("", "127.0.0.1:50051", False),              # auto: loopback, bytes cost less than lz4
    ("", "localhost:50051", False),
    ("", "[::1]:50051", False),
    ("", "dr.example.org:50051", True),          # auto: a real link
    ("", "10.0.0.7:50051", True),
    ('compression = "lz4"', "127.0.0.1:50051", True),
    ('compression = "none"', "dr.example.org:50051", False),
])
def test_agent_compression(tmp_path: Path, setting: str, receiver: str, compress: bool) -> None:
    text = AGENT_OK.replace('receiver = "127.0.0.1:50051"',
                            f'receiver = "{receiver}"\nallow_insecure = true\n{setting}')
    assert load_agent(write(tmp_path, text)).compress() is compress


def test_receiver_ok(tmp_path: Path) -> None:
    c = load_receiver(write(tmp_path, RECEIVER_OK))
    assert c.sources == ("app1",)
    assert c.mirror_root == Path("/srv/mirror")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (('source_id = "app1"', 'source_id = "app 1"'), "source_id"),
        (('source_id = "app1"', ""), "source_id: is required"),
        (('block_size = "64KiB"', 'block_size = "3KiB"'), "block_size"),
        (('block_size = "64KiB"', 'block_size = "lots"'), "block_size"),
        (('receiver = "127.0.0.1:50051"', 'receiver = "dr.example.org:50051"'), "allow_insecure"),
        (('receiver = "127.0.0.1:50051"', 'receiver = "nohost"'), "receiver"),
        (('type = "directory"', 'type = "nfs"'), "datasets[0].type"),
        (('path = "/srv/docs"', 'path = "srv/docs"'), "absolute"),
        (('name = "docs"', 'name = "docs"\ncolour = "red"'), "datasets[0].colour: unknown key"),
        (('block_size = "64KiB"', "block_size = true"), "block_size"),
        (('block_size = "64KiB"', 'compression = "zstd"'), "compression: 'zstd' must be one of"),
        (('block_size = "64KiB"', "compression = true"), "compression"),
        (('state_dir = "/var/lib/replicator/agent"', "state_dir = 5"), "state_dir"),
        (("[[datasets]]", "[[datasets]]\nname = 'docs'\ntype='directory'\npath='/x'\n[[datasets]]"),
         "used twice"),
    ],
)
def test_agent_invalid(tmp_path: Path, change: tuple[str, str], message: str) -> None:
    text = AGENT_OK.replace(*change)
    with pytest.raises(ConfigError) as e:
        load_agent(write(tmp_path, text))
    assert message in str(e.value)
    assert str(tmp_path / "c.toml") in str(e.value)


def test_not_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_receiver(write(tmp_path, "listen = "))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_receiver(tmp_path / "nope.toml")


@pytest.mark.parametrize(("text", "value"), [("64KiB", 65536), ("1MiB", 1 << 20), (4096, 4096),
                                             ("512", 512)])
def test_parse_size(text: str | int, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize(("mqtt", "expect"), [
    ('url = "mqtt://127.0.0.1:1883"', ("127.0.0.1", 1883, "replicator", None, False)),
    ('url = "mqtt://broker"\ntopic_prefix = "site/dr/"', ("broker", 1883, "site/dr", None, False)),
    ('url = "mqtts://u:p@[::1]:8883"\nname = "dr-1"', ("::1", 8883, "replicator", "dr-1", True)),
])
def test_mqtt_ok(tmp_path: Path, mqtt: str, expect: tuple[object, ...]) -> None:
    c = load_receiver(write(tmp_path, f"{RECEIVER_OK}\n[mqtt]\n{mqtt}\n"))
    assert c.mqtt is not None
    assert (c.mqtt.host, c.mqtt.port, c.mqtt.topic_prefix, c.mqtt.name, c.mqtt.secure) == expect


@pytest.mark.parametrize(("mqtt", "message"), [
    ('topic_prefix = "x"', "mqtt.url: is required"),
    ('url = "http://broker"', "mqtt.url: 'http://broker' must look like mqtt://host:1883"),
    ('url = "mqtt://broker:99999"', "mqtt.url: 'mqtt://broker:99999' has no valid port"),
    ('url = "mqtt://b"\ntopic_prefix = "a/#"', "mqtt.topic_prefix"),
    ('url = "mqtt://b"\nname = "a/b"', "mqtt.name"),
    ('url = "mqtt://b"\nqos = 2', "mqtt.qos: unknown key"),
])
def test_mqtt_bad(tmp_path: Path, mqtt: str, message: str) -> None:
    path = write(tmp_path, f"{RECEIVER_OK}\n[mqtt]\n{mqtt}\n")
    with pytest.raises(ConfigError) as e:
        load_receiver(path)
    assert str(path) in e.value.message and message in e.value.message
