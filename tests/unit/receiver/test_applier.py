"""The applier on a real journal, mirror and manifest in tmp_path.

Records are built as the agent builds them (blocks, hashes, digests from core.blocks), so
every test also checks that both sides agree on block hashing. The crash tests kill a child
process with SIGKILL at chosen points of an apply and check that recovery ends exactly where
an uninterrupted apply ends.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from replicator.core.blocks import (
    block_count,
    block_hash,
    changed_blocks,
    encode_block,
    file_digest,
)
from replicator.core.records import Attrs, Base, Block, Codec, End, Header, Op, Record
from replicator.receiver.applier import Applier, ApplyError
from replicator.receiver.journal import EntryKind, Journal
from replicator.receiver.manifest import Manifest, ManifestEntry
from replicator.receiver.mirror import Mirror
from replicator.receiver.syscalls import Calls, HeldCalls
from replicator.wire.convert import encode_frame

BS = 4096
T0 = 1_700_000_000_123_456_789  # mtimes with all nine nanosecond digits set
FILE = stat.S_IFREG
DIR = stat.S_IFDIR
LINK = stat.S_IFLNK


# ---- records, built as the agent builds them -----------------------------------------


def hashes_of(data: bytes, bs: int = BS) -> bytes:
    return b"".join(block_hash(data[i * bs:(i + 1) * bs])
                    for i in range(block_count(len(data), bs)))


def digest_of(data: bytes, bs: int = BS) -> bytes:
    return file_digest(len(data), hashes_of(data, bs))


def blocks_of(data: bytes, indexes: list[int], bs: int = BS, *,
              holes: bool = True) -> list[Block]:
    out = []
    for i in indexes:
        chunk = data[i * bs:(i + 1) * bs]
        codec, payload = encode_block(chunk)
        if codec is Codec.ZERO and holes:
            continue  # a new file: holes are not sent at all
        out.append(Block(i, codec, len(chunk), payload))
    return out


def new_file(lsn: int, path: str, data: bytes, *, mode: int = 0o644, mtime: int = T0,
             bs: int = BS, seen: float = 0.0) -> Record:
    h = Header(Op.FILE, path, attrs=Attrs(FILE | mode, mtime), size=len(data),
               base=Base.EMPTY, block_size=bs, first_seen=seen)
    return Record(lsn, h, blocks_of(data, list(range(block_count(len(data), bs))), bs),
                  End(digest_of(data, bs)))


def patch(lsn: int, path: str, old: bytes, new: bytes, *, mode: int = 0o644,
          mtime: int = T0, bs: int = BS, omit: tuple[int, ...] = ()) -> Record:
    h = Header(Op.FILE, path, attrs=Attrs(FILE | mode, mtime), size=len(new),
               base=Base.PREVIOUS, base_digest=digest_of(old, bs), block_size=bs)
    changed = [i for i in changed_blocks(hashes_of(old, bs), hashes_of(new, bs))
               if i not in omit]
    return Record(lsn, h, blocks_of(new, changed, bs, holes=False), End(digest_of(new, bs)))


def mkdir(lsn: int, path: str, *, mode: int = 0o755, mtime: int = T0) -> Record:
    return Record(lsn, Header(Op.MKDIR, path, attrs=Attrs(DIR | mode, mtime)))


def symlink(lsn: int, path: str, target: str, mtime: int = T0) -> Record:
    return Record(lsn, Header(Op.SYMLINK, path, target=target, attrs=Attrs(LINK | 0o777, mtime)))


def setattr_(lsn: int, path: str, mode: int, mtime: int) -> Record:
    return Record(lsn, Header(Op.SETATTR, path, attrs=Attrs(mode, mtime)))


def delete(lsn: int, path: str) -> Record:
    return Record(lsn, Header(Op.DELETE, path))


def rename(lsn: int, path: str, new_path: str) -> Record:
    return Record(lsn, Header(Op.RENAME, path, new_path=new_path))


def aborted(r: Record) -> Record:
    return Record(r.lsn, r.header, r.blocks, End(r.end.digest, aborted=True))


KINDS = {Header: EntryKind.HEADER, Block: EntryKind.BLOCK, End: EntryKind.END}


def journal_records(journal: Journal, records: list[Record]) -> None:
    for r in records:
        for f in r.frames():
            journal.append(f.lsn, KINDS[type(f.body)], encode_frame(f))
    journal.sync()


def data(n: int, seed: int = 1) -> bytes:
    """Incompressible-ish test data of n bytes, different per seed."""
    out = bytearray()
    i = 0
    while len(out) < n:
        out += block_hash(b"%d/%d" % (seed, i))
        i += 1
    return bytes(out[:n])


# ---- environment ----------------------------------------------------------------------


COPY = 1 << 62   # no file is that big: every patch goes through a copy
IN_PLACE = 0     # every patch is applied in place


@dataclass
class Env:
    root: Path
    inplace_min: int = COPY
    hold_lock: bool = False  # the mirror's quick calls keep the interpreter lock (syscalls)

    def __post_init__(self) -> None:
        self.state = self.root / "state"
        self.mirror_dir = self.root / "mirror"
        self.outside = self.root / "outside"
        self.outside.mkdir(parents=True, exist_ok=True)
        self.open()

    def open(self) -> None:
        self.manifest = Manifest(self.state / "manifest.db")
        self.journal = Journal(self.state / "journal")
        self.journal.open(self.manifest.applied_lsn)
        self.mirror = Mirror(self.mirror_dir, self.state / "staging",
                             HeldCalls() if self.hold_lock else Calls())
        self.applier = Applier(self.journal, self.mirror, self.manifest, self.state / "keep",
                               label="src/ds", inplace_min_bytes=self.inplace_min)

    def close(self) -> None:
        self.journal.close()
        self.mirror.close()
        self.manifest.close()

    def reopen(self) -> None:
        self.close()
        self.open()

    def add(self, *records: Record) -> None:
        journal_records(self.journal, list(records))

    def apply(self, **kw: float) -> int:
        """Applies everything flushed, group after group, as the dataset's loop does."""
        target = self.journal.flushed_lsn
        deadline = time.monotonic() + 30
        while self.applier.applied_lsn < target:
            assert time.monotonic() < deadline
            self.applier.apply_upto(target, **kw)  # type: ignore[arg-type]
        return self.applier.applied_lsn

    def path(self, rel: str) -> Path:
        return self.mirror_dir / rel

    def read(self, rel: str) -> bytes:
        return self.path(rel).read_bytes()


