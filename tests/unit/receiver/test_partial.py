"""The partial store: what a big file broken off part way leaves on disk for a restart.

A real Mirror and staged file in tmp_path. The end-to-end paths (session, restart,
recovery) are in test_staged; here, the store's own rules: saves never go backwards, a
save in the store's thread that was overtaken writes nothing, and load checks everything.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from replicator.core.blocks import HASH_SIZE, block_hash
from replicator.core.records import Attrs, Base, Header, Op
from replicator.receiver import partial as partial_mod
from replicator.receiver.mirror import Mirror
from replicator.receiver.partial import RECORD_NAME, PartialStore, new_hashes

BS = 4096
BLOCKS = 40
HEADER = Header(Op.FILE, "dir/big", attrs=Attrs(0o100644, 1_700_000_000_123_456_789),
                size=BLOCKS * BS - 100, base=Base.EMPTY, block_size=BS)


class Staged:
    """A staged file written block by block, as the session writes it."""

    def __init__(self, mirror: Mirror, lsn: int = 7) -> None:
        self.fd, self.path = mirror.new_incoming(lsn)
        self.hashes = new_hashes(HEADER)
        self.upto = 0

    def write(self, n: int) -> None:
        for i in range(self.upto, self.upto + n):
            data = bytes([i % 251 + 1]) * BS
            os.pwrite(self.fd, data, i * BS)
            self.hashes[i * HASH_SIZE:(i + 1) * HASH_SIZE] = block_hash(data)
        self.upto += n

    def save(self, store: PartialStore, *, soon: bool = False) -> None:
        call = store.save_soon if soon else store.save
        call(7, HEADER, self.fd, self.path, self.hashes, self.upto)


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[Mirror]:
    m = Mirror(tmp_path / "mirror", tmp_path / "staging")
    yield m
    m.close()


@pytest.fixture
def store(tmp_path: Path, mirror: Mirror) -> Iterator[PartialStore]:
    s = PartialStore(tmp_path / "partial", mirror, "src/ds")
    yield s
    s.close()


def reload(tmp_path: Path, mirror: Mirror, next_lsn: int = 7) -> tuple[int, bytes] | None:
    """(blocks, hashes) of what a restarted receiver finds, or None."""
    s = PartialStore(tmp_path / "partial", mirror, "src/ds")
    p = s.load(next_lsn)
    if p is None:
        return None
    p.close()
    return p.blocks, bytes(p.hashes[:p.blocks * HASH_SIZE])


@pytest.mark.parametrize("steps", [[3], [3, 5], [1, 1, 1, 30], [BLOCKS]])
def test_saves_add_up_and_load_back(tmp_path: Path, mirror: Mirror, store: PartialStore,
                                    steps: list[int]) -> None:
    f = Staged(mirror)
    for n in steps:
        f.write(n)
        f.save(store)
    assert store.saved_blocks(f.path) == f.upto
    assert reload(tmp_path, mirror) == (f.upto, bytes(f.hashes[:f.upto * HASH_SIZE]))


def test_a_save_never_goes_backwards(tmp_path: Path, mirror: Mirror,
                                     store: PartialStore) -> None:
    f = Staged(mirror)
    f.write(10)
    f.save(store)
    f.upto = 4  # an older view of the same file
    f.save(store)
    f.save(store, soon=True)
    store.wait()
    assert store.saved_blocks(f.path) == 10
    got = reload(tmp_path, mirror)
    assert got is not None and got[0] == 10


class _GatedSync:
    """os.fdatasync in the store's thread waits for `go` (elsewhere it passes): the save
    there is held at its slow step while the test changes the store."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.go = threading.Event()
        self.real = os.fdatasync

    def __call__(self, fd: int) -> None:
        if threading.current_thread().name.startswith("save "):
            self.entered.set()
            assert self.go.wait(10)
        self.real(fd)


OVERTAKERS = {
    "forgotten": lambda store, f: store.forget(f.path),
    "another record kept only": lambda store, f: store.keep_only("other"),
    "saved further at once": lambda store, f: (f.write(5), f.save(store)),
}


@pytest.mark.parametrize("overtake", OVERTAKERS.values(), ids=OVERTAKERS.keys())
def test_a_save_in_the_thread_that_was_overtaken_writes_nothing(
        tmp_path: Path, mirror: Mirror, store: PartialStore,
        monkeypatch: pytest.MonkeyPatch, overtake) -> None:  # type: ignore[no-untyped-def]
    f = Staged(mirror)
    f.write(13)
    gate = _GatedSync()
    monkeypatch.setattr(partial_mod.os, "fdatasync", gate)
    f.save(store, soon=True)                 # 13 blocks, held at the staged file's sync
    assert gate.entered.wait(10)
    overtake(store, f)
    gate.go.set()
    store.wait()
    got = reload(tmp_path, mirror)
    if f.upto == 18:                          # saved further: the late save did not undo it
        assert got is not None and got[0] == 18
    else:                                     # forgotten: the late save brought nothing back
        assert got is None
        assert not (tmp_path / "partial" / RECORD_NAME).exists()
