from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from benchmarks import datagen
from benchmarks.rsyncd import RSYNC, RsyncDaemon, parse_stats
from benchmarks.util import files_equal, port_open, trees_equal

pytestmark = pytest.mark.skipif(shutil.which(RSYNC) is None, reason="rsync not installed")

STATS = """
Number of files: 3 (reg: 2, dir: 1)
Total file size: 1,048,576 bytes
Literal data: 1,048,576 bytes
Total bytes sent: 1,049,123
Total bytes received: 87
"""


@pytest.mark.parametrize("text,expected", [
    (STATS, (1049123, 87)),
    ("Total bytes sent: 12\nTotal bytes received: 34\n", (12, 34)),
    ("Total bytes sent: 1.234.567\nTotal bytes received: 0\n", (1234567, 0)),
])
def test_parse_stats(text: str, expected: tuple[int, int]) -> None:
    assert parse_stats(text) == expected


@pytest.mark.parametrize("text", ["", "Total bytes sent: 12\n", "sent 12 bytes"])
def test_parse_stats_refuses_incomplete_output(text: str) -> None:
    with pytest.raises(ValueError):
        parse_stats(text)


def test_daemon_syncs_a_tree_and_then_only_the_delta(tmp_path: Path) -> None:
    src = tmp_path / "src"
    datagen.make_small_tree(src / "tree", count=30, dirs=3, size=4096, seed=1)
    datagen.make_big_file(src / "big.bin", 8 << 20, seed=1)
    # rsync's quick check compares whole seconds: make the change below land in a later one
    old = time.time() - 10
    os.utime(src / "big.bin", (old, old))
    with RsyncDaemon(tmp_path / "module", tmp_path / "conf") as d:
        assert port_open(d.port)
        first = d.sync(src, "dst")
        assert trees_equal(src, tmp_path / "module" / "dst")
        assert first.wire_bytes > 8 << 20
        assert first.seconds > 0

        datagen.scatter_writes(src / "big.bin", 0.01, seed=2)
        second = d.sync(src, "dst")
        assert files_equal(src / "big.bin", tmp_path / "module" / "dst" / "big.bin")
        # the delta algorithm is on: far less than the file crosses
        assert second.wire_bytes < (8 << 20) // 4
        port = d.port
    assert not port_open(port)
