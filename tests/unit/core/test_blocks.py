"""Tests for replicator.core.blocks: hashing, digests, block geometry, codecs, deltas."""

from __future__ import annotations

import os
import random

import lz4.block
import pytest
import xxhash

from replicator.core.blocks import (
    DEFAULT_BLOCK_SIZE,
    HASH_SIZE,
    block_count,
    block_hash,
    block_length,
    changed_blocks,
    decode_block,
    encode_block,
    file_digest,
    hash_at,
    is_zero,
    split_hashes,
    zero_hash,
)
from replicator.core.records import Codec
from replicator.errors import ProtocolError

BS = DEFAULT_BLOCK_SIZE


def _text(n: int) -> bytes:
    rng = random.Random(7)
    words = [b"alpha", b"beta", b"gamma", b"delta", b"replica", b"journal", b"\n"]
    out = bytearray()
    while len(out) < n:
        out += rng.choice(words) + b" "
    return bytes(out[:n])


def _h(i: int) -> bytes:
    """A distinct fake block hash."""
    return i.to_bytes(HASH_SIZE, "big")


def _hs(*ids: int) -> bytes:
    return b"".join(_h(i) for i in ids)


# -- hashes and digests --

@pytest.mark.parametrize("data", [b"", b"a", b"hello world", bytes(BS), os.urandom(BS)])
def test_block_hash_is_xxh3_128(data: bytes) -> None:
    h = block_hash(data)
    assert len(h) == HASH_SIZE
    assert h == xxhash.xxh3_128(data).digest()
    assert block_hash(memoryview(data)) == h
    assert block_hash(bytearray(data)) == h


def test_block_hash_known_value() -> None:
    # pinned: a change of hash function would silently invalidate every index and manifest
    assert block_hash(b"").hex() == "99aa06d3014798d86001c324468d497f"


@pytest.mark.parametrize("length", [0, 1, 4095, 4096, BS - 1, BS])
def test_zero_hash(length: int) -> None:
    assert zero_hash(length) == block_hash(bytes(length))
    assert zero_hash(length) is zero_hash(length)  # cached


@pytest.mark.parametrize("size, hashes", [
    (0, b""),
    (1, _hs(1)),
    (BS, _hs(1)),
    (BS + 1, _hs(1, 2)),
])
def test_file_digest_definition(size: int, hashes: bytes) -> None:
    d = file_digest(size, hashes)
    assert len(d) == HASH_SIZE
    assert d == xxhash.xxh3_128(size.to_bytes(8, "little") + hashes).digest()


def test_file_digest_known_value() -> None:
    assert file_digest(0, b"").hex() == xxhash.xxh3_128(bytes(8)).hexdigest()


@pytest.mark.parametrize("a, b", [
    ((BS, _hs(1)), (BS - 1, _hs(1))),         # same blocks, truncated within the block
    ((BS, _hs(1, 2)), (BS, _hs(2, 1))),       # reordered
    ((2 * BS, _hs(1, 2)), (2 * BS, _hs(1))),  # block lost
    ((0, b""), (1, b"")),
])
def test_file_digest_distinguishes(a: tuple[int, bytes], b: tuple[int, bytes]) -> None:
    assert file_digest(*a) != file_digest(*b)


# -- geometry --

@pytest.mark.parametrize("size, bs, count", [
    (0, BS, 0), (1, BS, 1), (BS - 1, BS, 1), (BS, BS, 1), (BS + 1, BS, 2),
    (10 * BS, BS, 10), (10, 4, 3), (12, 4, 3),
])
def test_block_count(size: int, bs: int, count: int) -> None:
    assert block_count(size, bs) == count


def test_block_count_rejects_bad_block_size() -> None:
    with pytest.raises(ValueError):
        block_count(10, 0)


@pytest.mark.parametrize("index, size, bs, length", [
    (0, 1, BS, 1), (0, BS, BS, BS), (0, BS + 1, BS, BS), (1, BS + 1, BS, 1),
    (2, 10, 4, 2), (1, 10, 4, 4), (2, 12, 4, 4),
])
def test_block_length(index: int, size: int, bs: int, length: int) -> None:
    assert block_length(index, size, bs) == length


@pytest.mark.parametrize("index, size", [(0, 0), (1, BS), (-1, BS), (3, 2 * BS)])
def test_block_length_out_of_range(index: int, size: int) -> None:
    with pytest.raises(IndexError):
        block_length(index, size, BS)


# -- codecs --

def _zero_with_one_byte(pos: int) -> bytes:
    b = bytearray(BS)
    b[pos] = 1
    return bytes(b)


@pytest.mark.parametrize("data, codec", [
    (b"", Codec.ZERO),
    (bytes(BS), Codec.ZERO),
    (bytes(100), Codec.ZERO),
    (_zero_with_one_byte(0), Codec.LZ4),
    (_zero_with_one_byte(BS - 1), Codec.LZ4),     # past the fast probe
    (_text(BS), Codec.LZ4),
    (_text(1000), Codec.LZ4),
    (os.urandom(BS), Codec.RAW),
    (os.urandom(100), Codec.RAW),
    (b"x", Codec.RAW),                              # lz4 output is longer than 1 byte
])
@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview])
def test_encode_decode_round_trip(data: bytes, codec: Codec, wrap: type) -> None:
    given = wrap(data)
    got_codec, payload = encode_block(given)
    assert got_codec == codec
    # a view of immutable bytes travels as it is; anything that could change is copied
    assert isinstance(payload, bytes) or (payload is given and isinstance(given.obj, bytes))
    if codec == Codec.ZERO:
        assert payload == b""
    elif codec == Codec.RAW:
        assert payload == data
    else:
        assert len(payload) * 8 < len(data) * 7
    assert decode_block(got_codec, len(data), payload, BS) == data


