from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks import mirror
from benchmarks.mirror import (
    MirrorFailed,
    MirrorProcess,
    MirrorUnavailable,
    SplitProcess,
    is_caught_up,
    parse_wire_bytes,
)
from benchmarks.util import files_equal

FAKE = [sys.executable, str(Path(__file__).with_name("fake_mirror.py"))]


def _ds(**kw: Any) -> dict[str, Any]:
    d = {"state": "streaming", "pending_changes": 0, "written_lsn": 5, "applied_lsn": 5}
    d.update(kw)
    return d


@pytest.mark.parametrize("doc,expected", [
    (None, False),
    ({"datasets": []}, False),
    ({"datasets": [_ds()]}, True),
    ({"datasets": [_ds(state="catching_up")]}, False),
    ({"datasets": [_ds(pending_changes=1)]}, False),
    ({"datasets": [_ds(applied_lsn=4)]}, False),
    ({"datasets": [_ds(), _ds(state="disconnected")]}, False),
])
def test_is_caught_up(doc: dict[str, Any] | None, expected: bool) -> None:
    assert is_caught_up(doc) is expected


@pytest.mark.parametrize("text,expected", [
    ("", None),
    ('replicator_bytes_total{source="a",dataset="d",stage="raw"} 10.0\n', None),
    ('# TYPE replicator_bytes counter\n'
     'replicator_bytes_total{source="a",dataset="d",stage="raw"} 10.0\n'
     'replicator_bytes_total{source="a",dataset="d",stage="wire"} 7.0\n'
     'replicator_bytes_created{source="a",dataset="d",stage="wire"} 1.7e9\n', 7),
    ('replicator_bytes_total{stage="wire",role="agent"} 1.5e6\n'
     'replicator_bytes_total{stage="wire",role="receiver"} 1.4e6\n', 1500000),
])
def test_parse_wire_bytes(text: str, expected: int | None) -> None:
    assert parse_wire_bytes(text) == expected


def test_waits_for_caught_up_and_reads_wire_bytes(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "f").write_bytes(b"x" * 1000)
    proc = MirrorProcess(src, dst, tmp_path / "state", tmp_path / "log", FAKE)
    try:
        proc.start()
        done = proc.wait_caught_up(30, dst_ready=lambda: files_equal(src / "f", dst / "f"))
        assert done > proc.started_at
        assert files_equal(src / "f", dst / "f")
        assert proc.wire_bytes() == 1000
        ds = proc.dataset()
        assert ds is not None and ds["applied_lsn"] == 1
    finally:
        proc.stop()
    proc.stop()  # twice is fine
    assert proc.status() is None


def test_a_mirror_that_exits_is_reported_with_its_stderr(tmp_path: Path) -> None:
    failing = [sys.executable, "-c", "import sys; sys.exit('mirror: not implemented')"]
    proc = MirrorProcess(tmp_path / "src", tmp_path / "dst", tmp_path / "state",
                         tmp_path / "log", failing)
    proc.start()
    with pytest.raises(MirrorUnavailable, match="not implemented"):
        proc.wait_caught_up(30)
    proc.stop()


def test_a_dataset_stuck_in_error_fails_fast(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_MIRROR_STATE", "error")
    monkeypatch.setattr(mirror, "ERROR_GRACE", 0.3)
    src = tmp_path / "src"
    src.mkdir()
    proc = MirrorProcess(src, tmp_path / "dst", tmp_path / "state", tmp_path / "log", FAKE)
    try:
        proc.start()
        with pytest.raises(MirrorFailed, match="in error"):
            proc.wait_caught_up(30)
        assert proc.answered
    finally:
        proc.stop()


def test_the_two_process_topology_with_the_real_replicator(tmp_path: Path) -> None:
    """SplitProcess's configs are what the real daemons accept, and the tree lands where
    `mirrored` says."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"y" * 5000)
    proc = SplitProcess(src, tmp_path / "root", tmp_path / "state", tmp_path / "log")
    assert proc.mirrored == tmp_path / "root" / "bench" / "data"
    try:
        proc.start()
        proc.wait_caught_up(60, dst_ready=lambda: files_equal(src / "d" / "f",
                                                              proc.mirrored / "d" / "f"))
        ds = proc.dataset()
        assert ds is not None and ds["source"] == "bench" and ds["applied_lsn"] >= 1
        assert (proc.wire_bytes() or 0) > 0
    finally:
        proc.stop()
    assert proc.status() is None


def test_a_dead_agent_is_reported(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    # the fake receiver serves; an agent command that exits at once stands for a dead agent
    failing = [sys.executable, "-c",
               "import sys, runpy; sys.argv[0] = " + repr(FAKE[1]) + "; "
               "sys.exit('agent: gone') if sys.argv[1] == 'agent' else "
               "runpy.run_path(sys.argv[0], run_name='__main__')"]
    proc = SplitProcess(src, tmp_path / "root", tmp_path / "state", tmp_path / "log", failing)
    try:
        proc.start()
        with pytest.raises(MirrorUnavailable, match="agent exited"):
            proc.wait_caught_up(30)
    finally:
        proc.stop()
