"""Every example in deploy/ parses, so operators copy configurations that work."""

import configparser
import json
import re
from pathlib import Path

import pytest
import yaml

from replicator.config import load_agent, load_receiver
from replicator.observe.metrics import METRIC_NAMES

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


def _metrics_in(exprs: list[str]) -> set[str]:
    return {m for e in exprs for m in re.findall(r"\breplicator_[a-z_]+", e)}


def _exported(name: str) -> bool:
    """A name the daemons export: a contract metric or a histogram's series."""
    if name in METRIC_NAMES:
        return True
    base, _, suffix = name.rpartition("_")
    return suffix in ("bucket", "sum", "count") and base == "replicator_change_latency_seconds"


def test_grafana_dashboard_uses_only_exported_metrics() -> None:
    dash = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    used = _metrics_in(exprs)
    assert used and all(_exported(m) for m in used), sorted(m for m in used if not _exported(m))
    # the operator's three questions: how far behind, is it connected, what goes wrong
    assert {"replicator_replay_lag_seconds", "replicator_connected",
            "replicator_errors_total"} <= used
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_alert_rules_use_only_exported_metrics() -> None:
    rules = yaml.safe_load((DEPLOY / "alerts.yml").read_text())
    alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"]}
    assert {"ReplicatorReplayLagHigh", "ReplicatorAgentDisconnected",
            "ReplicatorErrorsRising"} <= set(alerts)
    used = _metrics_in([r["expr"] for r in alerts.values()])
    assert all(_exported(m) for m in used), sorted(m for m in used if not _exported(m))
    for r in alerts.values():
        assert r["labels"]["severity"] in ("warning", "critical")
        assert r["annotations"]["summary"]
