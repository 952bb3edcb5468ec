"""File names are bytes: names that are not UTF-8, or that look like options or dot files,
replicate exactly, in the initial sync, in live changes, and in the receiver's manifest."""

from __future__ import annotations

import os
from pathlib import Path

import grpc

from replicator.core.blocks import block_hash, file_digest
from replicator.wire import pb, rpc
from tests.integration.conftest import Pair
from tests.integration.harness import (
    Daemon,
    caught_up,
    free_port,
    get_json,
    wait_converged,
    wait_for,
)

# Raw names as the kernel has them; b"\xff", b"\xfe" and b"\x80" are never valid UTF-8.
FILE_NAMES = [b"\xff\xfe.bin", "ünïcödé".encode(), b"with space", b"-rf", b"..hidden"]
ODD_DIR = b"\x80dir"
ODD_TARGET = b"../\xc3\xbc\xff\xfe.bin"  # "ü" then bytes that are not UTF-8: dangling is fine


def populate(src: Path) -> None:
    """The odd names under `src`, created through bytes paths as any program might."""
    root = os.fsencode(src)
    for i, name in enumerate(FILE_NAMES):
        with open(os.path.join(root, name), "wb") as f:
            f.write(name * (i + 1) + os.urandom(100 * i))
    os.mkdir(os.path.join(root, ODD_DIR))
    with open(os.path.join(root, ODD_DIR, b"inner\xe9.txt"), "wb") as f:
        f.write(os.urandom(70_000))         # two blocks: a later patch sends one
    os.symlink(ODD_TARGET, os.path.join(root, ODD_DIR, b"link\xfa"))


def change(src: Path) -> None:
    """Live changes that address odd names through the manifest: patch, rename, delete."""
    root = os.fsencode(src)
    with open(os.path.join(root, ODD_DIR, b"inner\xe9.txt"), "r+b") as f:
        f.seek(65536)
        f.write(b"patched")
    os.rename(os.path.join(root, b"\xff\xfe.bin"), os.path.join(root, b"renamed\xfd"))
    os.rename(os.path.join(root, ODD_DIR), os.path.join(root, b"\x81moved"))
    os.unlink(os.path.join(root, b"-rf"))


def raw_tree(root: Path) -> set[bytes]:
    """Every relative path under `root` as bytes: os.walk over bytes, no decoding at all."""
    out: set[bytes] = set()
    for dirpath, dirnames, filenames in os.walk(os.fsencode(root)):
        for name in dirnames + filenames:
            out.add(os.path.relpath(os.path.join(dirpath, name), os.fsencode(root)))
    return out


def test_mirror_replicates_names_that_are_not_utf8(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    populate(src)
    http = free_port()
    mirror = Daemon(["mirror", str(src), str(dst), "--http", f"127.0.0.1:{http}",
                     "--state-dir", str(tmp_path / "state"), "--log-level", "debug"],
                    tmp_path / "mirror.log").start()
    url = f"http://127.0.0.1:{http}/status"
    try:
        wait_for(lambda: get_json(url), 30, message="the mirror's /status")
        wait_converged(src, dst)
        assert raw_tree(dst) == raw_tree(src)
        assert os.readlink(os.fsencode(dst / "\udc80dir" / "link\udcfa")) == ODD_TARGET
        change(src)
        wait_converged(src, dst)
        assert raw_tree(dst) == raw_tree(src)
        assert b"\x81moved/link\xfa" in raw_tree(dst) and b"-rf" not in raw_tree(dst)
        # the patch found its base in the manifest by the raw name: nothing was resent whole
        assert "path to resync" not in mirror.log(), mirror.log()
        row = get_json(url)["datasets"][0]
        assert row["state"] != "error" and row["applied_lsn"] > 0, row
    finally:
        assert mirror.stop() == 0, mirror.log()


async def test_get_manifest_returns_the_raw_names(pair: Pair) -> None:
    populate(pair.src)
    pair.receiver.start()
    pair.agent.start()
    wait_converged(pair.src, pair.dst)
    wait_for(lambda: caught_up(pair.receiver_status), message="the receiver to catch up")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{pair.receiver_port}") as channel:
        call = rpc.ReplicatorStub(channel).GetManifest(
            pb.ManifestRequest(source="app1", dataset="docs"))
        entries = {e.path: e async for e in call}
    assert set(entries) == raw_tree(pair.src)
    link = entries[ODD_DIR + b"/link\xfa"]
    assert (link.kind, link.target, link.size) == ("symlink", ODD_TARGET, len(ODD_TARGET))
    odd = entries[b"\xff\xfe.bin"]
    data = (pair.src / "\udcff\udcfe.bin").read_bytes()
    assert odd.kind == "file" and odd.digest == file_digest(len(data), block_hash(data))
    assert pair.agent.stop() == 0, pair.agent.log()
    assert pair.receiver.stop() == 0, pair.receiver.log()
