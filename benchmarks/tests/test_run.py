"""The whole harness end to end, tiny, against the fake mirror."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from benchmarks import run

FAKE = f"{sys.executable} {Path(__file__).with_name('fake_mirror.py')}"


def test_all_benchmarks_side_by_side(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "figures.json"
    code = run.main(["--quick", "--size-mib", "4", "--files", "200", "--latency-writes", "10",
                     "--drop-caches", "no", "--workdir", str(tmp_path),
                     "--replicator", FAKE, "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "page cache kept" in printed
    doc = json.loads(out.read_text())
    assert doc["failures"] == []
    rows = {r["benchmark"]: r for r in doc["rows"]}
    assert len(rows) == 15
    for label, row in rows.items():
        assert row["replicator_median"] is not None, label
        if "latency" not in label:
            assert row["rsync_median"] is not None, label
    # the data directory is removed at the end
    assert [p.name for p in tmp_path.iterdir()] == ["figures.json"]


def test_a_missing_replicator_leaves_rsync_figures(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    code = run.main(["--quick", "--only", "initial-small", "--files", "50",
                     "--drop-caches", "no", "--workdir", str(tmp_path),
                     "--replicator", f"{sys.executable} -c raise(SystemExit(2))"])
    assert code == 0
    printed = capsys.readouterr().out
    line = next(ln for ln in printed.splitlines() if ln.startswith("initial sync, 50 x"))
    assert line.split()[-8] == "n/a"  # replicator column
    assert "replicator skipped" in printed
