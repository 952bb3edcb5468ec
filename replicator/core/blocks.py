"""Blocks and digests: how a file is cut, hashed, compressed and checked.

A file of `size` bytes is cut into `block_count(size, block_size)` fixed-size blocks, the
last one possibly short. Each block is hashed with xxh3-128 (`HASH_SIZE` bytes); a file's
hashes are kept as one `bytes` of concatenated digests (index `i` at `i * HASH_SIZE`),
which is compact and compares fast. The file digest covers the size and every block
hash, so a receiver that recomputes it after applying catches any block lost, reordered
or corrupted on the way, and a truncation that happens to end on a block boundary.

Block payloads travel as ZERO (a hole: nothing on the wire), LZ4 (block format, no stored
size, only when it saves at least 1/8) or RAW. Decoding trusts nothing: every length is
checked against the caller's bound before any memory is allocated for it.

Pure: no I/O, no logging.
"""

from __future__ import annotations

import functools

import lz4.block
import xxhash

from replicator.core.records import Codec
from replicator.errors import ProtocolError

HASH_SIZE = 16                      # xxh3-128 digest bytes
DEFAULT_BLOCK_SIZE = 64 * 1024

# A block is shipped compressed only when lz4 saves at least this fraction: below that the
# receiver's decompression and the CPU spent are not worth the few bytes saved.
COMPRESS_MIN_SAVING_NUM = 1
COMPRESS_MIN_SAVING_DEN = 8

# Bytes compared before the full zero check: almost every non-zero block differs here,
# which keeps the (slow, per-element) memoryview comparison off the common path.
_ZERO_PROBE = 64


def block_hash(data: bytes | bytearray | memoryview) -> bytes:
    """The xxh3-128 digest of one block."""
    return xxhash.xxh3_128_digest(data)


@functools.lru_cache(maxsize=64)
def _zeros(length: int) -> bytes:
    return bytes(length)


@functools.lru_cache(maxsize=64)
def zero_hash(length: int) -> bytes:
    """The hash of `length` zero bytes (a hole block); cached, as few lengths occur."""
    return block_hash(_zeros(length))


def file_digest(size: int, hashes: bytes) -> bytes:
    """xxh3-128 over `size` as 8 little-endian bytes followed by the block hashes."""
    h = xxhash.xxh3_128()
    h.update(size.to_bytes(8, "little"))
    h.update(hashes)
    return h.digest()


def block_count(size: int, block_size: int) -> int:
    """How many blocks a file of `size` bytes has: ceil(size / block_size)."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, not {block_size}")
    return -(-size // block_size)


def block_length(index: int, size: int, block_size: int) -> int:
    """The length of block `index` of a file of `size` bytes; the last one may be short."""
    start = index * block_size
    if index < 0 or start >= size:
        raise IndexError(f"block {index} is outside a file of {size} bytes")
    return min(block_size, size - start)


def is_zero(data: bytes | bytearray | memoryview) -> bool:
    """True if every byte of `data` is zero (an empty buffer counts as zero)."""
    n = len(data)
    probe = min(n, _ZERO_PROBE)
    if data[:probe] != _zeros(probe):
        return False
    if isinstance(data, bytes):
        return data == _zeros(n)            # memcmp
    # memoryview == bytes compares element by element; a copy plus memcmp is ~40x faster
    return bytes(data) == _zeros(n)


def encode_block(data: bytes | bytearray | memoryview,
                 compress: bool = True) -> tuple[Codec, bytes | memoryview]:
    """Choose the wire form of one block: ZERO, LZ4 if `compress` and it saves >= 1/8,
    else RAW. A RAW payload is `data` itself when that cannot change (bytes, or a
    read-only view of bytes), else a copy."""
    if is_zero(data):
        return Codec.ZERO, b""
    if compress:
        n = len(data)
        packed = lz4.block.compress(data, store_size=False)
        if len(packed) * COMPRESS_MIN_SAVING_DEN < n * (COMPRESS_MIN_SAVING_DEN
                                                         - COMPRESS_MIN_SAVING_NUM):
            return Codec.LZ4, packed
    if isinstance(data, bytes) or (isinstance(data, memoryview) and isinstance(data.obj, bytes)):
        return Codec.RAW, data
    return Codec.RAW, bytes(data)


def decode_block(codec: Codec | int, raw_len: int, payload: bytes | memoryview,
                 max_len: int) -> bytes | memoryview:
    """The raw bytes of a block from its wire form; raises ProtocolError if it is invalid.

    Never allocates more than `max_len` bytes, whatever `raw_len` or `payload` claim.
    """
    if raw_len < 0 or raw_len > max_len:
        raise ProtocolError(f"block raw_len {raw_len} outside 0..{max_len}")
    if codec == Codec.RAW:
        if len(payload) != raw_len:
            raise ProtocolError(f"raw block of {len(payload)} bytes, raw_len says {raw_len}")
        return payload
    if codec == Codec.ZERO:
        if payload:
            raise ProtocolError(f"zero block carries {len(payload)} bytes of data")
        return _zeros(raw_len) if raw_len <= DEFAULT_BLOCK_SIZE else bytes(raw_len)
    if codec == Codec.LZ4:
        if raw_len == 0:
            raise ProtocolError("lz4 block with raw_len 0")
        try:
            out = lz4.block.decompress(payload, uncompressed_size=raw_len)
        except lz4.block.LZ4BlockError as e:
            raise ProtocolError(f"corrupt lz4 block: {e}") from None
        if len(out) != raw_len:
            # lz4 treats uncompressed_size as a capacity, so a short result is not an error
            raise ProtocolError(f"lz4 block decodes to {len(out)} bytes, raw_len says {raw_len}")
        return out
    raise ProtocolError(f"unknown block codec {int(codec)}")


def split_hashes(h: bytes) -> list[bytes]:
    """The individual block hashes of a concatenation."""
    if len(h) % HASH_SIZE:
        raise ValueError(f"hash list of {len(h)} bytes is not a multiple of {HASH_SIZE}")
    return [h[i:i + HASH_SIZE] for i in range(0, len(h), HASH_SIZE)]


def hash_at(h: bytes, i: int) -> bytes:
    """Block `i`'s hash in a concatenation; IndexError if there is none."""
    if i < 0 or (i + 1) * HASH_SIZE > len(h):
        raise IndexError(f"no hash {i} in a list of {len(h) // HASH_SIZE}")
    return h[i * HASH_SIZE:(i + 1) * HASH_SIZE]


def changed_blocks(old: bytes, new: bytes) -> list[int]:
    """Indices of `new`'s blocks whose hash differs from `old`'s or that `old` lacks.

    Blocks `old` has beyond the end of `new` (a shrunk file) are not listed: the new size
    says they are gone.
    """
    if len(old) % HASH_SIZE or len(new) % HASH_SIZE:
        raise ValueError("hash lists must be multiples of HASH_SIZE bytes")
    n_new = len(new) // HASH_SIZE
    common = min(len(old), len(new)) // HASH_SIZE
    out: list[int] = []
    if old[:common * HASH_SIZE] != new[:common * HASH_SIZE]:
        for i in range(common):
            s = i * HASH_SIZE
            if old[s:s + HASH_SIZE] != new[s:s + HASH_SIZE]:
                out.append(i)
    out.extend(range(common, n_new))
    return out
