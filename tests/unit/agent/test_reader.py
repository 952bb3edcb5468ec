"""Tests for replicator.agent.reader: consistent, hole-aware, delta-only file reading."""

from __future__ import annotations

import errno
import os
import random
import time
import tracemalloc
from pathlib import Path

import pytest

from replicator.agent import reader as reader_mod
from replicator.agent.reader import FileReader, FileState, TornRead, read_state
from replicator.core.blocks import (
    block_count,
    block_hash,
    decode_block,
    file_digest,
    zero_hash,
)
from replicator.core.records import Block, Codec

BS = 64 * 1024
MiB = 1 << 20


def _text(n: int, seed: int = 1) -> bytes:
    rng = random.Random(seed)
    words = [b"lorem", b"ipsum", b"dolor", b"sit", b"amet", b"replica", b"\n"]
    out = bytearray()
    while len(out) < n:
        out += rng.choice(words) + b" "
    return bytes(out[:n])


def _hashes(content: bytes, bs: int = BS) -> bytes:
    return b"".join(block_hash(content[i:i + bs]) for i in range(0, len(content), bs))


def _read(path: Path, old: bytes | None = None, chunk_size: int = MiB,
          bs: int = BS) -> tuple[list[list[Block]], FileState, int]:
    with FileReader(path, bs, old, chunk_size=chunk_size) as r:
        chunks = list(r.chunks())
        state = r.finish()
        return chunks, state, r.raw_bytes


def _apply(base: bytes, size: int, blocks: list[Block], bs: int = BS) -> bytes:
    """What the receiver does: patch `base` with the decoded blocks, cut to `size`."""
    out = bytearray(base[:size].ljust(size, b"\0"))
    for b in blocks:
        out[b.index * bs:b.index * bs + b.raw_len] = decode_block(b.codec, b.raw_len, b.data, bs)
    return bytes(out)


def _flat(chunks: list[list[Block]]) -> list[Block]:
    return [b for c in chunks for b in c]


def _check_state(state: FileState, path: Path, content: bytes) -> None:
    st = os.stat(path)
    assert (state.size, state.mtime_ns, state.ctime_ns, state.ino, state.dev, state.mode,
            state.uid, state.gid) == (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino,
                                      st.st_dev, st.st_mode, st.st_uid, st.st_gid)
    assert state.hashes == _hashes(content)
    assert state.digest == file_digest(len(content), state.hashes)


@pytest.fixture()
def sparse(tmp_path: Path) -> tuple[Path, bytes]:
    """A 10-block file with data in blocks 2 and 7 (partially) only; holes elsewhere."""
    path = tmp_path / "sparse"
    size = 10 * BS - 123
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(2 * BS)
        f.write(_text(BS))
        f.seek(7 * BS + 5000)
        f.write(b"tail data" * 100)
    fd = os.open(path, os.O_RDONLY)
    try:
        if os.lseek(fd, 0, os.SEEK_DATA) != 2 * BS:
            pytest.skip("this file system does not keep holes")
    finally:
        os.close(fd)
    return path, path.read_bytes()


