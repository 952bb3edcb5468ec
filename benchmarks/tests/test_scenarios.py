"""Parts of the scenarios that the end-to-end runs in test_run.py do not show."""

from __future__ import annotations

from pathlib import Path

from benchmarks.rsyncd import RsyncDaemon
from benchmarks.scenarios import Bench, Settings


def test_small_trees_are_set_aside_until_the_run_is_over(tmp_path: Path) -> None:
    bench = Bench(Settings(workdir=tmp_path), RsyncDaemon(tmp_path / "module", tmp_path / "conf"))
    for name in ("dst-small", "state-small"):
        (tmp_path / name / "d").mkdir(parents=True)
        (tmp_path / name / "d" / "f").write_bytes(b"x")
    bench._set_aside(tmp_path / "dst-small", tmp_path / "state-small", tmp_path / "absent")
    # gone from where the next run writes, but not deleted: no inode was freed
    assert not (tmp_path / "dst-small").exists() and not (tmp_path / "state-small").exists()
    assert sorted(p.name for p in bench.trash.iterdir()) == ["1-dst-small", "2-state-small"]
    (tmp_path / "dst-small").mkdir()  # the next run's tree, set aside in its turn
    bench._set_aside(tmp_path / "dst-small")
    assert len(list(bench.trash.iterdir())) == 3
    bench.empty_trash()
    assert not bench.trash.exists()
