"""The agent's `compression` setting, seen in the bytes on the wire: lz4 when asked for,
raw data over loopback by default (where compressing costs more than it saves)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.conftest import make_pair
from tests.integration.harness import caught_up, running, wait_converged, wait_for
from tests.integration.test_observe import scrape

TEXT = b"all work and no play makes a dull boy\n" * 30_000


@pytest.mark.parametrize("setting, compressed", [
    ('compression = "lz4"\n', True),
    ('compression = "none"\n', False),
    ("", False),                       # "auto", and the receiver is on loopback
])
def test_compression_setting_decides_what_travels(tmp_path: Path, setting: str,
                                                   compressed: bool) -> None:
    pair = make_pair(tmp_path, agent_extra=setting)
    (pair.src / "text").write_bytes(TEXT)
    with running(pair.receiver, pair.agent):
        wait_converged(pair.src, pair.dst)
        wait_for(lambda: caught_up(pair.receiver_status), 30, message="caught up")
        labels = (("dataset", "docs"), ("source", "app1"))
        agent = scrape(f"http://127.0.0.1:{pair.agent_http}/metrics")
        receiver = scrape(f"http://127.0.0.1:{pair.receiver_http}/metrics")
        raw = agent[("replicator_bytes_total", (*labels, ("stage", "raw")))]
        sent = agent[("replicator_bytes_total", (*labels, ("stage", "wire")))]
        received = receiver[("replicator_bytes_total", (*labels, ("stage", "wire")))]
    assert raw == len(TEXT)
    assert abs(sent - received) < 1024, "both ends count the same frames"
    if compressed:
        assert 0 < sent < raw / 10
    else:
        assert raw < sent < raw * 1.01
    assert (pair.dst / "text").read_bytes() == TEXT