def test_holes_are_not_read_and_not_sent_for_new_file(
        sparse: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    path, content = sparse
    requested: list[int] = []
    real = os.pread

    def counting_pread(fd: int, length: int, offset: int) -> bytes:
        data = real(fd, length, offset)
        if length > 1:  # not the one-byte probe for growth past the end
            requested.append(len(data))
        return data

    monkeypatch.setattr(reader_mod.os, "pread", counting_pread)
    chunks, state, raw = _read(path)
    blocks = _flat(chunks)
    assert [b.index for b in blocks] == [2, 7]
    assert raw == 2 * BS
    assert sum(requested) == 2 * BS            # only the two data blocks were read
    _check_state(state, path, content)
    assert state.hashes[0:16] == zero_hash(BS)
    assert _apply(b"", state.size, blocks) == content


def _counting_pread(monkeypatch: pytest.MonkeyPatch, before: object = None) -> list[int]:
    """Counts os.pread calls in the reader (their lengths); `before(n)` runs before call n."""
    lengths: list[int] = []
    real = os.pread

    def pread(fd: int, length: int, offset: int) -> bytes:
        if callable(before):
            before(len(lengths))
        lengths.append(length)
        return real(fd, length, offset)

    monkeypatch.setattr(reader_mod.os, "pread", pread)
    return lengths


@pytest.mark.parametrize("size", [1, 4096, BS, 3 * BS + 7])
def test_a_dense_file_is_read_in_one_call_that_also_looks_past_its_end(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int) -> None:
    path = tmp_path / "f"
    content = _random_file(path, size)
    lengths = _counting_pread(monkeypatch)
    chunks, state, _ = _read(path)
    assert lengths == [size + 1]
    _check_state(state, path, content)
    assert _apply(b"", size, _flat(chunks)) == content


def test_a_file_that_grows_while_read_is_torn(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "f"
    _random_file(path, 5000)

    def grow(n: int) -> None:
        if n == 0:
            with open(path, "ab") as f:
                f.write(b"more")

    _counting_pread(monkeypatch, grow)
    with pytest.raises(TornRead, match="grew past 5000 bytes|changed while read"):
        _read(path)


def test_a_file_ending_in_a_hole_is_probed_past_its_end(
        sparse: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    path, content = sparse
    with open(path, "r+b") as f:
        f.truncate(len(content) + 3 * BS)  # the last blocks: a hole, never read
    lengths = _counting_pread(monkeypatch)
    _, state, _ = _read(path)
    assert lengths[-1] == 1
    _check_state(state, path, path.read_bytes())


def test_hole_becomes_zero_block_when_data_zeroed(sparse: tuple[Path, bytes]) -> None:
    path, _ = sparse
    _, old, _ = _read(path)
    with open(path, "r+b") as f:               # block 2: data blocks that now hold zeros
        f.seek(2 * BS)
        f.write(bytes(BS))
        f.seek(4 * BS)                         # block 4: was a hole, now data
        f.write(b"new")
    chunks, state, _ = _read(path, old.hashes)
    blocks = _flat(chunks)
    assert [b.index for b in blocks] == [2, 4]
    assert blocks[1].codec == Codec.LZ4        # b"new" then zeros: compresses
    assert blocks[0].data == b"" and blocks[0].raw_len == BS
    content = path.read_bytes()
    _check_state(state, path, content)


def _random_file(path: Path, size: int, seed: int = 3) -> bytes:
    content = random.Random(seed).randbytes(size)
    path.write_bytes(content)
    return content


@pytest.mark.parametrize("name, edit, expected", [
    ("two small writes", lambda b: b[:5 * BS + 10] + b"XXXXXXXX" + b[5 * BS + 18:13 * BS]
     + b"Y" + b[13 * BS + 1:], [5, 13]),
    ("no change", lambda b: b, []),
    ("append within last block", lambda b: b + b"more", [19]),
    ("append new blocks", lambda b: b + os.urandom(2 * BS + 7), [19, 20, 21]),
    ("truncate mid-block", lambda b: b[:12 * BS + 100], [12]),
    ("truncate on boundary", lambda b: b[:12 * BS], []),
    ("truncate to empty", lambda b: b"", []),
    ("first byte", lambda b: b"\xff" + b[1:], [0]),
])
def test_only_changed_blocks_are_yielded(tmp_path: Path, name: str, edit: object,
                                         expected: list[int]) -> None:
    path = tmp_path / "f"
    old = _random_file(path, 19 * BS + 500)
    _, before, _ = _read(path)
    assert callable(edit)
    new = edit(old)
    with open(path, "r+b") as f:               # in place, as an application would
        f.write(new)
        f.truncate(len(new))
    chunks, state, raw = _read(path, before.hashes)
    blocks = _flat(chunks)
    assert [b.index for b in blocks] == expected
    assert raw == sum(b.raw_len for b in blocks)
    assert all(chunks)                         # no empty lists
    _check_state(state, path, new)
    assert _apply(old, state.size, blocks) == new


@pytest.mark.parametrize("start", [0, 1, 7, 19, 20])
def test_blocks_below_start_block_are_hashed_not_yielded(tmp_path: Path, start: int) -> None:
    path = tmp_path / "f"
    content = _random_file(path, 19 * BS + 500)
    with FileReader(path, BS, start_block=start, chunk_size=4 * BS) as r:
        chunks = list(r.chunks())
        state = r.finish()
    assert [b.index for b in _flat(chunks)] == list(range(start, 20))
    assert all(chunks)
    _check_state(state, path, content)  # the digest still covers every block


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    path.write_bytes(b"")
    chunks, state, raw = _read(path)
    assert chunks == [] and raw == 0
    assert state.size == 0 and state.hashes == b""
    assert state.digest == file_digest(0, b"")
    assert read_state(path, BS) == state


def test_new_text_file_round_trips_compressed(tmp_path: Path) -> None:
    path = tmp_path / "t"
    content = _text(3 * MiB + 1234)
    path.write_bytes(content)
    chunks, state, raw = _read(path)
    blocks = _flat(chunks)
    assert [b.index for b in blocks] == list(range(block_count(len(content), BS)))
    assert all(b.codec == Codec.LZ4 for b in blocks)
    assert sum(len(b.data) for b in blocks) < raw // 2
    assert _apply(b"", state.size, blocks) == content
    assert read_state(path, BS) == state


@pytest.mark.parametrize("chunk_size, blocks_per_chunk", [
    (MiB, 16), (MiB + BS // 2, 16), (3 * BS, 3), (BS, 1), (BS + BS // 2, 1), (1, 1),
])
def test_chunks_are_bounded(tmp_path: Path, chunk_size: int, blocks_per_chunk: int) -> None:
    path = tmp_path / "f"
    content = _random_file(path, 5 * MiB + 1000)
    chunks, state, raw = _read(path, chunk_size=chunk_size)
    n = block_count(len(content), BS)
    assert len(chunks) == -(-n // blocks_per_chunk)
    for c in chunks:
        assert len(c) <= blocks_per_chunk
        assert sum(b.raw_len for b in c) <= max(chunk_size, BS)
    assert [b.index for b in _flat(chunks)] == list(range(n))
    assert raw == len(content)
    _check_state(state, path, content)


def test_memory_is_bounded_by_the_chunk(tmp_path: Path) -> None:
    path = tmp_path / "f"
    _random_file(path, 32 * MiB)
    tracemalloc.start()
    try:
        with FileReader(path, BS) as r:
            for _ in r.chunks():
                pass
            r.finish()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # the read buffer, the chunk the consumer still holds, the one being built, the
    # hashes: about 3 MiB whatever the file's size, never the 32 MiB file
    assert peak < 4 * MiB, peak


def test_odd_block_size(tmp_path: Path) -> None:
    path = tmp_path / "f"
    content = _text(10_000)
    path.write_bytes(content)
    with FileReader(path, 3000, chunk_size=7000) as r:
        chunks = list(r.chunks())
        state = r.finish()
    assert [len(c) for c in chunks] == [2, 2]
    assert [b.raw_len for b in _flat(chunks)] == [3000, 3000, 3000, 1000]
    assert state.hashes == _hashes(content, 3000)


def _refused(tmp_path: Path) -> dict[str, Path]:
    target = tmp_path / "target"
    target.write_bytes(b"secret")
    (tmp_path / "link").symlink_to(target)
    (tmp_path / "dir").mkdir()
    os.mkfifo(tmp_path / "fifo")
    return {"link": tmp_path / "link", "dir": tmp_path / "dir", "fifo": tmp_path / "fifo",
            "missing": tmp_path / "missing"}


@pytest.mark.parametrize("name, exc, err", [
    ("link", OSError, errno.ELOOP),
    ("dir", IsADirectoryError, errno.EISDIR),
    ("fifo", OSError, errno.EINVAL),            # refused, not opened: opening would block
    ("missing", FileNotFoundError, errno.ENOENT),
])
def test_refuses_what_is_not_a_regular_file(tmp_path: Path, name: str, exc: type[OSError],
                                            err: int) -> None:
    path = _refused(tmp_path)[name]
    with pytest.raises(exc) as ei:
        FileReader(path, BS)
    assert ei.value.errno == err
    with pytest.raises(exc):
        read_state(path, BS)


@pytest.mark.parametrize("errno_, opened", [(errno.EPERM, True), (errno.EACCES, False)])
def test_noatime_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, errno_: int,
                          opened: bool) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"data")
    real = os.open
    calls: list[int] = []

    def fake_open(p: str, flags: int, *a: int) -> int:
        calls.append(flags)
        if flags & os.O_NOATIME or errno_ == errno.EACCES:
            raise PermissionError(errno_, os.strerror(errno_), p)
        return real(p, flags, *a)

    monkeypatch.setattr(reader_mod.os, "open", fake_open)
    if opened:
        assert read_state(path, BS).size == 4
        assert [bool(f & os.O_NOATIME) for f in calls] == [True, False]
        assert all(f & os.O_NOFOLLOW for f in calls)
    else:
        with pytest.raises(PermissionError):
            FileReader(path, BS)
        assert len(calls) == 1


def _backdate(path: Path) -> None:
    # so that a write within the same timestamp tick as the first fstat still moves mtime
    old = time.time_ns() - 10**9
    os.utime(path, ns=(old, old))


def _modify(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(3 * MiB + 10)
        f.write(b"changed")


def _truncate(path: Path) -> None:
    os.truncate(path, MiB + MiB // 2)


def _extend(path: Path) -> None:
    with open(path, "ab") as f:
        f.write(b"more")


@pytest.mark.parametrize("change", [_modify, _truncate, _extend])
def test_change_between_chunks_is_torn(tmp_path: Path, change: object) -> None:
    path = tmp_path / "f"
    _random_file(path, 4 * MiB)
    _backdate(path)
    assert callable(change)
    with FileReader(path, BS) as r:
        it = r.chunks()
        first = next(it)
        assert [b.index for b in first] == list(range(16))
        change(path)
        list(it)
        with pytest.raises(TornRead):
            r.finish()
    read_state(path, BS)                       # read again once it is quiet: fine


def test_short_read_is_torn_even_if_stat_agrees(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # a truncation the final fstat cannot see (e.g. the file was truncated and re-extended
    # within one timestamp tick) must still be caught by the bytes actually read
    path = tmp_path / "f"
    _random_file(path, 3 * MiB)
    real = os.pread

    def short_pread(fd: int, length: int, offset: int) -> bytes:
        if offset >= 2 * MiB:
            return b""
        return real(fd, length, offset)

    monkeypatch.setattr(reader_mod.os, "pread", short_pread)
    with FileReader(path, BS) as r:
        chunks = list(r.chunks())
        assert len(chunks) == 2
        assert r.raw_bytes == 2 * MiB
        with pytest.raises(TornRead, match="short read"):
            r.finish()


def test_finish_before_exhausted_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "f"
    _random_file(path, 2 * MiB)
    with FileReader(path, BS) as r:
        it = r.chunks()
        next(it)
        with pytest.raises(RuntimeError):
            r.finish()


def test_close_is_idempotent_and_exposes_stat(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    r = FileReader(path, BS)
    assert r.stat.st_size == 3 and r.fd >= 0
    r.close()
    r.close()
    assert r.fd == -1


@pytest.mark.skipif(not os.environ.get("REPLICATOR_BENCH"),
                    reason="benchmark: set REPLICATOR_BENCH=1 to run")
@pytest.mark.parametrize("kind", ["random", "text"])
def test_throughput(tmp_path: Path, kind: str) -> None:
    size = 256 * MiB
    path = tmp_path / kind
    with open(path, "wb") as f:
        unit = os.urandom(4 * MiB) if kind == "random" else _text(4 * MiB)
        for i in range(size // len(unit)):
            # vary each unit so that nothing repeats across blocks
            f.write(unit[i:] + unit[:i])
    read_state(path, BS)                       # warm the page cache
    t0 = time.perf_counter()
    state = read_state(path, BS)
    t_hash = time.perf_counter() - t0
    t0 = time.perf_counter()
    wire = 0
    with FileReader(path, BS) as r:
        for chunk in r.chunks():               # dropped at once, as the shipper does
            wire += sum(len(b.data) for b in chunk)
        full = r.finish()
    t_full = time.perf_counter() - t0
    assert full.digest == state.digest and r.raw_bytes == size
    raw = r.raw_bytes
    print(f"\n{kind}: read_state {size / t_hash / 1e6:.0f} MB/s, "
          f"chunks (hash+encode) {size / t_full / 1e6:.0f} MB/s, wire/raw {wire / raw:.3f}")


def test_a_dense_file_is_read_without_looking_for_holes(
        tmp_path: Path, sparse: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    dense = tmp_path / "dense"
    _random_file(dense, 3 * BS + 100)
    seeks: list[int] = []
    real = os.lseek

    def counting_lseek(fd: int, pos: int, how: int) -> int:
        seeks.append(how)
        return real(fd, pos, how)

    monkeypatch.setattr(reader_mod.os, "lseek", counting_lseek)
    state = read_state(dense, BS)
    assert seeks == [] and state.size == 3 * BS + 100
    path, content = sparse                     # a file with holes still asks where they are
    _check_state(read_state(path, BS), path, content)
    assert os.SEEK_DATA in seeks


def test_a_fifo_swapped_in_after_the_callers_lstat_is_refused_without_blocking(
        tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x")
    st = os.lstat(path)               # the scan saw a regular file...
    path.unlink()
    os.mkfifo(path)                   # ...which is a FIFO by the time it is read
    with pytest.raises(OSError, match="not a regular file"):
        FileReader(path, BS, lstat=st)
