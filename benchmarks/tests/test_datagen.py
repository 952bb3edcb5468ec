from __future__ import annotations

from pathlib import Path

import lz4.block
import pytest

from benchmarks import datagen
from benchmarks.datagen import BLOCK_SIZE, WRITE_SIZE

MIB = 1 << 20


def _ratio(data: bytes) -> float:
    return len(lz4.block.compress(data, store_size=False)) / len(data)


def test_big_file_is_half_random_half_text_and_reproducible(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    datagen.make_big_file(a, 4 * MIB, seed=1)
    datagen.make_big_file(b, 4 * MIB, seed=1)
    datagen.make_big_file(c, 4 * MIB, seed=2)
    data = a.read_bytes()
    assert len(data) == 4 * MIB
    assert data == b.read_bytes()
    assert data != c.read_bytes()
    assert _ratio(data[:BLOCK_SIZE]) > 0.99  # random: lz4 cannot shrink it
    assert 0.4 < _ratio(data[-BLOCK_SIZE:]) < 0.7  # text-like
    blocks = [data[i:i + BLOCK_SIZE] for i in range(0, len(data), BLOCK_SIZE)]
    assert len(set(blocks)) == len(blocks)  # nothing to deduplicate


def test_small_tree(tmp_path: Path) -> None:
    total = datagen.make_small_tree(tmp_path, count=250, dirs=10, size=4096, seed=3)
    files = sorted(tmp_path.rglob("*.txt"))
    assert total == 250 * 4096
    assert len(files) == 250
    assert len({f.parent for f in files}) == 10
    assert {f.stat().st_size for f in files} == {4096}


@pytest.mark.parametrize("size,fraction,expected", [
    (100 * WRITE_SIZE, 0.01, 1),
    (100 * WRITE_SIZE, 0.10, 10),
    (1024 * MIB, 0.01, 2621),
    (10 * WRITE_SIZE, 0.0001, 1),  # at least one write
])
def test_scatter_offsets_count_alignment_distinct(size: int, fraction: float,
                                                  expected: int) -> None:
    offsets = datagen.scatter_offsets(size, fraction, seed=7)
    assert len(offsets) == expected
    assert len(set(offsets)) == expected
    assert all(o % WRITE_SIZE == 0 and 0 <= o <= size - WRITE_SIZE for o in offsets)
    assert offsets == datagen.scatter_offsets(size, fraction, seed=7)


def test_scatter_writes_change_exactly_those_ranges(tmp_path: Path) -> None:
    path = tmp_path / "f"
    datagen.make_big_file(path, 2 * MIB, seed=1)
    before = path.read_bytes()
    offsets = datagen.scatter_writes(path, 0.05, seed=9)
    after = path.read_bytes()
    assert len(after) == len(before)
    changed = {i for i in range(0, len(after), WRITE_SIZE)
               if after[i:i + WRITE_SIZE] != before[i:i + WRITE_SIZE]}
    assert changed == set(offsets)


@pytest.mark.parametrize("offsets,write_size,expected", [
    ([], WRITE_SIZE, 0),
    ([0], WRITE_SIZE, 1),
    ([0, 4096, 8192], WRITE_SIZE, 1),  # same block
    ([0, BLOCK_SIZE], WRITE_SIZE, 2),
    ([BLOCK_SIZE - 100], WRITE_SIZE, 2),  # straddles a boundary
    ([BLOCK_SIZE - WRITE_SIZE], WRITE_SIZE, 1),  # ends exactly on it
    ([0], 3 * BLOCK_SIZE, 3),
])
def test_touched_blocks(offsets: list[int], write_size: int, expected: int) -> None:
    assert datagen.touched_blocks(offsets, write_size) == expected
