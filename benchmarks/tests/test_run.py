"""The whole harness end to end, tiny, against the fake mirror."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from benchmarks import run
from benchmarks.rsyncd import RSYNC

FAKE = f"{sys.executable} {Path(__file__).with_name('fake_mirror.py')}"
# every run starts a real rsync daemon, and refuses to go on without rsync
pytestmark = pytest.mark.skipif(shutil.which(RSYNC) is None, reason="rsync not installed")


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
    assert len(rows) == 17
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


def test_a_workdir_that_does_not_exist_yet_is_made(tmp_path: Path) -> None:
    workdir = tmp_path / "not" / "yet"
    code = run.main(["--quick", "--only", "initial-small", "--files", "20",
                     "--drop-caches", "no", "--workdir", str(workdir),
                     "--replicator", FAKE])
    assert code == 0
    assert workdir.is_dir() and list(workdir.iterdir()) == []  # made, and left clean


def test_a_workdir_that_cannot_be_made_is_a_one_line_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("not a directory")
    code = run.main(["--quick", "--only", "initial-small", "--workdir",
                     str(tmp_path / "file" / "sub"), "--replicator", FAKE])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("benchmarks: cannot make a data directory in ")


def test_live_small_with_the_real_replicator(tmp_path: Path) -> None:
    """The bulk copy into a running mirror, against the real `replicator mirror`: its status
    and the tree it writes end the wait, and the copy verifies."""
    out = tmp_path / "figures.json"
    code = run.main(["--quick", "--only", "live-small", "--files", "300",
                     "--drop-caches", "no", "--workdir", str(tmp_path), "--json", str(out)])
    assert code == 0
    doc = json.loads(out.read_text())
    assert doc["failures"] == [] and not any("replicator" in n for n in doc.get("notes", []))
    rows = {r["benchmark"]: r for r in doc["rows"]}
    until = rows["bulk copy of 300 files into a live tree, until mirrored"]
    copy = rows["  of which the copy itself (cp -a)"]
    # the mirror is caught up after the copy it takes in, never before
    assert until["replicator_median"] >= copy["replicator_median"] > 0
