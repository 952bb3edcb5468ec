"""`replicator mirror SRC DST`: a real process mirroring a real tree."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.integration.harness import Daemon, free_port, get_json, wait_converged, wait_for


def start_mirror(tmp_path: Path, src: Path, dst: Path, *extra: str) -> tuple[Daemon, str]:
    port = free_port()
    d = Daemon(["mirror", str(src), str(dst), "--http", f"127.0.0.1:{port}",
                "--state-dir", str(tmp_path / "state"), "--log-level", "debug", *extra],
               tmp_path / "mirror.log").start()
    url = f"http://127.0.0.1:{port}/status"
    wait_for(lambda: get_json(url), 30, message="the mirror's /status")
    return d, url


def test_initial_sync_and_live_changes(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "a.txt").write_text("hello")
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "sub" / "deeper" / "b.bin").write_bytes(os.urandom(200_000))
    (src / "empty").mkdir()
    (src / "link").symlink_to("sub/deeper/b.bin")
    os.chmod(src / "a.txt", 0o640)
    os.utime(src / "a.txt", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    mirror, url = start_mirror(tmp_path, src, dst)
    try:
        wait_converged(src, dst)
        # live changes
        (src / "new.txt").write_text("new file")
        (src / "a.txt").write_text("changed")
        (src / "sub" / "deeper" / "b.bin").rename(src / "moved.bin")
        (src / "sub").rename(src / "sub2")
        (src / "link").unlink()
        wait_converged(src, dst)
        doc = get_json(url)
        assert doc["role"] == "receiver"
        row = doc["datasets"][0]
        assert row["applied_lsn"] > 0
        assert row["state"] in ("streaming", "catching_up")
        # nothing of the tool's own inside DST
        assert not any(p.name.startswith(".replicator") for p in dst.rglob("*"))
    finally:
        assert mirror.stop() == 0, mirror.log()


def test_runs_of_new_small_files_among_other_entries_converge(tmp_path: Path) -> None:
    """A rescan sends new small files in runs (agent `_send_small_files`); a run ends at
    anything else in scan order. Runs longer than one batch, broken by a directory, a
    symlink, a big file, a hard link and an empty file, before and after a restart that
    finds some of the files known and some new."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    d = src / "d"
    d.mkdir(parents=True)

    def fill(prefix: str) -> None:
        # in name order (the scan's): 100 files in a row, then one of each other kind
        # between shorter runs
        for i in range(150):
            (d / f"{prefix}{i:03d}").write_bytes(os.urandom(i * 37))  # the first one empty
        (d / f"{prefix}099.dir").mkdir()
        (d / f"{prefix}099.dir" / "inner").write_text(prefix)
        (d / f"{prefix}109.lnk").symlink_to(f"{prefix}108")
        os.link(d / f"{prefix}119", d / f"{prefix}119.hard")
        (d / f"{prefix}129.big").write_bytes(os.urandom(300_000))

    fill("a")
    mirror, _ = start_mirror(tmp_path, src, dst)
    try:
        wait_converged(src, dst)
    finally:
        assert mirror.stop() == 0, mirror.log()
    assert "small files dataset=mirror count=64 " in mirror.log()  # a full run was sent
    fill("b")  # while stopped: the restart's rescan finds them new, the "a" files known
    os.truncate(d / "a010", 3)
    mirror, _ = start_mirror(tmp_path, src, dst)
    try:
        wait_converged(src, dst)
    finally:
        assert mirror.stop() == 0, mirror.log()


