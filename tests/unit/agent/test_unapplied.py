"""Unapplied against the obvious model (a list scanned on every question)."""

from __future__ import annotations

import random

import pytest

from replicator.agent.unapplied import Unapplied


class Model:
    def __init__(self) -> None:
        self.records: list[tuple[int, float, int]] = []

    def oldest_after(self, lsn: int) -> float:
        return min((fs for n, fs, _ in self.records if n > lsn and fs), default=0.0)


def check(u: Unapplied, m: Model) -> None:
    assert len(u) == len(m.records)
    assert u.bytes == sum(b for _, _, b in m.records)
    lsns = [n for n, _, _ in m.records] or [0]
    for probe in {0, lsns[0] - 1, *lsns, lsns[-1] + 1}:
        assert u.oldest_after(probe) == m.oldest_after(probe), probe


@pytest.mark.parametrize("seed", range(20))
def test_matches_the_model_under_random_operations(seed: int) -> None:
    rng = random.Random(seed)
    u, m = Unapplied(), Model()
    next_lsn, applied = 1, 0
    for _ in range(3000):
        op = rng.random()
        if op < 0.6:
            # first-seen times mostly rise with the LSN, but not always (a rescan's
            # records carry the rescan's start), and 0 means unknown
            fs = rng.choice([0.0, float(rng.randrange(100)), float(next_lsn)])
            raw = rng.randrange(1000)
            u.add(next_lsn, fs, raw)
            m.records.append((next_lsn, fs, raw))
            next_lsn += 1
        elif op < 0.95:
            applied = rng.randrange(applied, next_lsn)
            assert u.drop_through(applied) == [fs for n, fs, _ in m.records if n <= applied and fs]
            m.records = [r for r in m.records if r[0] > applied]
        else:
            through = rng.randrange(applied, next_lsn)
            u.keep(applied, through)
            m.records = [r for r in m.records if applied < r[0] <= through]
            next_lsn = through + 1
        check(u, m)


@pytest.mark.parametrize("records, after, expected", [
    ([], 0, 0.0),
    ([(1, 5.0, 1)], 0, 5.0),
    ([(1, 5.0, 1)], 1, 0.0),
    ([(1, 5.0, 1), (2, 3.0, 1), (3, 4.0, 1)], 0, 3.0),
    ([(1, 5.0, 1), (2, 3.0, 1), (3, 4.0, 1)], 2, 4.0),
    ([(1, 0.0, 1), (2, 0.0, 1)], 0, 0.0),             # unknown times are no times
    ([(1, 2.0, 1), (2, 0.0, 1), (3, 9.0, 1)], 1, 9.0),
])
def test_oldest_after(records: list[tuple[int, float, int]], after: int,
                      expected: float) -> None:
    u = Unapplied()
    for r in records:
        u.add(*r)
    assert u.oldest_after(after) == expected


def test_lsns_must_rise() -> None:
    u = Unapplied()
    u.add(5, 1.0, 0)
    with pytest.raises(ValueError):
        u.add(5, 1.0, 0)


def test_a_long_queue_stays_compact() -> None:
    u = Unapplied()
    for lsn in range(1, 100_001):
        u.add(lsn, float(lsn), 1)
        if lsn % 10 == 0:
            u.drop_through(lsn - 5)
    assert len(u) == 5 and u.bytes == 5
    assert len(u._lsns) - u._head == 5 and len(u._lsns) < 10_000
