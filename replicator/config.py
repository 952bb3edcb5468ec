"""Configuration files (TOML) parsed into frozen dataclasses.

This module is schema only: it reads and validates, and builds nothing that runs. Every
error names the file, the key and what is wrong, so that a bad configuration stops a
daemon before it starts (exit code 2).
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from replicator.errors import ConfigError

NAME_RE = re.compile(r"^[a-zA-Z0-9_.-]+$")
DEFAULT_BLOCK_SIZE = 64 * 1024
MIN_BLOCK_SIZE = 4 * 1024
MAX_BLOCK_SIZE = 1024 * 1024
DEFAULT_RECEIVER_HTTP = "127.0.0.1:9465"
DEFAULT_MQTT_PREFIX = "replicator"
DATASET_TYPES = ("directory", "sqlite")
# "auto": lz4 unless the receiver is on this host, where moving bytes costs less CPU than
# compressing them (and the receiver needs the same CPUs); "lz4": always; "none": never
COMPRESSION_MODES = ("auto", "lz4", "none")

_SIZE_RE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|K|M|G|KB|MB|GB)?\s*$")
_UNITS = {
    None: 1, "B": 1, "K": 1024, "KiB": 1024, "KB": 1000, "M": 1 << 20, "MiB": 1 << 20,
    "MB": 1000**2, "G": 1 << 30, "GiB": 1 << 30, "GB": 1000**3,
}


@dataclass(frozen=True)
class TlsConfig:
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    client_ca: Path | None = None


@dataclass(frozen=True)
class MqttConfig:
    url: str
    topic_prefix: str = DEFAULT_MQTT_PREFIX
    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    name: str | None = None    # the receiver's name in its online topic (default: hostname)
    secure: bool = False       # mqtts://: TLS, verified against the system's CAs


@dataclass(frozen=True)
class DatasetConfig:
    name: str
    type: str
    path: Path
    exclude: tuple[str, ...] = ()


@dataclass(frozen=True)
class AgentConfig:
    source_id: str
    receiver: str
    state_dir: Path
    datasets: tuple[DatasetConfig, ...]
    http: str | None = None
    block_size: int = DEFAULT_BLOCK_SIZE
    tls: TlsConfig | None = None
    allow_insecure: bool = False
    mqtt: MqttConfig | None = None
    rescan_interval: float = 300.0
    compression: str = "auto"
    path: Path | None = None

    def compress(self) -> bool:
        """Whether data blocks are lz4-compressed, `compression` resolved for `receiver`."""
        return compress_for(self.compression, self.receiver)


def compress_for(mode: str, receiver: str) -> bool:
    """Resolves a `compression` mode for the receiver address `receiver` (host:port)."""
    if mode == "auto":
        return not is_loopback(parse_hostport(receiver)[0])
    return mode == "lz4"


@dataclass(frozen=True)
class ReceiverConfig:
    listen: str
    state_dir: Path
    mirror_root: Path
    http: str | None = None
    tls: TlsConfig | None = None
    sources: tuple[str, ...] | None = None
    mqtt: MqttConfig | None = None
    allow_insecure: bool = False
    path: Path | None = None


class _Reader:
    """Reads typed keys from one table and names file and key in every error."""

    def __init__(self, file: str, table: dict[str, Any], prefix: str = "") -> None:
        self.file = file
        self.table = table
        self.prefix = prefix
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def fail(self, name: str, what: str) -> ConfigError:
        return ConfigError(f"{self.file}: {self.key(name)}: {what}")

    def get(self, name: str, kind: type | tuple[type, ...], *, required: bool = False,
            default: Any = None) -> Any:
        self.used.add(name)
        if name not in self.table:
            if required:
                raise self.fail(name, "is required")
            return default
        value = self.table[name]
        if isinstance(value, bool) and kind is not bool and bool not in _as_tuple(kind):
            raise self.fail(name, f"must be {_kind_name(kind)}, not {value!r}")
        if not isinstance(value, kind):
            raise self.fail(name, f"must be {_kind_name(kind)}, not {value!r}")
        return value

    def name(self, name: str, *, required: bool = True) -> str:
        value = self.get(name, str, required=required)
        if value is not None and not NAME_RE.match(value):
            raise self.fail(name, f"{value!r} must match [a-zA-Z0-9_.-]+")
        return value

    def path(self, name: str, *, required: bool = True) -> Path | None:
        value = self.get(name, str, required=required)
        if value is None:
            return None
        if not value:
            raise self.fail(name, "must not be empty")
        return Path(value).expanduser()

    def address(self, name: str, *, required: bool = True) -> str | None:
        value = self.get(name, str, required=required)
        if value is None:
            return None
        try:
            parse_hostport(value)
        except ValueError as e:
            raise self.fail(name, str(e)) from None
        return value

    def check_unknown(self) -> None:
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            raise self.fail(unknown[0], "unknown key")


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", bool: "true or false", list: "a list",
             dict: "a table", float: "a number"}
    return " or ".join(names.get(k, k.__name__) for k in _as_tuple(kind))


def parse_size(text: str | int) -> int:
    """'64KiB' -> 65536. Plain integers are bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ValueError(f"{text!r} is not a size such as '64KiB'")
    return int(m.group(1)) * _UNITS[m.group(2)]