@pytest.fixture(params=[False, True], ids=["calls", "held-calls"])
def env(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Env]:
    e = Env(tmp_path, hold_lock=request.param)
    try:
        yield e
    finally:
        e.close()


def tree(top: Path) -> dict[str, tuple[object, ...]]:
    """Everything a mirror shows: kinds, modes, mtimes (not the root's), contents, targets."""
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
    return out


def assert_manifest_matches_mirror(e: Env) -> None:
    """Every manifest entry is in the mirror with its kind, mode and mtime; nothing else is."""
    entries = list(e.manifest.entries())
    assert sorted(tree(e.mirror_dir)) == [x.path for x in entries]
    for x in entries:
        st = e.path(x.path).lstat()
        assert (st.st_mode, st.st_mtime_ns) == (x.mode, x.mtime_ns), x.path
        if x.kind == "file":
            assert digest_of(e.read(x.path)) == x.digest


# ---- single records ---------------------------------------------------------------------


@pytest.mark.parametrize("content", [
    b"",
    b"x",
    data(BS),
    data(3 * BS + 17),
    b"\0" * (2 * BS) + data(BS) + b"\0" * 100,  # sparse: holes are never sent
    b"\0" * (5 * BS),
])
def test_new_file(env: Env, content: bytes) -> None:
    env.add(new_file(1, "dir/f", content, mode=0o640, mtime=T0 + 1))
    assert env.apply() == 1
    st = env.path("dir/f").lstat()
    assert env.read("dir/f") == content
    assert (stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (0o640, T0 + 1)
    e = env.manifest.get("dir/f")
    assert e == ManifestEntry("dir/f", "file", size=len(content), mode=FILE | 0o640,
                              mtime_ns=T0 + 1, digest=digest_of(content),
                              hashes=hashes_of(content))
    assert env.manifest.applied_lsn == 1 and env.applier.error is None
    assert os.listdir(env.state / "keep") == [] and os.listdir(env.state / "staging") == []


def test_sparse_new_file_keeps_its_holes(env: Env) -> None:
    content = b"\0" * (64 * BS) + b"tail"
    env.add(new_file(1, "sparse", content))
    env.apply()
    st = env.path("sparse").stat()
    assert env.read("sparse") == content
    assert st.st_blocks * 512 <= 2 * BS  # only the tail block is allocated


OLD = data(5 * BS + 100, seed=1)


@pytest.mark.parametrize("new, omit", [
    pytest.param(OLD[:BS] + data(BS, 9) + OLD[2 * BS:], (), id="one-block-changed"),
    pytest.param(OLD + data(3 * BS, 8), (), id="grow-across-short-last-block"),
    pytest.param(OLD + b"\0" * (2 * BS), (), id="grow-with-zeros"),
    # a sender that does not resend the old short last block when it only gained zeros:
    # its hash changes all the same, and the applier must compute it from the file
    pytest.param(OLD + b"\0" * 50, (5,), id="grow-last-block-not-sent"),
    pytest.param(OLD[:2 * BS + 5], (), id="shrink-to-short-block"),
    pytest.param(OLD[:2 * BS + 5], (2,), id="shrink-last-block-not-sent"),
    pytest.param(OLD[:3 * BS], (), id="shrink-to-block-boundary"),
    pytest.param(b"", (), id="truncate-to-empty"),
    pytest.param(OLD[:BS] + b"\0" * BS + OLD[2 * BS:], (), id="block-zeroed"),
])
@pytest.mark.parametrize("inplace_min", [COPY, IN_PLACE], ids=["copy", "in-place"])
def test_patch(tmp_path: Path, new: bytes, omit: tuple[int, ...], inplace_min: int) -> None:
    env = Env(tmp_path, inplace_min)
    env.add(new_file(1, "f", OLD))
    env.apply()
    ino = env.path("f").stat().st_ino
    env.add(patch(2, "f", OLD, new, mode=0o600, mtime=T0 + 2, omit=omit))
    assert env.apply() == 2
    assert env.read("f") == new
    assert (env.path("f").stat().st_ino == ino) == (inplace_min == IN_PLACE)
    st = env.path("f").stat()
    assert (stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (0o600, T0 + 2)
    e = env.manifest.get("f")
    assert e is not None and (e.digest, e.hashes, e.size) == (digest_of(new), hashes_of(new),
                                                              len(new))
    assert env.applier.resync_paths == [] and not env.applier.errors
    env.close()


def test_patch_in_place_only_from_the_size_on(tmp_path: Path) -> None:
    small, big = data(2 * BS, seed=40), data(8 * BS, seed=41)
    env = Env(tmp_path, inplace_min=4 * BS)
    env.add(new_file(1, "small", small), new_file(2, "big", big))
    env.apply()
    inos = {p: env.path(p).stat().st_ino for p in ("small", "big")}
    new_small = small[:BS] + b"changed"
    new_big = big[:BS] + b"changed" + big[BS + 7:]
    env.add(patch(3, "small", small, new_small), patch(4, "big", big, new_big))
    env.apply()
    assert env.read("small") == new_small and env.read("big") == new_big
    assert env.path("small").stat().st_ino != inos["small"]   # copied and renamed
    assert env.path("big").stat().st_ino == inos["big"]       # written in place
    assert os.listdir(env.state / "keep") == [] and os.listdir(env.state / "staging") == []
    env.close()


def test_aborted_patch_leaves_the_file_alone_in_place_too(tmp_path: Path) -> None:
    env = Env(tmp_path, IN_PLACE)
    old = data(4 * BS, seed=42)
    new = data(4 * BS, seed=43)
    env.add(new_file(1, "f", old), aborted(patch(2, "f", old, new)), new_file(3, "g", b"g"))
    assert env.apply() == 3
    assert env.read("f") == old and env.applier.error is None
    env.close()


def test_corrupt_block_in_place_removes_the_torn_file_and_asks_for_it(tmp_path: Path) -> None:
    env = Env(tmp_path, IN_PLACE)
    old, new = data(3 * BS, seed=44), data(3 * BS, seed=45)
    r = patch(2, "f", old, new)
    bad = r.blocks[1]
    r.blocks[1] = Block(bad.index, Codec.RAW, bad.raw_len, b"\xff" * bad.raw_len)
    env.add(new_file(1, "f", old), r, new_file(3, "g", b"g"))
    assert env.apply() == 3
    # neither the old file nor the new: it must not stay looking like either
    assert not env.path("f").exists() and env.manifest.get("f") is None
    assert env.applier.resync_paths == ["f"] and env.applier.errors["digest_mismatch"] == 1
    assert env.read("g") == b"g" and env.applier.error is None
    env.add(new_file(4, "f", new))
    env.apply()
    assert env.read("f") == new
    env.close()


def test_a_hard_linked_file_is_patched_through_a_copy(tmp_path: Path) -> None:
    env = Env(tmp_path, IN_PLACE)
    old = data(3 * BS, seed=46)
    new = old[:BS] + b"new" + old[BS + 3:]
    env.add(new_file(1, "f", old))
    env.apply()
    os.link(env.path("f"), env.outside / "other-link")
    env.add(patch(2, "f", old, new))
    env.apply()
    assert env.read("f") == new
    assert (env.outside / "other-link").read_bytes() == old   # never written through
    env.close()


def test_patch_keeps_what_was_not_sent(env: Env) -> None:
    # Only block 1 travels: blocks 0 and 2 must come from the mirror's current file.
    old = data(3 * BS, seed=3)
    new = old[:BS] + data(BS, seed=4) + old[2 * BS:]
    r = patch(2, "f", old, new)
    assert [b.index for b in r.blocks] == [1]
    env.add(new_file(1, "f", old), r)
    env.apply()
    assert env.read("f") == new


def test_mkdir_symlink_setattr_with_ns_mtimes(env: Env) -> None:
    env.add(mkdir(1, "d", mode=0o750, mtime=T0 + 11),
            symlink(2, "d/l", "../nowhere", mtime=T0 + 12),
            new_file(3, "d/f", b"abc", mtime=T0 + 13),
            setattr_(4, "d/f", FILE | 0o600, T0 + 14),
            setattr_(5, "d", DIR | 0o700, T0 + 15))
    env.apply()
    d, link, f = (env.path(p).lstat() for p in ("d", "d/l", "d/f"))
    assert (stat.S_IMODE(d.st_mode), d.st_mtime_ns) == (0o700, T0 + 15)
    assert os.readlink(env.path("d/l")) == "../nowhere" and link.st_mtime_ns == T0 + 12
    assert (stat.S_IMODE(f.st_mode), f.st_mtime_ns) == (0o600, T0 + 14)
    assert env.manifest.get("d/l") == ManifestEntry("d/l", "symlink", size=10,
                                                    mode=LINK | 0o777, mtime_ns=T0 + 12,
                                                    target="../nowhere")
    assert env.manifest.get("d") == ManifestEntry("d", "dir", mode=DIR | 0o700,
                                                  mtime_ns=T0 + 15)
    e = env.manifest.get("d/f")
    assert e is not None and (e.mode, e.mtime_ns, e.digest) == (FILE | 0o600, T0 + 14,
                                                                digest_of(b"abc"))


def test_in_place_change_keeps_the_parent_mtime(env: Env) -> None:
    # On the primary a write into d/f leaves d's mtime alone; here it is a rename into d.
    env.add(mkdir(1, "d", mtime=T0), new_file(2, "d/f", b"v1"),
            mkdir(3, "d/sub", mtime=T0 + 5),
            patch(4, "d/f", b"v1", b"v2 longer", mtime=T0 + 9),
            new_file(5, "d/sub/g", b"g"))
    env.apply()
    assert env.read("d/f") == b"v2 longer"
    assert env.path("d").lstat().st_mtime_ns == T0
    assert env.path("d/sub").lstat().st_mtime_ns == T0 + 5


@pytest.mark.parametrize("victim, gone, kept", [
    ("d/f", ["d/f"], ["d", "d/sub/g", "top"]),
    ("d", ["d", "d/f", "d/sub", "d/sub/g"], ["top"]),
    ("d/l", ["d/l"], ["d/f", "lt"]),   # a symlink goes, never its target
    ("missing", [], ["d/f", "top"]),    # deleting what is not there is fine
    ("nodir/missing", [], ["d/f"]),
])
def test_delete(env: Env, victim: str, gone: list[str], kept: list[str]) -> None:
    env.add(mkdir(1, "d", mtime=T0 + 1), new_file(2, "d/f", b"f"), mkdir(3, "d/sub"),
            new_file(4, "d/sub/g", b"g"), new_file(5, "top", b"t"), mkdir(6, "lt"),
            symlink(7, "d/l", "../lt"), delete(8, victim))
    assert env.apply() == 8
    for p in gone:
        assert not os.path.lexists(env.path(p)) and env.manifest.get(p) is None
    for p in kept:
        assert os.path.lexists(env.path(p)) and env.manifest.get(p) is not None
    if victim.startswith("d/"):
        assert env.path("d").lstat().st_mtime_ns == T0 + 1


@pytest.mark.parametrize("src, dst, expect", [
    ("d/f", "d/g", {"d/g": b"f", "d/sub/x": b"x", "e/old": b"old", "top": b"top"}),
    ("d/f", "e/f", {"e/f": b"f", "d/sub/x": b"x", "e/old": b"old", "top": b"top"}),
    ("d/f", "e", {"e": b"f", "d/sub/x": b"x", "top": b"top"}),          # over a tree
    ("d", "e", {"e/f": b"f", "e/sub/x": b"x", "top": b"top"}),          # a tree over a tree
    ("d/sub", "top", {"d/f": b"f", "top/x": b"x", "e/old": b"old"}),    # a tree over a file
])
def test_rename(env: Env, src: str, dst: str, expect: dict[str, bytes]) -> None:
    env.add(mkdir(1, "d", mtime=T0 + 1), new_file(2, "d/f", b"f"), mkdir(3, "d/sub"),
            new_file(4, "d/sub/x", b"x"), mkdir(5, "e", mtime=T0 + 2),
            new_file(6, "e/old", b"old"), new_file(7, "top", b"top"), rename(8, src, dst))
    assert env.apply() == 8
    files = {str(p.relative_to(env.mirror_dir)): p.read_bytes()
             for p in env.mirror_dir.rglob("*") if p.is_file()}
    assert files == expect
    assert {e.path for e in env.manifest.entries() if e.kind == "file"} == set(expect)
    assert_manifest_matches_mirror(env)


def test_rename_replayed_after_it_was_done(env: Env) -> None:
    env.add(new_file(1, "a", b"a"), rename(2, "a", "b"))
    env.apply()
    # the crash case: the mirror shows the rename, the manifest does not
    env.manifest.move_tree("b", "a")
    env.manifest.commit(1)
    env.reopen()
    env.applier.recover()
    assert env.applier.error is None and env.applier.applied_lsn == 2
    assert env.read("b") == b"a" and not env.path("a").exists()
    assert [e.path for e in env.manifest.entries()] == ["b"]


def test_rename_of_a_missing_source_asks_for_the_destination(env: Env) -> None:
    env.add(rename(1, "ghost", "b"), new_file(2, "c", b"c"))
    assert env.apply() == 2
    assert env.applier.resync_paths == ["b"] and env.read("c") == b"c"


def test_aborted_records_change_nothing_but_count(env: Env) -> None:
    env.add(new_file(1, "keep", b"k"), aborted(new_file(2, "f", data(3 * BS))),
            aborted(delete(3, "keep")), aborted(patch(4, "keep", b"k", b"kk")),
            aborted(mkdir(5, "d")))
    assert env.apply() == 5
    assert sorted(os.listdir(env.mirror_dir)) == ["keep"] and env.read("keep") == b"k"
    assert os.listdir(env.state / "staging") == []


def test_patch_with_a_wrong_base_asks_for_a_resync_and_goes_on(env: Env) -> None:
    env.add(new_file(1, "f", b"actual"), patch(2, "f", b"something else", b"new"),
            patch(3, "f", b"new", b"newer"),  # based on the skipped one: resync too
            new_file(4, "g", b"later records still apply"))
    assert env.apply() == 4
    assert env.read("f") == b"actual"  # untouched until the agent sends it whole
    assert env.applier.resync_paths == ["f"]
    assert env.applier.errors["base_mismatch"] == 2 and env.applier.error is None
    assert env.manifest.get("f") is None
    assert env.read("g") == b"later records still apply"
    env.add(new_file(5, "f", b"whole"))
    env.apply()
    assert env.read("f") == b"whole" and env.manifest.get("f") is not None


@pytest.mark.parametrize("base", [Base.EMPTY, Base.PREVIOUS])
def test_corrupt_block_asks_for_a_resync(env: Env, base: Base) -> None:
    old = data(3 * BS, seed=5)
    new = data(3 * BS, seed=6)
    r = new_file(2, "f", new) if base is Base.EMPTY else patch(2, "f", old, new)
    bad = r.blocks[1]
    r.blocks[1] = Block(bad.index, Codec.RAW, bad.raw_len, b"\xff" * bad.raw_len)
    env.add(new_file(1, "f", old), r, new_file(3, "g", b"g"))
    assert env.apply() == 3
    assert env.read("f") == old  # the old version stays until the whole file comes
    assert env.applier.resync_paths == ["f"] and env.applier.errors["digest_mismatch"] == 1
    assert env.read("g") == b"g" and env.applier.error is None
    assert os.listdir(env.state / "staging") == [] and os.listdir(env.state / "keep") == []


@pytest.mark.parametrize("record", [
    new_file(2, "../escape", b"x"),
    new_file(2, "/abs", b"x"),
    new_file(2, "link/passwd", b"x"),     # through a symlink in the mirror
    symlink(2, "link/x", "y"),
    mkdir(2, "link/d"),
    rename(2, "ok", "link/moved"),
    delete(2, "link/sub"),
    setattr_(2, "link/passwd", FILE | 0o777, 0),
])
def test_hostile_path_stops_the_dataset_and_writes_nothing_outside(
        env: Env, record: Record) -> None:
    (env.outside / "passwd").write_bytes(b"root")
    (env.outside / "sub").mkdir()
    before = tree(env.outside)
    env.add(symlink(1, "link", str(env.outside)), record, new_file(3, "after", b"a"))
    with pytest.raises(ApplyError):
        env.apply()
    assert env.applier.applied_lsn == 1 and env.manifest.applied_lsn == 1
    assert env.applier.error and "LSN 2" in env.applier.error
    assert sum(env.applier.errors.values()) == 1
    assert tree(env.outside) == before
    assert not env.path("after").exists()
    with pytest.raises(ApplyError):  # stays stopped: nothing is skipped
        env.applier.apply_upto(3)
    assert env.applier.applied_lsn == 1


def test_os_error_stops_the_dataset(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    real = env.mirror.install

    def install(staged: str, path: str) -> bool:
        if path == "bad":
            raise OSError(errno.EIO, "I/O error", path)
        return real(staged, path)
    monkeypatch.setattr(env.mirror, "install", install)
    env.add(new_file(1, "good", b"g"), new_file(2, "bad", b"b"), new_file(3, "after", b"a"))
    with pytest.raises(ApplyError, match="LSN 2"):
        env.apply()
    assert env.applier.applied_lsn == 1 and env.applier.errors == {"os": 1}
    assert sorted(os.listdir(env.mirror_dir)) == ["good"]
    assert os.listdir(env.state / "staging") == []


@pytest.mark.parametrize("record", [
    setattr_(2, "missing", FILE | 0o600, T0),
    patch(2, "gone", b"g", b"h"),   # the manifest knows it, the mirror lost it
])
def test_missing_in_the_mirror_asks_for_a_resync(env: Env, record: Record) -> None:
    env.add(new_file(1, "gone", b"g"))
    env.apply()
    env.path("gone").unlink()
    env.add(record, new_file(3, "after", b"a"))
    assert env.apply() == 3
    assert env.applier.resync_paths == [record.header.path]
    assert env.applier.errors == {"missing_in_mirror": 1} and env.read("after") == b"a"


def test_groups_respect_max_records_and_report_first_seen(env: Env) -> None:
    seen: list[tuple[int, list[float]]] = []
    env.applier.on_applied = lambda lsn, fs: seen.append((lsn, fs))
    env.add(*(new_file(i, f"f{i}", b"x", seen=100.0 + i) for i in range(1, 8)))
    assert env.applier.apply_upto(7, max_records=3) == 3
    assert env.applier.apply_upto(7, max_records=3) == 6
    assert env.applier.apply_upto(7, max_records=3) == 7
    assert seen == [(3, [101.0, 102.0, 103.0]), (6, [104.0, 105.0, 106.0]), (7, [107.0])]
    assert env.applier.last_applied_at > 0


def test_apply_upto_stops_at_the_flushed_lsn(env: Env) -> None:
    env.add(*(new_file(i, f"f{i}", b"x") for i in range(1, 6)))
    assert env.applier.apply_upto(2) == 2
    assert sorted(os.listdir(env.mirror_dir)) == ["f1", "f2"]
    assert env.manifest.applied_lsn == 2


def test_large_file_streams_in_bounded_memory(env: Env) -> None:
    import tracemalloc

    bs = 64 * 1024
    content = data(bs, seed=7) * 200  # 12.5 MiB
    env.add(new_file(1, "big", content, bs=bs))
    tracemalloc.start()
    try:
        env.apply()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert env.read("big") == content
    assert peak < 2 * 1024 * 1024, peak


# ---- crash and replay -----------------------------------------------------------------

A1 = data(3 * BS + 100, seed=11)
A2 = A1[:BS] + data(BS, seed=12) + A1[2 * BS:] + data(2 * BS, seed=13)
A3 = A2[:3 * BS] + b"A3" + A2[3 * BS + 2:]
B1 = data(2 * BS + 1, seed=14)
B2 = B1[:BS] + b"\0" * 50
X1 = data(BS * 2, seed=15)
X2 = X1[:BS] + b"x"
A4 = A3[:BS] + b"patched" + A3[BS + 7:]
# Each step takes its LSN. Patches are followed, without a commit between, by records that
# replace the patched file with a symlink or a directory: replaying such a patch from the
# mirror's current file is impossible, only its keep link can.
STEPS: list[Callable[[int], Record]] = [
    lambda n: mkdir(n, "d", mtime=T0 + 1),
    lambda n: new_file(n, "d/a", A1, mtime=T0 + 2),
    lambda n: patch(n, "d/a", A1, A2, mtime=T0 + 3),
    lambda n: patch(n, "d/a", A2, A3, mtime=T0 + 4),
    lambda n: symlink(n, "d/l", "a", mtime=T0 + 5),
    lambda n: rename(n, "d/a", "d/b"),
    lambda n: new_file(n, "d/a", B1, mtime=T0 + 7),
    lambda n: patch(n, "d/a", B1, B2, mtime=T0 + 8),
    lambda n: new_file(n, "c", b"\0" * (4 * BS) + b"c", mtime=T0 + 9),
    lambda n: setattr_(n, "d", DIR | 0o750, T0 + 10),
    lambda n: patch(n, "d/b", A3, A4, mtime=T0 + 11),
    lambda n: patch(n, "d/b", A4, A4 + b"more", mtime=T0 + 12),
    lambda n: delete(n, "c"),
    lambda n: delete(n, "d/l"),
    lambda n: new_file(n, "d/c", b"c2", mode=0o600, mtime=T0 + 15),
    lambda n: patch(n, "d/a", B2, B2 + data(BS, seed=16), mtime=T0 + 16),
    lambda n: mkdir(n, "e", mtime=T0 + 17),
    lambda n: new_file(n, "e/x", X1, mtime=T0 + 18),
    lambda n: patch(n, "e/x", X1, X2, mtime=T0 + 19),
    lambda n: patch(n, "e/x", X2, X2 + b"y", mtime=T0 + 20),
    lambda n: rename(n, "e", "f"),
    lambda n: patch(n, "f/x", X2 + b"y", X1[:BS] + b"z", mtime=T0 + 22),
    lambda n: aborted(new_file(n, "z", b"z")),
    lambda n: patch(n, "d/a", b"not the base", b"q"),   # a resync, replayed the same way
    lambda n: setattr_(n, "d/b", FILE | 0o640, T0 + 25),
    lambda n: new_file(n, "d/a", b"whole again", mtime=T0 + 26),
    lambda n: patch(n, "d/a", b"whole again", b"whole again!", mtime=T0 + 27),
    lambda n: patch(n, "d/a", b"whole again!", b"whole again!!", mtime=T0 + 28),
    lambda n: setattr_(n, "f", DIR | 0o700, T0 + 29),
    lambda n: new_file(n, "g", B1, mtime=T0 + 30),
    lambda n: patch(n, "g", B1, B2, mtime=T0 + 31),
    lambda n: symlink(n, "g", "f/x", mtime=T0 + 32),
    lambda n: new_file(n, "h", X1, mtime=T0 + 33),
    lambda n: patch(n, "h", X1, X2, mtime=T0 + 34),
    lambda n: mkdir(n, "h", mtime=T0 + 35),
    lambda n: new_file(n, "h/inner", b"in", mtime=T0 + 36),
]
CRASH_SEQ = [step(i + 1) for i, step in enumerate(STEPS)]
N = len(CRASH_SEQ)


def state_of(e: Env) -> tuple[dict[str, tuple[object, ...]], list[ManifestEntry]]:
    return tree(e.mirror_dir), list(e.manifest.entries())


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, ...]:
    e = Env(tmp_path_factory.mktemp("reference"))
    try:
        e.add(*CRASH_SEQ)
        assert e.apply() == N
        assert e.applier.error is None
        return state_of(e)
    finally:
        e.close()


def run_child(work: Callable[[], None]) -> int:
    """Runs `work` in a forked child; returns the signal that ended it (0 if it exited)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            work()
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 3
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return os.WTERMSIG(status)
    assert os.WEXITSTATUS(status) == 0, "the child failed before the crash point"
    return 0


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def crash_at_commit(e: Env, durable: int, crash: int) -> Callable[[], None]:
    """Apply up to `durable` (committed), then up to `crash` and die at its commit."""
    def work() -> None:
        e.open()
        while e.applier.applied_lsn < durable:
            e.applier.apply_upto(durable, max_records=durable)
        real = e.manifest.commit

        def commit(applied_lsn: int, **kw: int | None) -> None:
            if applied_lsn >= crash:
                kill_self()
            real(applied_lsn, **kw)
        e.manifest.commit = commit  # type: ignore[method-assign]
        e.applier.apply_upto(crash, max_records=N, max_seconds=60)
    return work


def crash_at_install(e: Env, nth: int) -> Callable[[], None]:
    """Apply everything in one group and die in the middle of the nth install (after
    the staged file and its keep link exist, before the rename), or right after it."""
    def work() -> None:
        e.open()
        calls = 0
        real = e.mirror.install

        def install(staged: str, path: str) -> bool:
            nonlocal calls
            calls += 1
            if calls == nth:
                kill_self()
            replaced_dir = real(staged, path)
            if calls == -nth:
                kill_self()
            return replaced_dir
        e.mirror.install = install  # type: ignore[method-assign]
        e.applier.apply_upto(N, max_records=N, max_seconds=60)
    return work


def crash_in_place(e: Env, nth: int) -> Callable[[], None]:
    """Apply everything in one go and die at the nth block written by an in-place patch,
    after writing it, or just before it when nth is negative."""
    def work() -> None:
        e.open()
        calls = 0
        real = e.mirror.calls.pwrite_all

        def pwrite_all(fd: int, data: bytes, offset: int) -> None:
            nonlocal calls
            if e.applier._in_place:
                calls += 1
                if calls == -nth:
                    kill_self()
                real(fd, data, offset)
                if calls == nth:
                    kill_self()
            else:
                real(fd, data, offset)
        e.mirror.calls.pwrite_all = pwrite_all  # type: ignore[method-assign]
        e.applier.apply_upto(N, max_records=N, max_seconds=60)
    return work


def finish_and_compare(e: Env, reference: tuple[object, ...]) -> None:
    e.open()
    e.applier.recover()
    assert e.applier.error is None
    assert e.applier.applied_lsn == N
    assert state_of(e) == reference
    assert os.listdir(e.state / "keep") == []
    assert os.listdir(e.state / "staging") == []


CRASH_POINTS = sorted({(max(d, 0), k) for k in range(1, N + 1)
                       for d in (0, k // 2, k - 3, k - 2, k - 1)})


@pytest.mark.parametrize("durable, crash", CRASH_POINTS)
def test_crash_before_commit_then_recover(tmp_path: Path, reference: tuple[object, ...],
                                          durable: int, crash: int) -> None:
    e = Env(tmp_path)
    try:
        e.add(*CRASH_SEQ)
        e.close()  # the child opens its own: no SQLite connection crosses a fork
        assert run_child(crash_at_commit(e, durable, crash)) == signal.SIGKILL
        finish_and_compare(e, reference)
    finally:
        e.close()


@pytest.mark.parametrize("nth", [n for i in range(1, 24) for n in (i, -i)])
def test_crash_inside_install_then_recover(tmp_path: Path, reference: tuple[object, ...],
                                           nth: int) -> None:
    e = Env(tmp_path)
    try:
        e.add(*CRASH_SEQ)
        e.close()
        run_child(crash_at_install(e, nth))
        finish_and_compare(e, reference)
    finally:
        e.close()


# A file replaces a directory that holds files (one made explicitly, one only as a
# missing parent); the manifest must end without what was below, whether the replacement
# is applied once or replayed over a mirror that already shows it.
OVER_DIR = [
    mkdir(1, "p"),
    new_file(2, "p/a", b"a"),
    new_file(3, "p/b/c", b"c"),
    new_file(4, "p", b"now a file"),
    new_file(5, "q", b"q"),
]


@pytest.mark.parametrize("crash", [None, 4, 5])
def test_a_file_over_a_directory_leaves_nothing_below_it_in_the_manifest(
        tmp_path: Path, crash: int | None) -> None:
    e = Env(tmp_path)
    try:
        e.add(*OVER_DIR)
        assert e.applier.apply_upto(3) == 3  # p and what is below it are committed first
        if crash is not None:
            e.close()
            # the file is installed, the commit that would record it never happens
            assert run_child(crash_at_commit(e, 3, crash)) == signal.SIGKILL
            # reopened as the receiver's dataset does: the applier before the journal
            e.manifest = Manifest(e.state / "manifest.db")
            e.journal = Journal(e.state / "journal")
            e.mirror = Mirror(e.mirror_dir, e.state / "staging")
            e.applier = Applier(e.journal, e.mirror, e.manifest, e.state / "keep")
            e.journal.open(e.manifest.applied_lsn)
            e.applier.recover()
        else:
            e.apply()
        assert e.applier.applied_lsn == 5 and e.applier.error is None
        assert [x.path for x in e.manifest.entries()] == ["p", "q"]
        assert_manifest_matches_mirror(e)
    finally:
        e.close()


def test_recover_after_a_clean_stop_replays_nothing(env: Env,
                                                    reference: tuple[object, ...]) -> None:
    env.add(*CRASH_SEQ)
    env.apply()
    env.reopen()
    env.applier.recover()
    assert env.applier.applied_lsn == N and state_of(env) == reference


# ---- throughput (REPLICATOR_BENCH=1) -----------------------------------------------------

bench = pytest.mark.skipif(not os.environ.get("REPLICATOR_BENCH"),
                           reason="set REPLICATOR_BENCH=1 to measure apply throughput")


@bench
@pytest.mark.parametrize("whole", [True, False])
def test_throughput_small_files(env: Env, whole: bool) -> None:
    """20,000 new 4 KiB files in 100 directories, as the benchmark's initial sync sends
    them: whole records (one RECORD entry each) or header, block and end entries."""
    import resource

    n = 20_000
    payload = data(4096, seed=21)
    env.add(mkdir(1, "d"))
    records = [new_file(i + 2, f"d/{i // 200}/f{i}", payload) for i in range(n)]
    if whole:
        for r in records:
            env.journal.append(r.lsn, EntryKind.RECORD, encode_frame(r.whole()))
        env.journal.sync()
    else:
        env.add(*records)
    before = resource.getrusage(resource.RUSAGE_SELF)
    t = time.perf_counter()
    env.apply()
    dt = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    print(f"\napply {n} x 4 KiB new files ({'whole' if whole else 'frames'}): {dt:.2f} s, "
          f"{n / dt:.0f} files/s, CPU {cpu:.2f} s ({cpu / n * 1e6:.0f} us/file)")
    assert env.applier.applied_lsn == n + 1 and env.read("d/19/f3999") == payload


@bench
def test_throughput_one_big_file(env: Env) -> None:
    bs = 64 * 1024
    size = 1 << 30
    block = data(bs, seed=22)
    h = Header(Op.FILE, "big", attrs=Attrs(FILE | 0o644, T0), size=size, base=Base.EMPTY,
               block_size=bs)
    n = size // bs
    env.journal.append(1, EntryKind.HEADER, encode_frame(Record(1, h).frames()[0]))
    from replicator.core.records import Frame

    for i in range(n):
        env.journal.append(1, EntryKind.BLOCK,
                           encode_frame(Frame(1, Block(i, Codec.RAW, bs, block))))
    digest = file_digest(size, block_hash(block) * n)
    env.journal.append(1, EntryKind.END, encode_frame(Frame(1, End(digest))))
    env.journal.sync()
    t = time.perf_counter()
    env.apply()
    dt = time.perf_counter() - t
    print(f"\napply one 1 GiB file: {dt:.2f} s, {size / dt / 1e6:.0f} MB/s")
    assert env.applier.error is None and env.path("big").stat().st_size == size


@pytest.mark.parametrize("durable, crash", CRASH_POINTS)
def test_crash_before_commit_with_patches_in_place(tmp_path: Path,
                                                   reference: tuple[object, ...],
                                                   durable: int, crash: int) -> None:
    e = Env(tmp_path, IN_PLACE)
    try:
        e.add(*CRASH_SEQ)
        e.close()
        run_child(crash_at_commit(e, durable, crash))
        finish_and_compare(e, reference)
    finally:
        e.close()


IN_PLACE_WRITES = 17  # blocks that CRASH_SEQ's patches write when all go in place


@pytest.mark.parametrize("nth", [n for i in range(1, IN_PLACE_WRITES + 1) for n in (i, -i)])
def test_crash_inside_an_in_place_patch_then_recover(tmp_path: Path,
                                                     reference: tuple[object, ...],
                                                     nth: int) -> None:
    e = Env(tmp_path, IN_PLACE)
    try:
        e.add(*CRASH_SEQ)
        e.close()
        assert run_child(crash_in_place(e, nth)) == signal.SIGKILL
        finish_and_compare(e, reference)
    finally:
        e.close()
