import subprocess
import sys

from replicator import __version__


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "replicator", *args],
                          capture_output=True, text=True, timeout=60)


def test_version() -> None:
    r = run("--version")
    assert r.returncode == 0
    assert r.stdout.strip() == f"replicator {__version__}"


def test_unknown_command_is_a_usage_error() -> None:
    r = run("frobnicate")
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1


def test_status_and_help_load_no_daemon_code() -> None:
    """`replicator status` runs from scripts and monitoring, often: it must not pay for
    importing gRPC, protobuf, asyncio and both daemons (a quarter of a second)."""
    assert _loaded_by("pass", "grpc", "google.protobuf", "asyncio", "replicator.agent.agent",
                      "replicator.receiver.receiver") == ""


def test_daemons_without_mqtt_or_status_load_neither() -> None:
    """Every command builds every parser, and a daemon starts its gRPC side only once its
    imports are done: the MQTT client (for [mqtt]) and urllib (for `replicator status`)
    are imported where they are used, not by the modules that hold them."""
    assert _loaded_by("import replicator.observe.mqtt, replicator.cli.status",
                      "aiomqtt", "paho.mqtt.client", "urllib.request") == ""


def _loaded_by(imports: str, *modules: str) -> str:
    """Which of `modules` a fresh interpreter has loaded once every parser is built and
    `imports` ran, space-separated."""
    code = ("import sys; from replicator.cli import build_parser; build_parser(); "
            f"{imports}; print(' '.join(m for m in {modules!r} if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()