def parse_hostport(text: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r} must be HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r} has no valid port")
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _load(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def _tls(file: str, data: dict[str, Any], *, receiver: bool) -> TlsConfig | None:
    if "tls" not in data:
        return None
    table = data["tls"]
    if not isinstance(table, dict):
        raise ConfigError(f"{file}: tls: must be a table")
    r = _Reader(file, table, "tls.")
    tls = TlsConfig(
        ca=r.path("ca", required=False),
        cert=r.path("cert", required=not receiver or "key" in table),
        key=r.path("key", required=not receiver or "cert" in table),
        client_ca=r.path("client_ca", required=False) if receiver else None,
    )
    if receiver and (tls.cert is None or tls.key is None):
        raise ConfigError(f"{file}: tls: a receiver needs cert and key")
    r.check_unknown()
    return tls


def _mqtt(file: str, data: dict[str, Any]) -> MqttConfig | None:
    if "mqtt" not in data:
        return None
    table = data["mqtt"]
    if not isinstance(table, dict):
        raise ConfigError(f"{file}: mqtt: must be a table")
    r = _Reader(file, table, "mqtt.")
    url = r.get("url", str, required=True)
    prefix = r.get("topic_prefix", str, default=DEFAULT_MQTT_PREFIX)
    if not prefix or "#" in prefix or "+" in prefix:
        raise r.fail("topic_prefix", f"{prefix!r} must be a topic without wildcards")
    m = re.match(r"^mqtts?://(?:([^:@/]+)(?::([^@/]*))?@)?([^:/]+|\[[^\]]+\])(?::(\d+))?/?$",
                 url)
    if not m:
        raise r.fail("url", f"{url!r} must look like mqtt://host:1883")
    if m.group(4) and not 0 < int(m.group(4)) <= 65535:
        raise r.fail("url", f"{url!r} has no valid port")
    name = r.name("name", required=False)
    r.check_unknown()
    return MqttConfig(url=url, topic_prefix=prefix.rstrip("/"), host=m.group(3).strip("[]"),
                      port=int(m.group(4) or 1883), username=m.group(1), password=m.group(2),
                      name=name, secure=url.startswith("mqtts:"))


def _datasets(file: str, data: dict[str, Any]) -> tuple[DatasetConfig, ...]:
    raw = data.get("datasets")
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{file}: datasets: at least one [[datasets]] table is required")
    out: list[DatasetConfig] = []
    seen: set[str] = set()
    for i, table in enumerate(raw):
        if not isinstance(table, dict):
            raise ConfigError(f"{file}: datasets[{i}]: must be a table")
        r = _Reader(file, table, f"datasets[{i}].")
        name = r.name("name")
        if name in seen:
            raise r.fail("name", f"{name!r} is used twice")
        seen.add(name)
        kind = r.get("type", str, required=True)
        if kind not in DATASET_TYPES:
            raise r.fail("type", f"{kind!r} must be one of {', '.join(DATASET_TYPES)}")
        path = r.path("path")
        assert path is not None
        if not path.is_absolute():
            raise r.fail("path", f"{str(path)!r} must be an absolute path")
        exclude = r.get("exclude", list, default=[])
        if not all(isinstance(p, str) and p for p in exclude):
            raise r.fail("exclude", "must be a list of non-empty glob strings")
        r.check_unknown()
        out.append(DatasetConfig(name=name, type=kind, path=path, exclude=tuple(exclude)))
    return tuple(out)


def load_agent(path: Path | str) -> AgentConfig:
    path = Path(path)
    data = _load(path)
    file = str(path)
    r = _Reader(file, data)
    source_id = r.name("source_id")
    receiver = r.address("receiver")
    assert receiver is not None
    state_dir = r.path("state_dir")
    assert state_dir is not None
    http = r.address("http", required=False)
    try:
        block_size = parse_size(r.get("block_size", (str, int), default=DEFAULT_BLOCK_SIZE))
    except ValueError as e:
        raise r.fail("block_size", str(e)) from None
    if not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE or block_size & (block_size - 1):
        raise r.fail("block_size", f"{block_size} must be a power of two from 4KiB to 1MiB")
    allow_insecure = r.get("allow_insecure", bool, default=False)
    rescan = r.get("rescan_interval", (int, float), default=300.0)
    if rescan <= 0:
        raise r.fail("rescan_interval", f"{rescan!r} must be positive seconds")
    compression = r.get("compression", str, default="auto")
    if compression not in COMPRESSION_MODES:
        raise r.fail("compression", f"{compression!r} must be one of "
                     f"{', '.join(COMPRESSION_MODES)}")
    r.used.update({"tls", "mqtt", "datasets"})
    tls = _tls(file, data, receiver=False)
    if tls is None and not allow_insecure and not is_loopback(parse_hostport(receiver)[0]):
        raise r.fail("receiver", f"{receiver!r} is not loopback: configure [tls] or set "
                     "allow_insecure = true")
    config = AgentConfig(
        source_id=source_id, receiver=receiver, state_dir=state_dir, datasets=_datasets(file, data),
        http=http, block_size=block_size, tls=tls, allow_insecure=allow_insecure,
        mqtt=_mqtt(file, data), rescan_interval=float(rescan), compression=compression,
        path=path,
    )
    r.check_unknown()
    return config


def load_receiver(path: Path | str) -> ReceiverConfig:
    path = Path(path)
    data = _load(path)
    file = str(path)
    r = _Reader(file, data)
    listen = r.address("listen")
    assert listen is not None
    state_dir = r.path("state_dir")
    mirror_root = r.path("mirror_root")
    assert state_dir is not None and mirror_root is not None
    http = r.address("http", required=False)
    allow_insecure = r.get("allow_insecure", bool, default=False)
    r.used.update({"tls", "mqtt", "sources"})
    tls = _tls(file, data, receiver=True)
    if tls is None and not allow_insecure and not is_loopback(parse_hostport(listen)[0]):
        raise r.fail("listen", f"{listen!r} is not loopback: configure [tls] or set "
                     "allow_insecure = true")
    sources: tuple[str, ...] | None = None
    if "sources" in data:
        raw = data["sources"]
        if not isinstance(raw, list):
            raise ConfigError(f"{file}: sources: must be a list of [[sources]] tables")
        ids = []
        for i, table in enumerate(raw):
            if not isinstance(table, dict):
                raise ConfigError(f"{file}: sources[{i}]: must be a table")
            sr = _Reader(file, table, f"sources[{i}].")
            ids.append(sr.name("id"))
            sr.check_unknown()
        sources = tuple(ids)
    config = ReceiverConfig(
        listen=listen, state_dir=state_dir, mirror_root=mirror_root, http=http, tls=tls,
        sources=sources, mqtt=_mqtt(file, data), allow_insecure=allow_insecure, path=path,
    )
    r.check_unknown()
    return config
