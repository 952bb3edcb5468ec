from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from replicator.agent.excludes import Excludes
from replicator.agent.scanner import scan, scan_subtree

NONE = Excludes([])


def make_tree(root: Path, spec: list[str]) -> None:
    """'d/' is a directory, 'l -> target' a symlink, anything else a file."""
    for item in spec:
        if " -> " in item:
            name, target = item.split(" -> ")
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(target, root / name)
        elif item.endswith("/"):
            (root / item).mkdir(parents=True, exist_ok=True)
        else:
            (root / item).parent.mkdir(parents=True, exist_ok=True)
            (root / item).write_bytes(item.encode())


TREE = [
    "a.txt",
    "a.swp",
    "src/",
    "src/main.py",
    "src/.main.py.swp",
    "src/pkg/",
    "src/pkg/mod.py",
    "tmp/",
    "tmp/junk/",
    "tmp/junk/x",
    "tmp/y",
    "cache/",
    "cache/blob",
    "empty/",
    "link -> src",
    "dangling -> nowhere",
]


@pytest.mark.parametrize(
    ("patterns", "expected"),
    [
        (
            [],
            [
                "a.swp", "a.txt", "cache", "cache/blob", "dangling", "empty", "link",
                "src", "src/.main.py.swp", "src/main.py", "src/pkg", "src/pkg/mod.py",
                "tmp", "tmp/junk", "tmp/junk/x", "tmp/y",
            ],
        ),
        (
            ["*.swp", "tmp/**", "cache"],
            ["a.txt", "dangling", "empty", "link", "src", "src/main.py", "src/pkg",
             "src/pkg/mod.py", "tmp"],
        ),
        (["src"], [
            "a.swp", "a.txt", "cache", "cache/blob", "dangling", "empty", "link",
            "tmp", "tmp/junk", "tmp/junk/x", "tmp/y",
        ]),
        (["link", "dangling", "junk/"], [
            "a.swp", "a.txt", "cache", "cache/blob", "empty", "src", "src/.main.py.swp",
            "src/main.py", "src/pkg", "src/pkg/mod.py", "tmp", "tmp/y",
        ]),
    ],
)
def test_scan_lists_every_entry_not_excluded(
    tmp_path: Path, patterns: list[str], expected: list[str]
) -> None:
    make_tree(tmp_path, TREE)
    got = [rel for rel, _ in scan(tmp_path, Excludes(patterns))]
    assert sorted(got) == expected
    assert len(got) == len(set(got))


def test_parents_come_before_children_and_stat_is_lstat(tmp_path: Path) -> None:
    make_tree(tmp_path, TREE)
    seen: set[str] = set()
    for rel, st in scan(tmp_path, NONE):
        parent = rel.rpartition("/")[0]
        assert parent == "" or parent in seen, f"{rel} before its parent"
        seen.add(rel)
        assert st.st_ino == os.lstat(tmp_path / rel).st_ino
        assert st.st_mode == os.lstat(tmp_path / rel).st_mode
    assert stat.S_ISLNK(dict(scan(tmp_path, NONE))["link"].st_mode)


def test_symlinked_directory_is_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    make_tree(outside, ["secret"])
    root = tmp_path / "root"
    make_tree(root, [f"in -> {outside}", "f"])
    assert sorted(rel for rel, _ in scan(root, NONE)) == ["f", "in"]