@pytest.mark.parametrize("data, codec", [
    (bytes(BS), Codec.ZERO),         # holes stay holes without compression too
    (_text(BS), Codec.RAW),
    (os.urandom(BS), Codec.RAW),
])
def test_encode_without_compression_ships_data_raw(data: bytes, codec: Codec) -> None:
    got_codec, payload = encode_block(memoryview(data), compress=False)
    assert got_codec == codec
    assert bytes(payload) == (b"" if codec == Codec.ZERO else data)
    assert decode_block(got_codec, len(data), payload, BS) == data


def test_raw_payload_of_a_bytes_view_is_not_copied() -> None:
    chunk = os.urandom(2 * BS)
    view = memoryview(chunk)[BS:]
    codec, payload = encode_block(view)
    assert codec == Codec.RAW and payload is view
    mutable = bytearray(chunk)
    codec, payload = encode_block(memoryview(mutable)[BS:])
    mutable[BS] ^= 0xFF                # the caller reuses its buffer: the payload stays
    assert codec == Codec.RAW and payload == chunk[BS:]


def test_encode_compression_threshold() -> None:
    # half random, half zeros compresses to ~50%: LZ4; 7/8 random saves too little: RAW
    half = os.urandom(BS // 2) + bytes(BS // 2)
    assert encode_block(half)[0] == Codec.LZ4
    mostly = os.urandom(BS - BS // 16) + bytes(BS // 16)
    assert encode_block(mostly)[0] == Codec.RAW


@pytest.mark.parametrize("data, zero", [
    (b"", True), (bytes(1), True), (bytes(BS), True), (b"\x00" * 63 + b"\x01", False),
    (b"\x00" * 64 + b"\x01", False), (_zero_with_one_byte(BS // 2), False),
])
@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview])
def test_is_zero(data: bytes, zero: bool, wrap: type) -> None:
    assert is_zero(wrap(data)) is zero


_TEXT = _text(BS)
_LZ4 = lz4.block.compress(_TEXT, store_size=False)


@pytest.mark.parametrize("codec, raw_len, payload, max_len, reason", [
    (Codec.LZ4, BS, b"\xff" * 40, BS, "corrupt lz4"),
    (Codec.LZ4, BS, _LZ4[:-5], BS, "corrupt lz4"),                 # truncated stream
    (Codec.LZ4, BS + 100, _LZ4, 2 * BS, "decodes to"),             # decodes short
    (Codec.LZ4, BS - 100, _LZ4, BS, "corrupt lz4"),                # does not fit raw_len
    (Codec.LZ4, 0, b"", BS, "raw_len 0"),
    (Codec.LZ4, BS + 1, _LZ4, BS, "outside"),                      # oversize
    (Codec.RAW, 10, b"123456789", BS, "raw_len says 10"),
    (Codec.RAW, 9, b"1234567890", BS, "raw_len says 9"),
    (Codec.RAW, BS + 1, bytes(BS + 1), BS, "outside"),
    (Codec.ZERO, 10, b"x", BS, "carries"),
    (Codec.ZERO, 1 << 40, b"", BS, "outside"),                     # never allocated
    (Codec.RAW, -1, b"", BS, "outside"),
    (7, 4, b"abcd", BS, "unknown block codec 7"),
])
def test_decode_rejects(codec: Codec, raw_len: int, payload: bytes, max_len: int,
                        reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason) as ei:
        decode_block(codec, raw_len, payload, max_len)
    assert "\n" not in str(ei.value)


@pytest.mark.parametrize("raw_len", [1, 4096, BS])
def test_decode_zero(raw_len: int) -> None:
    assert decode_block(Codec.ZERO, raw_len, b"", BS) == bytes(raw_len)


# -- hash lists and deltas --

@pytest.mark.parametrize("old, new, changed", [
    (b"", b"", []),
    (b"", _hs(1, 2, 3), [0, 1, 2]),                # new file
    (_hs(1, 2, 3), _hs(1, 2, 3), []),              # unchanged
    (_hs(1, 2, 3), _hs(1, 9, 3), [1]),             # one block modified
    (_hs(1, 2, 3), _hs(9, 2, 8), [0, 2]),
    (_hs(1, 2), _hs(1, 2, 3, 4), [2, 3]),          # grown
    (_hs(1, 2), _hs(1, 7, 3), [1, 2]),             # grown with the old last block changed
    (_hs(1, 2, 3, 4), _hs(1, 2), []),              # shrunk: the size says the rest is gone
    (_hs(1, 2, 3, 4), _hs(1, 5), [1]),             # shrunk, new last block differs
    (_hs(1, 2, 3), b"", []),                       # emptied
])
def test_changed_blocks(old: bytes, new: bytes, changed: list[int]) -> None:
    assert changed_blocks(old, new) == changed


def test_changed_blocks_rejects_ragged() -> None:
    with pytest.raises(ValueError):
        changed_blocks(b"x" * 15, _hs(1))


def test_split_hashes_and_hash_at() -> None:
    h = _hs(5, 6, 7)
    assert split_hashes(h) == [_h(5), _h(6), _h(7)]
    assert split_hashes(b"") == []
    assert [hash_at(h, i) for i in range(3)] == [_h(5), _h(6), _h(7)]
    for bad in (-1, 3):
        with pytest.raises(IndexError):
            hash_at(h, bad)
    with pytest.raises(ValueError):
        split_hashes(h[:-1])
