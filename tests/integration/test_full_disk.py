"""A receiver whose disk fills up says so and loses nothing."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.integration.harness import get_json, wait_converged, wait_for
from tests.integration.test_mirror_basic import start_mirror


@pytest.fixture
def small_fs(tmp_path: Path):  # type: ignore[no-untyped-def]
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)],
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_is_reported_and_nothing_is_lost(tmp_path: Path, small_fs: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(40 << 20))
    (src / "small").write_text("small")
    mirror, url = start_mirror(tmp_path, src, small_fs / "dst", "--state-dir",
                               str(small_fs / "state"))

    def reported() -> bool:
        rows = get_json(url)["datasets"]
        return bool(rows) and "No space left on device" in (rows[0].get("error") or "")

    try:
        wait_for(reported, 30, message="the full disk in /status")
        assert get_json(url)["datasets"][0]["state"] == "error"
    finally:
        mirror.kill()
    # the operator makes room (here: the big file goes) and restarts: everything converges
    (src / "big").unlink()
    mirror, url = start_mirror(tmp_path, src, small_fs / "dst", "--state-dir",
                               str(small_fs / "state"))
    try:
        wait_converged(src, small_fs / "dst")
    finally:
        assert mirror.stop() == 0, mirror.log()