def test_directory_swapped_for_symlink_during_scan_is_not_walked(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    make_tree(outside, ["secret"])
    root = tmp_path / "root"
    make_tree(root, ["a/", "a/f", "b/", "b/g"])
    it = scan(root, NONE)
    got = [next(it)[0]]  # "a": root listed, nothing below it opened yet
    assert got == ["a"]
    shutil.rmtree(root / "b")
    os.symlink(outside, root / "b")
    got += [rel for rel, _ in it]
    assert "b/secret" not in got
    assert "b/g" not in got
    assert "a/f" in got


def test_entries_that_vanish_during_the_scan_are_skipped(tmp_path: Path) -> None:
    make_tree(tmp_path, ["a/", "a/f", "z/", "z/1", "z/2", "z/sub/", "z/sub/3"])
    it = scan(tmp_path, NONE)
    first = next(it)[0]
    assert first == "a"
    shutil.rmtree(tmp_path / "z")
    rest = [rel for rel, _ in it]
    assert rest == ["z", "a/f"]  # z was listed before it vanished; nothing below it


@pytest.mark.parametrize(
    ("relpath", "patterns", "expected"),
    [
        ("src", [], ["src/main.py", "src/pkg", "src/pkg/mod.py"]),
        ("src/", [], ["src/main.py", "src/pkg", "src/pkg/mod.py"]),
        ("src/pkg", [], ["src/pkg/mod.py"]),
        ("src", ["pkg"], ["src/main.py"]),
        ("src/pkg", ["src"], []),  # an excluded ancestor
        ("missing", [], []),
        ("a.txt", [], []),  # not a directory
        ("link", [], []),  # a symlink to a directory is not followed
        ("empty", [], []),
    ],
)
def test_scan_subtree(
    tmp_path: Path, relpath: str, patterns: list[str], expected: list[str]
) -> None:
    make_tree(tmp_path, ["a.txt", "src/", "src/main.py", "src/pkg/", "src/pkg/mod.py",
                         "empty/", "link -> src"])
    assert sorted(rel for rel, _ in scan_subtree(tmp_path, relpath, Excludes(patterns))) == expected


def test_scan_subtree_does_not_follow_a_symlink_in_the_middle(tmp_path: Path) -> None:
    make_tree(tmp_path, ["real/", "real/d/", "real/d/f", "via -> real"])
    assert list(scan_subtree(tmp_path, "via/d", NONE)) == []
    assert [rel for rel, _ in scan_subtree(tmp_path, "real/d", NONE)] == ["real/d/f"]


@pytest.mark.parametrize("bad", ["../x", "a/../b", "./a"])
def test_scan_subtree_refuses_paths_leaving_the_root(tmp_path: Path, bad: str) -> None:
    (tmp_path / "a").mkdir()
    with pytest.raises(ValueError):
        list(scan_subtree(tmp_path, bad, NONE))


def test_missing_root_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        list(scan(tmp_path / "nope", NONE))


def test_non_utf8_names_come_out_with_surrogateescape(tmp_path: Path) -> None:
    name = b"caf\xe9.txt"  # latin-1, not valid UTF-8
    with open(os.path.join(os.fsencode(tmp_path), b"d\xff"), "wb"):
        pass
    os.mkdir(os.path.join(os.fsencode(tmp_path), b"dir"))
    with open(os.path.join(os.fsencode(tmp_path), b"dir", name), "wb"):
        pass
    got = sorted(rel for rel, _ in scan(tmp_path, NONE))
    assert got == sorted(["d\udcff", "dir", "dir/caf\udce9.txt"])
    for rel in got:
        assert os.path.lexists(os.path.join(tmp_path, rel))  # usable as a path again
    got = sorted(rel for rel, _ in scan(tmp_path, Excludes(["*.txt"])))
    assert got == sorted(["d\udcff", "dir"])


@pytest.fixture
def tmpfs_mount(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "root" / "mnt"
    mnt.mkdir(parents=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                       capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@pytest.mark.parametrize(
    ("one_fs", "expected"),
    [(True, ["f", "mnt"]), (False, ["f", "mnt", "mnt/inside", "mnt/inside/x"])],
)
def test_other_file_systems_are_not_descended_into(
    tmpfs_mount: Path, one_fs: bool, expected: list[str]
) -> None:
    root = tmpfs_mount.parent
    make_tree(tmpfs_mount, ["inside/", "inside/x"])
    (root / "f").write_text("f")
    assert sorted(rel for rel, _ in scan(root, NONE, one_file_system=one_fs)) == expected


UNREADABLE_SCRIPT = """
import logging, os, sys
logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(message)s", stream=sys.stdout)
from replicator.agent.excludes import Excludes
from replicator.agent.scanner import scan
# the interpreter lives under /root, so privileges are dropped only after the imports
os.setgroups([])
os.setgid(65534)
os.setuid(65534)
for _ in range(2):
    print("ENTRIES", sorted(rel for rel, _ in scan(sys.argv[1], Excludes([]))))
"""


def test_unreadable_directory_is_logged_once_and_skipped() -> None:
    # Root reads every directory, so the scan runs as nobody in a child process, over a
    # tree that nobody can reach.
    base = Path(tempfile.mkdtemp(prefix="scan-eacces-"))
    try:
        base.chmod(0o755)
        make_tree(base, ["ok/", "ok/f", "locked/", "locked/hidden"])
        (base / "locked").chmod(0o000)
        r = subprocess.run(
            [sys.executable, "-c", UNREADABLE_SCRIPT, str(base)],
            capture_output=True, text=True, timeout=60,
            cwd="/", env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[3])},
        )
    finally:
        (base / "locked").chmod(0o755)
        shutil.rmtree(base)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines.count("ENTRIES ['locked', 'ok', 'ok/f']") == 2
    warnings = [line for line in lines if line.startswith("WARNING")]
    assert len(warnings) == 1, lines
    assert "path=locked" in warnings[0]


def test_scan_20000_files_timing(tmp_path: Path) -> None:
    # 200 directories of 100 files: the figure is printed for the report (pytest -s)
    for d in range(200):
        sub = tmp_path / f"d{d:03}"
        sub.mkdir()
        for f in range(100):
            (sub / f"f{f:03}.dat").write_bytes(b"x")
    excludes = Excludes(["*.swp", "tmp/**", "cache/"])
    t0 = time.perf_counter()
    n = sum(1 for _ in scan(tmp_path, excludes))
    elapsed = time.perf_counter() - t0
    print(f"\nscan of 20,000 files in 200 dirs: {elapsed * 1000:.0f} ms "
          f"({elapsed / 20_200 * 1e6:.1f} us/entry)")
    assert n == 20_200
    assert elapsed < 5.0
