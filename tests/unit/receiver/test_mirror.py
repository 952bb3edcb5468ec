"""The receiver's mirror: every operation on a real tree, and nothing written outside it."""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from replicator.core.records import Attrs
from replicator.errors import ConfigError, PathRefused, ProtocolError
from replicator.receiver import mirror as mirror_mod
from replicator.receiver.mirror import Mirror
from replicator.receiver.syscalls import Calls, HeldCalls

NS = 1_700_000_000_123_456_789  # an mtime with all nine nanosecond digits set
FILE_ATTRS = Attrs(mode=stat.S_IFREG | 0o640, mtime_ns=NS)
DIR_ATTRS = Attrs(mode=stat.S_IFDIR | 0o750, mtime_ns=NS)
LINK_ATTRS = Attrs(mode=stat.S_IFLNK | 0o777, mtime_ns=NS)


def snapshot(top: Path) -> dict[str, tuple[object, ...]]:
    """Everything observable about a tree, for "nothing changed here" checks."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = p.lstat()
            rel = str(p.relative_to(top))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p), st.st_mtime_ns)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", st.st_mode, st.st_mtime_ns)
            else:
                out[rel] = ("file", st.st_mode, st.st_mtime_ns, p.read_bytes())
    st = top.lstat()
    out["."] = ("top", st.st_mode, st.st_mtime_ns)
    return out


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory the mirror must never touch, holding a file and a subdirectory."""
    d = tmp_path / "outside"
    (d / "sub").mkdir(parents=True)
    (d / "passwd").write_bytes(b"root:x:0:0\n")
    (d / "sub" / "f").write_bytes(b"keep me")
    return d


@pytest.fixture(params=[False, True], ids=["calls", "held-calls"])
def mirror(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Mirror]:
    # every test of the fixture runs with both ways of making the quick calls (syscalls)
    m = Mirror(tmp_path / "mirror" / "src" / "ds", tmp_path / "state" / "staging",
               HeldCalls() if request.param else Calls())
    try:
        yield m
    finally:
        m.close()


def put(m: Mirror, path: str, data: bytes, attrs: Attrs | None = None) -> None:
    fd, staged = m.new_staged()
    try:
        os.write(fd, data)
        if attrs is not None:
            m.set_attrs_fd(fd, attrs)
    finally:
        os.close(fd)
    m.install(staged, path)


def read(m: Mirror, path: str) -> bytes:
    fd = m.open_read(path)
    try:
        return os.read(fd, 1 << 20)
    finally:
        os.close(fd)


ODD_XATTR = b"user.\xff\xfeodd"  # not UTF-8: only bytes can name it


def xattrs_supported(path: Path) -> bool:
    try:
        os.setxattr(path, "user.probe", b"1")
        os.removexattr(path, "user.probe")
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return False
        raise
    return True


# -- construction -----------------------------------------------------------------------


def test_creates_root_and_staging_with_their_modes(tmp_path: Path) -> None:
    root, staging = tmp_path / "m" / "s" / "d", tmp_path / "st" / "staging"
    with Mirror(root, staging) as m:
        assert stat.S_IMODE(root.stat().st_mode) == 0o755
        assert stat.S_IMODE(staging.stat().st_mode) == 0o700
        put(m, "x", b"1")
    assert (root / "x").read_bytes() == b"1"
    # Reopening an existing mirror is fine and keeps its content.
    with Mirror(root, staging) as m:
        assert read(m, "x") == b"1"