def test_sigint_stops_cleanly(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    mirror, _ = start_mirror(tmp_path, src, dst)
    mirror.kill(signal.SIGINT)
    assert mirror.proc is not None and mirror.proc.returncode == 0, mirror.log()


def test_dst_inside_src_is_a_usage_error(tmp_path: Path) -> None:
    import subprocess
    import sys
    src = tmp_path / "src"
    src.mkdir()
    r = subprocess.run([sys.executable, "-m", "replicator", "mirror", str(src), str(src / "m")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "contain" in r.stderr


def test_owner_xattrs_and_holes_are_replicated(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    owned = src / "owned"
    owned.write_text("x")
    sparse = src / "sparse"
    with open(sparse, "wb") as f:
        f.truncate(64 << 20)
        f.seek(32 << 20)
        f.write(b"data in the middle")
    as_root = os.geteuid() == 0
    if as_root:
        os.chown(owned, 1234, 5678)
    try:
        os.setxattr(owned, "user.colour", b"blue")
        xattrs = True
    except OSError:
        xattrs = False
    mirror, _ = start_mirror(tmp_path, src, dst)
    try:
        wait_converged(src, dst)
        st = os.stat(dst / "owned")
        if as_root:
            assert (st.st_uid, st.st_gid) == (1234, 5678)
        if xattrs:
            assert os.getxattr(dst / "owned", "user.colour") == b"blue"
            os.setxattr(owned, "user.colour", b"green")
            wait_for(lambda: os.getxattr(dst / "owned", "user.colour") == b"green", 30,
                     message="the xattr change")
        # a 64 MiB file with 18 bytes of data stays sparse on the mirror
        assert os.stat(dst / "sparse").st_blocks * 512 < 1 << 20
    finally:
        assert mirror.stop() == 0, mirror.log()


def test_metrics_count_raw_and_wire_bytes(tmp_path: Path) -> None:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from replicator.observe.metrics import METRIC_NAMES

    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "text").write_bytes(b"all work and no play makes a dull boy\n" * 30_000)
    mirror, url = start_mirror(tmp_path, src, dst)
    try:
        wait_converged(src, dst)
        with urllib.request.urlopen(url.replace("/status", "/metrics"), timeout=5) as r:
            text = r.read().decode()
        families = list(text_string_to_metric_families(text))
        series = [(s.name, tuple(sorted(s.labels.items()))) for f in families for s in f.samples]
        assert len(series) == len(set(series)), "agent and receiver in one process: no twins"
        assert {n.removesuffix("_total") for n in METRIC_NAMES} <= {f.name for f in families}
        samples = {(s.name, s.labels.get("stage")): s.value for f in families for s in f.samples}
        raw = samples[("replicator_bytes_total", "raw")]
        wire = samples[("replicator_bytes_total", "wire")]
        assert raw == (src / "text").stat().st_size
        # over loopback (compression "auto") moving bytes is cheaper than compressing them
        assert raw < wire < raw * 1.01, "data travels raw, with a little framing"
        assert samples[("replicator_records_total", None)] >= 1
    finally:
        assert mirror.stop() == 0, mirror.log()


def xattrs_of(path: Path) -> dict[bytes, bytes]:
    """Every extended attribute of `path`, names as the file system's bytes."""
    return {os.fsencode(n): os.getxattr(path, n, follow_symlinks=False)
            for n in os.listxattr(path, follow_symlinks=False)}


def test_xattr_names_that_are_not_utf8_replicate_exactly(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    f, d = src / "f", src / "d"
    f.write_text("x")
    d.mkdir()
    odd = b"user.\xff\xfeodd"  # not UTF-8: a protobuf string could not carry it
    try:
        os.setxattr(f, odd, b"odd")
        os.setxattr(f, "user.ok", b"fine")
        os.setxattr(d, b"user.dir\x80", b"\x00on a dir")
    except OSError:
        pytest.skip("no user xattrs on this file system")
    mirror, _ = start_mirror(tmp_path, src, dst)
    try:
        wait_for(lambda: all(xattrs_of(dst / p.name) == xattrs_of(p) for p in (f, d)), 30,
                 message="the xattrs of f and d")
        assert xattrs_of(dst / "f") == {odd: b"odd", b"user.ok": b"fine"}
        # a change and a removal follow, the odd name like any other
        os.setxattr(f, odd, b"changed")
        os.removexattr(f, "user.ok")
        wait_for(lambda: xattrs_of(dst / "f") == {odd: b"changed"}, 30,
                 message="the changed xattr")
        os.removexattr(f, odd)
        wait_for(lambda: xattrs_of(dst / "f") == {}, 30, message="the removed xattr")
        assert "not UTF-8" not in mirror.log()
    finally:
        assert mirror.stop() == 0, mirror.log()
