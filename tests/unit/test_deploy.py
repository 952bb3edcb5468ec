"""Every example in deploy/ parses, so operators copy configurations that work."""

import configparser
from pathlib import Path

import pytest

from replicator.config import load_agent, load_receiver

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_agent_example_parses() -> None:
    c = load_agent(DEPLOY / "agent.toml")
    assert c.tls is not None and c.datasets[0].name == "docs"


def test_receiver_example_parses() -> None:
    c = load_receiver(DEPLOY / "receiver.toml")
    assert c.tls is not None and c.tls.client_ca is not None
    assert c.sources == ("app1",)


@pytest.mark.parametrize("unit", ["replicator-agent.service", "replicator-receiver.service"])
def test_systemd_units(unit: str) -> None:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(DEPLOY / unit)
    assert parser["Service"]["Type"] == "notify"
    cmd = parser["Service"]["ExecStart"].split()
    config = Path(cmd[cmd.index("--config") + 1])
    assert (DEPLOY / config.name).exists()