def test_refuses_staging_on_another_file_system(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no second file system to stage on")
    staging = shm / f"replicator-test-{os.getpid()}-{tmp_path.name}"
    try:
        with pytest.raises(ConfigError, match="one file system"):
            Mirror(tmp_path / "m", staging)
    finally:
        if staging.exists():
            staging.rmdir()


def test_close_is_idempotent(tmp_path: Path) -> None:
    m = Mirror(tmp_path / "m", tmp_path / "s")
    m.close()
    m.close()


# -- escaping through symlinks and hostile paths -----------------------------------------


def _install(m: Mirror, p: str) -> None:
    fd, staged = m.new_staged()
    os.close(fd)
    try:
        m.install(staged, p)
    finally:
        m.discard_staged(staged)  # a failed install leaves the staged file to its caller


OPS: dict[str, Callable[[Mirror, str], object]] = {
    "install": _install,
    "mkdir": lambda m, p: m.mkdir(p, DIR_ATTRS),
    "symlink": lambda m, p: m.symlink(p, "/tmp", LINK_ATTRS),
    "delete": lambda m, p: m.delete(p),
    "rename_from": lambda m, p: m.rename(p, "elsewhere"),
    "rename_to": lambda m, p: m.rename("mine", p),
    "set_attrs": lambda m, p: m.set_attrs(p, FILE_ATTRS),
    "stage_copy": lambda m, p: m.stage_copy(p),
    "open_read": lambda m, p: m.open_read(p),
    "lstat": lambda m, p: m.lstat(p),
}


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize(
    "path",
    ["evil/passwd", "evil/sub/f", "evil/new/deeper", "d/evil2/passwd", "file/x", "d/file/x"],
)
def test_nothing_is_reached_through_a_symlink_or_file_in_the_mirror(
    mirror: Mirror, outside: Path, op: str, path: str
) -> None:
    mirror.symlink("evil", str(outside), LINK_ATTRS)
    mirror.mkdir("d", DIR_ATTRS)
    mirror.symlink("d/evil2", str(outside), LINK_ATTRS)
    put(mirror, "file", b"f")
    put(mirror, "d/file", b"f")
    put(mirror, "mine", b"mine")
    before_outside = snapshot(outside)
    before_mirror = snapshot(mirror.root)

    with pytest.raises(PathRefused) as info:
        OPS[op](mirror, path)

    message = str(info.value)
    assert "\n" not in message and repr(path) in message
    assert snapshot(outside) == before_outside
    assert snapshot(mirror.root) == before_mirror
    assert os.listdir(mirror.staging_dir) == []


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("path", ["", "/etc/passwd", "../outside/passwd", "a/../../x", "a//b"])
def test_hostile_paths_are_refused_by_every_operation(
    mirror: Mirror, outside: Path, op: str, path: str
) -> None:
    put(mirror, "mine", b"mine")
    before = snapshot(outside), snapshot(mirror.root)
    with pytest.raises(PathRefused):
        OPS[op](mirror, path)
    assert (snapshot(outside), snapshot(mirror.root)) == before


def walked(m: Mirror) -> list[tuple[str, int, int, int]]:
    """snapshot() of the mirror through its own fd walk: paths longer than PATH_MAX too."""
    return [(p, st.st_mode, st.st_mtime_ns, st.st_size) for p, st in m.walk()]


DEEP = "/".join(["p" * 200] * 20)  # 4,019 bytes: room for a leaf of 76 at most


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("path", [
    "d/..", "d/.", "d/", "d/a\0b", "d/\ud800", "d/" + "x" * 256, DEEP + "/" + "x" * 77,
])
def test_a_bad_last_component_under_a_cached_parent_is_refused(
    mirror: Mirror, outside: Path, op: str, path: str
) -> None:
    # the parent is resolved (and cached) first: only the last component is new
    put(mirror, "d/ok", b"ok")
    mirror.mkdir(DEEP, DIR_ATTRS)
    put(mirror, DEEP + "/" + "x" * 76, b"fits")
    put(mirror, "mine", b"mine")
    before = snapshot(outside), walked(mirror)
    with pytest.raises(PathRefused) as info:
        OPS[op](mirror, path)
    assert "\n" not in str(info.value)
    assert (snapshot(outside), walked(mirror)) == before
    assert os.listdir(mirror.staging_dir) == []


def test_a_cached_parent_is_not_used_after_it_was_replaced(mirror: Mirror,
                                                           outside: Path) -> None:
    put(mirror, "d/a", b"1")  # "d" cached
    mirror.symlink("d", str(outside), LINK_ATTRS)  # replaces the directory
    with pytest.raises(PathRefused):
        put(mirror, "d/passwd", b"owned")
    mirror.delete("d")
    put(mirror, "d/b", b"2")  # a new directory "d", resolved again
    assert read(mirror, "d/b") == b"2" and mirror.lstat("d/a") is None
    assert (outside / "passwd").read_bytes() == b"root:x:0:0\n"


@pytest.mark.parametrize("target", ["", "a\0b", "\ud800", "x" * 4096])
def test_symlink_targets_no_symlink_can_hold_are_refused(mirror: Mirror, target: str) -> None:
    with pytest.raises(PathRefused):
        mirror.symlink("l", target, LINK_ATTRS)
    assert mirror.lstat("l") is None
    assert os.listdir(mirror.staging_dir) == []


@pytest.mark.parametrize(
    "attrs",
    [
        Attrs(mode=0o644, mtime_ns=0, uid=-1),
        Attrs(mode=0o644, mtime_ns=0, gid=2**32),
        Attrs(mode=0o644, mtime_ns=2**64),
        Attrs(mode=0o644, mtime_ns=0, xattrs={b"": b""}),
        Attrs(mode=0o644, mtime_ns=0, xattrs={b"user.a\0b": b""}),
        Attrs(mode=0o644, mtime_ns=0, xattrs={b"user." + b"x" * 300: b""}),
        Attrs(mode=0o644, mtime_ns=0, xattrs={b"user.big": b"x" * 70_000}),
    ],
)
def test_attributes_the_kernel_would_misread_are_refused(mirror: Mirror, attrs: Attrs) -> None:
    put(mirror, "f", b"x", FILE_ATTRS)
    before = snapshot(mirror.root)
    with pytest.raises(ProtocolError):
        mirror.set_attrs("f", attrs)
    assert snapshot(mirror.root) == before


# -- lstat, open_read, walk ----------------------------------------------------------------


def test_lstat(mirror: Mirror, outside: Path) -> None:
    put(mirror, "d/f", b"abc")
    mirror.symlink("l", str(outside), LINK_ATTRS)
    assert mirror.lstat("missing") is None
    assert mirror.lstat("missing/child") is None
    st = mirror.lstat("d/f")
    assert st is not None and stat.S_ISREG(st.st_mode) and st.st_size == 3
    st = mirror.lstat("d")
    assert st is not None and stat.S_ISDIR(st.st_mode)
    st = mirror.lstat("l")
    assert st is not None and stat.S_ISLNK(st.st_mode)


def test_open_read(mirror: Mirror, outside: Path) -> None:
    put(mirror, "d/f", b"content")
    mirror.symlink("l", str(outside / "passwd"), LINK_ATTRS)
    assert read(mirror, "d/f") == b"content"
    with pytest.raises(FileNotFoundError):
        mirror.open_read("d/missing")
    with pytest.raises(FileNotFoundError):
        mirror.open_read("nodir/missing")
    with pytest.raises(PathRefused, match="symlink"):
        mirror.open_read("l")
    with pytest.raises(PathRefused, match="not a regular file"):
        mirror.open_read("d")


def test_walk_lists_parents_first_and_never_enters_symlinks(
    mirror: Mirror, outside: Path
) -> None:
    odd = os.fsdecode(b"caf\xe9")
    put(mirror, "b/z", b"1")
    put(mirror, f"a/{odd}/y", b"22")
    mirror.mkdir("a/empty", DIR_ATTRS)
    mirror.symlink("a/out", str(outside), LINK_ATTRS)

    entries = list(mirror.walk())
    paths = [p for p, _ in entries]

    assert sorted(paths) == sorted(["a", f"a/{odd}", f"a/{odd}/y", "a/empty", "a/out", "b", "b/z"])
    for i, p in enumerate(paths):
        if "/" in p:
            assert paths.index(p.rsplit("/", 1)[0]) < i
    kinds = {p: stat.S_IFMT(st.st_mode) for p, st in entries}
    assert kinds["a/out"] == stat.S_IFLNK
    assert kinds["a/empty"] == stat.S_IFDIR
    assert dict(entries)[f"a/{odd}/y"].st_size == 2
    # The name on disk is the raw byte the wire str stands for, not a re-encoding of it.
    assert b"caf\xe9" in os.listdir(os.fsencode(mirror.root / "a"))


def test_walk_of_an_empty_mirror(mirror: Mirror) -> None:
    assert list(mirror.walk()) == []


# -- staging and install -----------------------------------------------------------------


def test_new_staged_files_are_private_unique_and_empty(mirror: Mirror) -> None:
    staged = [mirror.new_staged() for _ in range(20)]
    try:
        paths = {p for _, p in staged}
        assert len(paths) == 20
        for fd, p in staged:
            assert os.path.dirname(p) == str(mirror.staging_dir)
            st = os.fstat(fd)
            assert st.st_size == 0 and stat.S_IMODE(st.st_mode) == 0o600
    finally:
        for fd, p in staged:
            os.close(fd)
            mirror.discard_staged(p)
    assert os.listdir(mirror.staging_dir) == []


def test_discard_staged(mirror: Mirror, outside: Path) -> None:
    fd, p = mirror.new_staged()
    os.close(fd)
    mirror.discard_staged(p)
    assert not os.path.exists(p)
    mirror.discard_staged(p)  # missing is fine
    with pytest.raises(ValueError):
        mirror.discard_staged(str(outside / "passwd"))
    assert (outside / "passwd").exists()


def test_install_creates_missing_parents(mirror: Mirror) -> None:
    put(mirror, "a/b/c/f", b"deep")
    assert (mirror.root / "a/b/c/f").read_bytes() == b"deep"
    for d in ("a", "a/b", "a/b/c"):
        assert stat.S_IMODE((mirror.root / d).stat().st_mode) == 0o755
    assert os.listdir(mirror.staging_dir) == []


@pytest.mark.parametrize("existing", ["file", "dir", "symlink_to_outside_file", "symlink_dir"])
def test_install_replaces_what_is_there(mirror: Mirror, outside: Path, existing: str) -> None:
    if existing == "file":
        put(mirror, "p", b"old")
    elif existing == "dir":
        put(mirror, "p/inner/f", b"old")
        mirror.symlink("p/inner/out", str(outside), LINK_ATTRS)
    elif existing == "symlink_to_outside_file":
        mirror.symlink("p", str(outside / "passwd"), LINK_ATTRS)
    else:
        mirror.symlink("p", str(outside), LINK_ATTRS)
    before = snapshot(outside)

    put(mirror, "p", b"new")

    assert (mirror.root / "p").read_bytes() == b"new"
    assert not (mirror.root / "p").is_symlink()
    assert snapshot(outside) == before


def test_installed_file_keeps_attributes_set_on_the_staged_fd(mirror: Mirror) -> None:
    attrs = Attrs(mode=stat.S_IFREG | 0o4751, mtime_ns=NS)
    put(mirror, "f", b"x", attrs)
    st = (mirror.root / "f").lstat()
    assert stat.S_IMODE(st.st_mode) == 0o4751
    assert st.st_mtime_ns == NS


def test_non_utf8_names_reach_the_disk_as_their_bytes(mirror: Mirror) -> None:
    name = os.fsdecode(b"\xff\xfe")
    put(mirror, f"dir/{name}", b"odd")
    assert os.listdir(os.fsencode(mirror.root / "dir")) == [b"\xff\xfe"]
    assert read(mirror, f"dir/{name}") == b"odd"
    assert [p for p, _ in mirror.walk()] == ["dir", f"dir/{name}"]


# -- stage_copy ---------------------------------------------------------------------------


def test_stage_copy_copies_content_and_keeps_holes(mirror: Mirror) -> None:
    size = 8 << 20
    fd, staged = mirror.new_staged()
    os.ftruncate(fd, size)
    os.pwrite(fd, b"head", 0)
    os.pwrite(fd, b"middle", 4 << 20)
    os.pwrite(fd, b"tail", size - 4)
    os.close(fd)
    mirror.install(staged, "sparse")

    fd, copy = mirror.stage_copy("sparse")
    try:
        st = os.fstat(fd)
        assert st.st_size == size
        assert os.pread(fd, 4, 0) == b"head"
        assert os.pread(fd, 6, 4 << 20) == b"middle"
        assert os.pread(fd, 4, size - 4) == b"tail"
        assert os.pread(fd, 100, 1 << 20) == bytes(100)
        # A dense copy would allocate all 8 MiB (16384 blocks of 512 bytes).
        assert st.st_blocks * 512 < 1 << 20
    finally:
        os.close(fd)
    # The copy is independent: writing it does not change the mirror until installed.
    fd, copy2 = mirror.stage_copy("sparse")
    os.pwrite(fd, b"HEAD", 0)
    os.close(fd)
    assert read(mirror, "sparse")[:4] == b"head"
    mirror.discard_staged(copy2)
    mirror.discard_staged(copy)


def test_stage_copy_without_copy_file_range_falls_back_to_read_write(
    mirror: Mirror, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(3 << 20)
    put(mirror, "f", data)

    def no_copy_range(*args: object) -> int:
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", no_copy_range)
    fd, staged = mirror.stage_copy("f")
    try:
        assert os.pread(fd, len(data) + 1, 0) == data
    finally:
        os.close(fd)
        mirror.discard_staged(staged)


def test_stage_copy_refuses_what_is_not_a_regular_file(mirror: Mirror, outside: Path) -> None:
    mirror.symlink("l", str(outside / "passwd"), LINK_ATTRS)
    mirror.mkdir("d", DIR_ATTRS)
    with pytest.raises(FileNotFoundError):
        mirror.stage_copy("missing")
    with pytest.raises(PathRefused):
        mirror.stage_copy("l")
    with pytest.raises(PathRefused):
        mirror.stage_copy("d")
    assert os.listdir(mirror.staging_dir) == []


def test_stage_copy_keeps_xattrs(mirror: Mirror) -> None:
    if not xattrs_supported(mirror.staging_dir):
        pytest.skip("no user xattrs on this file system")
    put(mirror, "f", b"data", Attrs(mode=0o644, mtime_ns=NS,
                                    xattrs={b"user.k": b"v", ODD_XATTR: b"odd"}))
    fd, staged = mirror.stage_copy("f")
    try:
        assert sorted(map(os.fsencode, os.listxattr(fd))) == [b"user.k", ODD_XATTR]
        assert os.getxattr(fd, "user.k") == b"v"
        assert os.getxattr(fd, ODD_XATTR) == b"odd"
    finally:
        os.close(fd)
        mirror.discard_staged(staged)


# -- mkdir and symlink --------------------------------------------------------------------


def test_mkdir_new_and_existing(mirror: Mirror) -> None:
    mirror.mkdir("a/b", DIR_ATTRS)
    st = (mirror.root / "a/b").lstat()
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o750
    assert st.st_mtime_ns == NS
    put(mirror, "a/b/kept", b"k")
    mirror.mkdir("a/b", Attrs(mode=stat.S_IFDIR | 0o700, mtime_ns=NS + 1))
    st = (mirror.root / "a/b").lstat()
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_mtime_ns == NS + 1
    assert (mirror.root / "a/b/kept").read_bytes() == b"k"


@pytest.mark.parametrize("existing", ["file", "symlink_dir"])
def test_mkdir_replaces_a_non_directory(mirror: Mirror, outside: Path, existing: str) -> None:
    if existing == "file":
        put(mirror, "p", b"old")
    else:
        mirror.symlink("p", str(outside), LINK_ATTRS)
    before = snapshot(outside)
    mirror.mkdir("p", DIR_ATTRS)
    st = (mirror.root / "p").lstat()
    assert stat.S_ISDIR(st.st_mode)
    assert os.listdir(mirror.root / "p") == []
    assert snapshot(outside) == before


@pytest.mark.parametrize("target", ["/etc/passwd", "../../../../etc", "rel/x", "a b", "\\"])
def test_symlink_target_is_stored_verbatim_and_not_followed(
    mirror: Mirror, target: str
) -> None:
    mirror.symlink("d/l", target, LINK_ATTRS)
    p = mirror.root / "d/l"
    assert os.readlink(p) == target
    assert p.lstat().st_mtime_ns == NS


@pytest.mark.parametrize("existing", ["file", "dir", "symlink"])
def test_symlink_replaces_what_is_there(mirror: Mirror, outside: Path, existing: str) -> None:
    if existing == "file":
        put(mirror, "p", b"old")
    elif existing == "dir":
        put(mirror, "p/f", b"old")
        mirror.symlink("p/out", str(outside), LINK_ATTRS)
    else:
        mirror.symlink("p", str(outside), LINK_ATTRS)
    before = snapshot(outside)
    mirror.symlink("p", "new-target", LINK_ATTRS)
    assert os.readlink(mirror.root / "p") == "new-target"
    assert snapshot(outside) == before
    assert os.listdir(mirror.staging_dir) == []


# -- delete ---------------------------------------------------------------------------------


def test_delete_file_dir_and_missing(mirror: Mirror) -> None:
    put(mirror, "f", b"x")
    put(mirror, "d/e/f", b"x")
    mirror.mkdir("d/empty", DIR_ATTRS)
    mirror.delete("f")
    mirror.delete("d")
    assert os.listdir(mirror.root) == []
    mirror.delete("f")  # missing
    mirror.delete("nodir/f")  # missing parent


def test_delete_of_a_symlink_to_an_outside_dir_leaves_the_target(
    mirror: Mirror, outside: Path
) -> None:
    mirror.symlink("l", str(outside), LINK_ATTRS)
    mirror.mkdir("d", DIR_ATTRS)
    mirror.symlink("d/inner", str(outside), LINK_ATTRS)
    mirror.symlink("d/file", str(outside / "passwd"), LINK_ATTRS)
    before = snapshot(outside)
    mirror.delete("l")
    mirror.delete("d")  # the walk unlinks symlinks inside, never enters them
    assert os.listdir(mirror.root) == []
    assert snapshot(outside) == before


def test_delete_of_a_tree_deeper_than_the_recursion_limit(mirror: Mirror) -> None:
    depth = 1100  # "d/" * 1100 is 2200 bytes: a valid path, deeper than Python recursion
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = depth + 200
    if soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            pytest.skip("fd limit too low for a tree this deep")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    try:
        put(mirror, "/".join(["d"] * depth), b"bottom")
        assert len(list(mirror.walk())) == depth  # depth - 1 directories and the file
        mirror.delete("d")
        assert os.listdir(mirror.root) == []
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        if (mirror.root / "d").exists():
            # pytest's own tmp cleanup (recursive shutil.rmtree) cannot remove this tree.
            subprocess.run(["rm", "-rf", "--", str(mirror.root / "d")], check=True)


# -- rename -----------------------------------------------------------------------------------


def test_rename_file_to_a_new_place_creates_parents(mirror: Mirror) -> None:
    put(mirror, "a", b"A")
    mirror.rename("a", "x/y/b")
    assert mirror.lstat("a") is None
    assert (mirror.root / "x/y/b").read_bytes() == b"A"


@pytest.mark.parametrize(
    ("src_kind", "dst_kind"),
    [
        ("file", "file"),
        ("file", "dir"),
        ("dir", "file"),
        ("dir", "dir"),
        ("symlink", "dir"),
        ("file", "symlink"),
    ],
)
def test_rename_replaces_what_is_at_the_destination(
    mirror: Mirror, outside: Path, src_kind: str, dst_kind: str
) -> None:
    def make(kind: str, p: str) -> None:
        if kind == "file":
            put(mirror, p, b"content of " + p.encode())
        elif kind == "dir":
            put(mirror, f"{p}/inner/f", b"x")
            mirror.symlink(f"{p}/out", str(outside), LINK_ATTRS)
        else:
            mirror.symlink(p, str(outside), LINK_ATTRS)

    make(src_kind, "src")
    make(dst_kind, "dst")
    src_before = (mirror.root / "src").lstat()
    before = snapshot(outside)

    mirror.rename("src", "dst")

    assert mirror.lstat("src") is None
    st = (mirror.root / "dst").lstat()
    assert (st.st_ino, st.st_mode) == (src_before.st_ino, src_before.st_mode)
    if src_kind == "file":
        assert (mirror.root / "dst").read_bytes() == b"content of src"
    if src_kind == "dir":
        assert sorted(os.listdir(mirror.root / "dst")) == ["inner", "out"]
    assert snapshot(outside) == before


def test_rename_of_hard_links_to_one_inode_leaves_one_name(mirror: Mirror) -> None:
    put(mirror, "a", b"same")
    os.link(mirror.root / "a", mirror.root / "b")
    mirror.rename("a", "b")
    assert mirror.lstat("a") is None
    assert (mirror.root / "b").read_bytes() == b"same"


@pytest.mark.parametrize(
    ("src", "dst", "match"),
    [
        ("d", "d/sub", "inside"),
        ("d", "d/sub/deeper", "inside"),
        ("d/sub", "d", "inside"),
        ("d", "d", "onto itself"),
    ],
)
def test_rename_refuses_moves_into_itself(mirror: Mirror, src: str, dst: str, match: str) -> None:
    put(mirror, "d/sub/f", b"x")
    before = snapshot(mirror.root)
    with pytest.raises(PathRefused, match=match):
        mirror.rename(src, dst)
    assert snapshot(mirror.root) == before


def test_rename_of_a_file_onto_itself_changes_nothing(mirror: Mirror) -> None:
    put(mirror, "f", b"x")
    before = snapshot(mirror.root)
    mirror.rename("f", "f")
    assert snapshot(mirror.root) == before


def test_rename_of_a_missing_path(mirror: Mirror) -> None:
    with pytest.raises(FileNotFoundError):
        mirror.rename("missing", "x")
    with pytest.raises(FileNotFoundError):
        mirror.rename("nodir/missing", "x")
    assert os.listdir(mirror.root) == []


# -- attributes ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o644, 0o600, 0o755, 0o4755, 0o2750, 0o1777, 0o000])
def test_set_attrs_mode_and_nanosecond_mtime(mirror: Mirror, mode: int) -> None:
    put(mirror, "f", b"x")
    mirror.set_attrs("f", Attrs(mode=stat.S_IFREG | mode, mtime_ns=NS))
    st = (mirror.root / "f").lstat()
    assert stat.S_IMODE(st.st_mode) == mode
    assert st.st_mtime_ns == NS
    assert st.st_atime_ns == NS


@pytest.mark.parametrize("mtime_ns", [0, 1, -1_000_000_001, 4_102_444_800_000_000_001])
def test_set_attrs_keeps_odd_mtimes_exactly(mirror: Mirror, mtime_ns: int) -> None:
    mirror.mkdir("d", DIR_ATTRS)
    mirror.set_attrs("d", Attrs(mode=stat.S_IFDIR | 0o755, mtime_ns=mtime_ns))
    assert (mirror.root / "d").lstat().st_mtime_ns == mtime_ns


def test_set_attrs_on_a_symlink_never_touches_its_target(mirror: Mirror, outside: Path) -> None:
    mirror.symlink("l", str(outside / "passwd"), LINK_ATTRS)
    before = snapshot(outside)
    mirror.set_attrs("l", Attrs(mode=stat.S_IFLNK | 0o600, mtime_ns=NS + 7, uid=1234, gid=1234))
    assert snapshot(outside) == before
    st = (mirror.root / "l").lstat()
    assert st.st_mtime_ns == NS + 7
    if os.geteuid() == 0:
        assert (st.st_uid, st.st_gid) == (1234, 1234)


def test_set_attrs_of_a_missing_path(mirror: Mirror) -> None:
    with pytest.raises(FileNotFoundError):
        mirror.set_attrs("missing", FILE_ATTRS)
    with pytest.raises(FileNotFoundError):
        mirror.set_attrs("nodir/missing", FILE_ATTRS)
    assert os.listdir(mirror.root) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="ownership is replicated only as root")
@pytest.mark.parametrize(
    ("uid", "gid", "expected"),
    [(1234, 5678, (1234, 5678)), (4321, None, (4321, 0)), (None, 99, (0, 99))],
)
def test_set_attrs_owner_as_root(
    mirror: Mirror, uid: int | None, gid: int | None, expected: tuple[int, int]
) -> None:
    put(mirror, "f", b"x")
    mirror.mkdir("d", DIR_ATTRS)
    for path, mode in (("f", stat.S_IFREG | 0o4755), ("d", stat.S_IFDIR | 0o2755)):
        mirror.set_attrs(path, Attrs(mode=mode, mtime_ns=NS, uid=uid, gid=gid))
        st = (mirror.root / path).lstat()
        assert (st.st_uid, st.st_gid) == expected
        # chown clears set-id bits: the mode must be applied after the owner.
        assert stat.S_IMODE(st.st_mode) == stat.S_IMODE(mode)


def test_set_attrs_fd_owner_as_root_keeps_setuid(mirror: Mirror) -> None:
    if os.geteuid() != 0:
        pytest.skip("ownership is replicated only as root")
    put(mirror, "f", b"x", Attrs(mode=stat.S_IFREG | 0o4755, mtime_ns=NS, uid=77, gid=88))
    st = (mirror.root / "f").lstat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (77, 88, 0o4755)
    assert st.st_mtime_ns == NS


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_xattrs_are_set_and_others_removed(mirror: Mirror, kind: str) -> None:
    if not xattrs_supported(mirror.staging_dir):
        pytest.skip("no user xattrs on this file system")
    mode = stat.S_IFREG | 0o644 if kind == "file" else stat.S_IFDIR | 0o755
    if kind == "file":
        put(mirror, "p", b"x")
    else:
        mirror.mkdir("p", DIR_ATTRS)
    target = mirror.root / "p"

    mirror.set_attrs("p", Attrs(mode, NS, xattrs={b"user.a": b"1", b"user.b": b"\x00\xff",
                                                  ODD_XATTR: b"odd"}))
    assert sorted(map(os.fsencode, os.listxattr(target))) == [b"user.a", b"user.b", ODD_XATTR]
    assert os.getxattr(target, "user.b") == b"\x00\xff"
    assert os.getxattr(target, ODD_XATTR) == b"odd"

    # one whose name is not UTF-8 is removed like any other
    mirror.set_attrs("p", Attrs(mode, NS, xattrs={b"user.b": b"2"}))
    assert os.listxattr(target) == ["user.b"]
    assert os.getxattr(target, "user.b") == b"2"

    mirror.set_attrs("p", Attrs(mode, NS, xattrs=None))  # None: leave them alone
    assert os.listxattr(target) == ["user.b"]

    mirror.set_attrs("p", Attrs(mode, NS, xattrs={}))
    assert os.listxattr(target) == []
    # Setting xattrs must not disturb the mtime, which is set last.
    assert target.lstat().st_mtime_ns == NS


def test_xattrs_on_a_staged_fd(mirror: Mirror) -> None:
    if not xattrs_supported(mirror.staging_dir):
        pytest.skip("no user xattrs on this file system")
    put(mirror, "f", b"x", Attrs(stat.S_IFREG | 0o640, NS, xattrs={b"user.k": b"v"}))
    p = mirror.root / "f"
    assert os.getxattr(p, "user.k") == b"v"
    assert p.lstat().st_mtime_ns == NS


@pytest.mark.parametrize("mode", [0o644, 0o600, 0o755, 0o000, 0o4755, 0o2750, 0o1777])
@pytest.mark.parametrize("owner", [None, "mine", "other"])
def test_a_fresh_staged_file_ends_with_exactly_the_record_attrs(
        mirror: Mirror, mode: int, owner: str | None) -> None:
    ids: tuple[int | None, int | None] = (None, None)
    if owner is not None:
        if os.geteuid() != 0:
            pytest.skip("ownership is replicated only as root")
        ids = (os.geteuid(), os.getegid()) if owner == "mine" else (77, 88)
    attrs = Attrs(stat.S_IFREG | mode, NS, uid=ids[0], gid=ids[1], xattrs={})
    fd, staged = mirror.new_staged()
    try:
        os.write(fd, b"data")
        mirror.set_attrs_fd(fd, attrs, fresh=True)
    finally:
        os.close(fd)
    mirror.install(staged, "f")
    st = (mirror.root / "f").lstat()
    assert (stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (mode, NS)
    if owner is not None:
        assert (st.st_uid, st.st_gid) == ids


def test_fresh_means_the_file_new_staged_just_made(mirror: Mirror) -> None:
    """set_attrs_fd(fresh=True) on any other fd sets everything, as for any file."""
    if os.geteuid() != 0:
        pytest.skip("ownership is replicated only as root")
    mine = Attrs(stat.S_IFREG | 0o640, NS, uid=os.geteuid(), gid=os.getegid(), xattrs={})
    fd1, staged1 = mirror.new_staged()
    fd2, staged2 = mirror.new_staged()
    try:
        os.fchown(fd1, 77, 88)  # as a file not fresh could be
        os.fchown(fd2, 77, 88)
        mirror.set_attrs_fd(fd1, mine, fresh=True)  # not the last new_staged
        mirror.set_attrs_fd(fd2, Attrs(stat.S_IFREG | 0o600, NS), fresh=True)
        mirror.set_attrs_fd(fd2, mine, fresh=True)  # once only
    finally:
        os.close(fd1)
        os.close(fd2)
    mirror.install(staged1, "one")
    mirror.install(staged2, "two")
    for name in ("one", "two"):
        st = (mirror.root / name).stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (mine.uid, mine.gid, 0o640)


def posix_acl(entries: list[tuple[int, int, int]]) -> bytes:
    """A system.posix_acl_* value: version 2, then (tag, perm, id) entries."""
    import struct

    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


@pytest.mark.parametrize("default_acl", [False, True])
def test_a_fresh_staged_file_ends_with_exactly_the_record_xattrs(tmp_path: Path,
                                                                 default_acl: bool) -> None:
    staging = tmp_path / "state" / "staging"
    staging.mkdir(parents=True, mode=0o700)
    if not xattrs_supported(staging):
        pytest.skip("no xattrs here")
    if default_acl:
        # files made in the staging dir inherit it as system.posix_acl_access
        any_id = 0xFFFFFFFF
        os.setxattr(staging, "system.posix_acl_default", posix_acl(
            [(1, 7, any_id), (2, 7, 65534), (4, 5, any_id), (0x10, 7, any_id),
             (0x20, 5, any_id)]))
    with Mirror(tmp_path / "mirror", staging) as m:
        attrs = Attrs(FILE_ATTRS.mode, NS, xattrs={})
        fd, staged = m.new_staged()
        try:
            assert bool(os.listxattr(fd)) == default_acl
            m.set_attrs_fd(fd, attrs, fresh=True)
        finally:
            os.close(fd)
        m.install(staged, "f")
        assert os.listxattr(m.root / "f") == []
        assert stat.S_IMODE((m.root / "f").stat().st_mode) == 0o640


def test_xattrs_skipped_where_unsupported(
    mirror: Mirror, monkeypatch: pytest.MonkeyPatch
) -> None:
    put(mirror, "f", b"x")

    def unsupported(*args: object, **kwargs: object) -> list[str]:
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "listxattr", unsupported)
    mirror.set_attrs("f", Attrs(stat.S_IFREG | 0o600, NS, xattrs={b"user.k": b"v"}))
    st = (mirror.root / "f").lstat()
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_mtime_ns == NS


# -- sync -------------------------------------------------------------------------------------


def test_sync_calls_syncfs_on_the_mirror_file_system(
    mirror: Mirror, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[int, int]] = []

    def fake_syncfs(fd: int) -> int:
        st = os.fstat(fd)
        seen.append((st.st_dev, st.st_ino))
        return 0

    monkeypatch.setattr(mirror_mod, "_SYNCFS", fake_syncfs)
    mirror.sync()
    root = mirror.root.stat()
    assert seen == [(root.st_dev, root.st_ino)]


def test_sync_reports_write_back_errors(mirror: Mirror, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_syncfs(fd: int) -> int:
        ctypes.set_errno(errno.EIO)
        return -1

    monkeypatch.setattr(mirror_mod, "_SYNCFS", failing_syncfs)
    with pytest.raises(OSError) as info:
        mirror.sync()
    assert info.value.errno == errno.EIO


def test_sync_really_syncs(mirror: Mirror) -> None:
    assert mirror_mod._SYNCFS is not None  # glibc has had syncfs since 2.14
    put(mirror, "f", b"x")
    mirror.sync()


# ---- the cache of parent directory fds ------------------------------------------------


def _replace_with_symlink(m: Mirror, outside: Path) -> None:
    m.delete("a")
    m.symlink("a", str(outside), LINK_ATTRS)


def _symlink_over_dir(m: Mirror, outside: Path) -> None:
    m.symlink("a", str(outside), LINK_ATTRS)


def _file_over_dir(m: Mirror, outside: Path) -> None:
    put(m, "a", b"now a file")


def _rename_away_then_link(m: Mirror, outside: Path) -> None:
    m.rename("a", "gone")
    m.symlink("a", str(outside), LINK_ATTRS)


def _rename_other_dir_over(m: Mirror, outside: Path) -> None:
    put(m, "z/b/other", b"z")
    m.rename("z", "a")


@pytest.mark.parametrize("change", [_replace_with_symlink, _symlink_over_dir, _file_over_dir,
                                    _rename_away_then_link])
def test_a_cached_parent_replaced_by_a_non_directory_is_refused(
        mirror: Mirror, outside: Path, change: Callable[[Mirror, Path], None]) -> None:
    put(mirror, "a/b/f", b"1")  # caches the fd of a/b
    before = snapshot(outside)
    change(mirror, outside)
    with pytest.raises(PathRefused):
        put(mirror, "a/b/g", b"2")
    assert not [f for _, _, files in os.walk(mirror.root) for f in files if f == "g"]
    assert snapshot(outside) == before


@pytest.mark.parametrize("change", [_rename_other_dir_over, _rename_away_then_link])
def test_a_cached_parent_that_moved_is_never_written_through(
        mirror: Mirror, outside: Path, change: Callable[[Mirror, Path], None]) -> None:
    put(mirror, "a/b/f", b"1")
    change(mirror, outside)
    if change is _rename_other_dir_over:
        put(mirror, "a/b/g", b"2")
        assert sorted(os.listdir(mirror.root / "a" / "b")) == ["g", "other"]
    else:
        with pytest.raises(PathRefused):
            put(mirror, "a/b/g", b"2")
        assert os.listdir(mirror.root / "gone" / "b") == ["f"]


def test_a_deleted_and_recreated_parent_gets_the_new_directory(mirror: Mirror) -> None:
    put(mirror, "a/b/f", b"1")
    mirror.delete("a/b")
    put(mirror, "a/b/g", b"2")  # must land in the new a/b, not the unlinked old one
    assert os.listdir(mirror.root / "a" / "b") == ["g"]
    assert read(mirror, "a/b/g") == b"2"


def test_the_cache_holds_a_bounded_number_of_fds(mirror: Mirror) -> None:
    base = len(os.listdir("/proc/self/fd"))
    for i in range(mirror_mod.DIR_CACHE_SIZE * 3):
        put(mirror, f"d{i}/f", b"x")
    assert len(os.listdir("/proc/self/fd")) <= base + mirror_mod.DIR_CACHE_SIZE
    mirror.close()
    assert len(os.listdir("/proc/self/fd")) < base
