"""Seeded test data: the big file (half random, half text-like), the small-file tree, and
the scattered 4 KiB writes of the resync benchmark.

Every 64 KiB block of the big file is distinct, so neither tool can win by deduplicating
repeated blocks; the text half compresses about as well as prose does under lz4 (~0.55),
the random half not at all.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

BLOCK_SIZE = 64 * 1024  # replicator's block size: what "touched blocks" is counted in
WRITE_SIZE = 4096
CHUNK = 1024 * 1024  # write the big file a MiB at a time
VOCABULARY = 5000
TEXT_BASE_WORDS = 900_000  # ~6 MiB of text to cut blocks from
LETTERS = "etaoinshrdlucmfwypvbgkjqxz"  # by English frequency


def text_base(rng: random.Random) -> bytes:
    """Some MiB of word salad with a Zipf-like word distribution, lines of ~72 columns."""
    words = ["".join(rng.choices(LETTERS, weights=range(26, 0, -1), k=rng.randint(2, 9)))
             for _ in range(VOCABULARY)]
    weights = [1 / (rank + 1) for rank in range(VOCABULARY)]
    chosen = rng.choices(words, weights=weights, k=TEXT_BASE_WORDS)
    lines = [" ".join(chosen[i:i + 12]) for i in range(0, len(chosen), 12)]
    return "\n".join(lines).encode()


def text_block(rng: random.Random, base: bytes, index: int, size: int) -> bytes:
    """`size` bytes of text, unique to `index`: a numbered header, then a random cut of base."""
    head = f"{index:012d} ".encode()
    start = rng.randrange(len(base) - size)
    return (head + base[start:start + size])[:size]


def make_big_file(path: Path, size: int, seed: int) -> None:
    """Write `size` bytes: the first half random, the second half text-like."""
    rng = random.Random(seed)
    base = text_base(rng)
    half = size // 2
    with open(path, "wb") as f:
        done = 0
        while done < half:
            n = min(CHUNK, half - done)
            f.write(rng.randbytes(n))
            done += n
        index = 0
        while done < size:
            n = min(BLOCK_SIZE, size - done)
            f.write(text_block(rng, base, index, n))
            index += 1
            done += n


def make_small_tree(root: Path, count: int, dirs: int, size: int, seed: int) -> int:
    """`count` text files of `size` bytes spread evenly over `dirs` directories.
    Returns the total number of bytes written."""
    rng = random.Random(seed)
    base = text_base(rng)
    for d in range(dirs):
        (root / f"d{d:03d}").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (root / f"d{i % dirs:03d}" / f"f{i:05d}.txt").write_bytes(
            text_block(rng, base, i, size))
    return count * size


def scatter_offsets(file_size: int, fraction: float, seed: int,
                    write_size: int = WRITE_SIZE) -> list[int]:
    """Distinct write_size-aligned offsets covering `fraction` of the file, sorted."""
    slots = file_size // write_size
    n = max(1, round(file_size * fraction / write_size))
    rng = random.Random(seed)
    return sorted(i * write_size for i in rng.sample(range(slots), n))


def scatter_writes(path: Path, fraction: float, seed: int,
                   write_size: int = WRITE_SIZE) -> list[int]:
    """Overwrite `fraction` of the file in place with random write_size writes at seeded
    random offsets (the size stays the same, the mtime moves). Returns the offsets."""
    offsets = scatter_offsets(path.stat().st_size, fraction, seed, write_size)
    rng = random.Random(seed ^ 0x5EED)
    fd = os.open(path, os.O_WRONLY)
    try:
        for off in offsets:
            os.pwrite(fd, rng.randbytes(write_size), off)
    finally:
        os.close(fd)
    return offsets


def touched_blocks(offsets: list[int], write_size: int = WRITE_SIZE,
                   block_size: int = BLOCK_SIZE) -> int:
    """How many distinct block_size blocks the writes at `offsets` touch."""
    blocks: set[int] = set()
    for off in offsets:
        blocks.update(range(off // block_size, (off + write_size - 1) // block_size + 1))
    return len(blocks)
