"""The lag model seen from outside: real daemons, real signals, `replicator status`, /metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from replicator.observe.metrics import METRIC_NAMES
from tests.integration.conftest import Pair
from tests.integration.harness import caught_up, running, status_row, wait_for


def replay_lag(url: str) -> float | None:
    row = status_row(url)
    assert row is not None
    return row["replay_lag_seconds"]


def status_cmd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "replicator", "status", *args],
                          capture_output=True, text=True, timeout=30)


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    names = set()
    for fam in text_string_to_metric_families(text):
        names.add(fam.name)
        for s in fam.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in samples, f"series twice: {key}"
            samples[key] = s.value
    for name in METRIC_NAMES:  # the parser names counter families without _total
        assert name.removesuffix("_total") in names, f"{name} missing from {url}"
    return samples


def test_replay_lag_grows_while_the_receiver_is_stopped_and_returns_to_zero(pair: Pair) -> None:
    with running(pair.receiver, pair.agent):
        (pair.src / "a").write_text("one")
        wait_for(lambda: caught_up(pair.receiver_status), 30, message="the first sync")
        wait_for(lambda: replay_lag(pair.agent_status) == 0, 30, message="agent lag 0")
        os.kill(pair.receiver.pid, signal.SIGSTOP)
        try:
            (pair.src / "b").write_text("two")
            first = wait_for(lambda: replay_lag(pair.agent_status), 30,
                             message="replay lag on the agent while the receiver is stopped")
            # it keeps growing, second by second, as the change stays unapplied; and past
            # 3.5 s, so that the change's latency must land above the 2.5 s bucket below
            wait_for(lambda: (replay_lag(pair.agent_status) or 0) >= max(first + 2.0, 3.5),
                     15, message="the lag to grow by 2 s, past 3.5 s")
            stalled = status_cmd("--url", f"127.0.0.1:{pair.agent_http}", "--max-lag", "1")
            assert stalled.returncode == 1, stalled.stdout + stalled.stderr
            assert "replay lag" in stalled.stdout and "above 1.0s" in stalled.stdout
        finally:
            os.kill(pair.receiver.pid, signal.SIGCONT)
        for url in (pair.agent_status, pair.receiver_status):
            wait_for(lambda u=url: replay_lag(u) == 0, 30, message=f"lag 0 again at {url}")
        assert (pair.dst / "b").read_text() == "two"
        ok = status_cmd("--url", f"127.0.0.1:{pair.agent_http}", "--max-lag", "1")
        assert ok.returncode == 0, ok.stdout + ok.stderr
        # the change latency covers the stall: one change took over two seconds
        samples = scrape(f"http://127.0.0.1:{pair.receiver_http}/metrics")
        docs = (("dataset", "docs"), ("source", "app1"))
        assert samples[("replicator_change_latency_seconds_count", docs)] >= 2
        over = samples[("replicator_change_latency_seconds_count", docs)] - samples[
            ("replicator_change_latency_seconds_bucket", (docs[0], ("le", "2.5"), docs[1]))]
        assert over >= 1, "the stalled change is in a bucket above 2.5 s"


def test_killed_agent_shows_disconnected_and_status_says_so(pair: Pair) -> None:
    receiver_url = f"http://127.0.0.1:{pair.receiver_http}"
    with running(pair.receiver, pair.agent):
        (pair.src / "a").write_text("one")
        wait_for(lambda: caught_up(pair.receiver_status), 30, message="the first sync")
        ok = status_cmd("--url", receiver_url, "--max-lag", "10")
        assert ok.returncode == 0, ok.stdout + ok.stderr
        header, row = ok.stdout.splitlines()[1:3]
        assert header.split()[:3] == ["SOURCE", "DATASET", "STATE"]
        assert row.split()[:4] == ["app1", "docs", "streaming", "1"]
        for url in (receiver_url, f"http://127.0.0.1:{pair.agent_http}"):
            samples = scrape(f"{url}/metrics")
            assert samples[("replicator_connected", (("source", "app1"),))] == 1
            assert samples[("replicator_applied_lsn",
                            (("dataset", "docs"), ("source", "app1")))] == 1

        pair.agent.kill(signal.SIGKILL)
        started = time.monotonic()
        row_after: dict[str, Any] = wait_for(
            lambda: (r := status_row(pair.receiver_status)) and r["state"] == "disconnected"
            and r, 10, message="the receiver to see the agent gone")
        assert time.monotonic() - started < 10
        assert row_after["replay_lag_seconds"] is None
        assert row_after["last_contact_at"] is not None
        samples = scrape(f"{receiver_url}/metrics")
        assert samples[("replicator_connected", (("source", "app1"),))] == 0
        assert ("replicator_replay_lag_seconds",
                (("dataset", "docs"), ("source", "app1"))) not in samples

        bad = status_cmd("--url", receiver_url, "--json")
        assert bad.returncode == 1
        assert json.loads(bad.stdout)["datasets"][0]["state"] == "disconnected"
        pair.receiver.kill(signal.SIGKILL)
    gone = status_cmd("--url", receiver_url)
    assert gone.returncode == 2 and gone.stdout == ""
    assert len(gone.stderr.strip().splitlines()) == 1 and "cannot reach" in gone.stderr
