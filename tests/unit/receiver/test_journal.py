"""The receiver's journal: order, durability positions, torn tails, segments, reading."""

from __future__ import annotations

import errno
import os
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest

from replicator.receiver.journal import (
    DEFAULT_SEGMENT_SIZE,
    ENTRY_HEADER_SIZE,
    FILE_HEADER_SIZE,
    MAX_PAYLOAD,
    MIN_SEGMENT_SIZE,
    READ_CHUNK,
    SEGMENT_FREE_DIVISOR,
    Entry,
    EntryKind,
    Journal,
    JournalCorrupt,
    fit_segment_size,
    segment_name,
)

H, B, E, R = EntryKind.HEADER, EntryKind.BLOCK, EntryKind.END, EntryKind.RECORD
Rec = list[tuple[EntryKind, bytes]]


def payload(lsn: int, i: int, size: int) -> bytes:
    """Distinct, position-dependent bytes, so that a misplaced read shows."""
    unit = f"<{lsn}:{i}>".encode()
    return (unit * (size // len(unit) + 1))[:size]


def record(lsn: int, blocks: int = 0, block_size: int = 1000) -> Rec:
    out: Rec = [(H, payload(lsn, -1, 50))]
    out += [(B, payload(lsn, i, block_size)) for i in range(blocks)]
    out.append((E, payload(lsn, -2, 20)))
    return out


def entries_of(lsn: int, rec: Rec) -> list[Entry]:
    return [Entry(lsn, k, p) for k, p in rec]


def append(j: Journal, lsn: int, rec: Rec) -> None:
    for kind, data in rec:
        j.append(lsn, kind, data)


def fill(j: Journal, first: int, recs: list[Rec], *, sync: bool = True) -> list[Entry]:
    want: list[Entry] = []
    for n, rec in enumerate(recs):
        append(j, first + n, rec)
        want += entries_of(first + n, rec)
    if sync:
        j.sync()
    return want


@pytest.fixture
def jdir(tmp_path: Path) -> Path:
    return tmp_path / "journal"


@pytest.fixture
def journal(jdir: Path) -> Iterator[Journal]:
    j = Journal(jdir)
    j.open(0)
    try:
        yield j
    finally:
        j.close()


def reopen(jdir: Path, applied: int = 0, **kw: int) -> Journal:
    j = Journal(jdir, **kw)
    j.open(applied)
    return j


def segments(jdir: Path) -> list[str]:
    return sorted(p.name for p in jdir.iterdir() if p.suffix == ".seg")


def last_segment(jdir: Path) -> Path:
    return jdir / segments(jdir)[-1]


# ---- round trip ------------------------------------------------------------------------


SHAPES: dict[str, list[Rec]] = {
    "one empty record": [record(1)],
    "empty records": [record(i) for i in range(1, 6)],
    "block records": [record(i, blocks=i, block_size=4096) for i in range(1, 5)],
    "mixed, with direct-write payloads": [record(1), record(2, 3, 100_000), record(3),
                                          record(4, 2, 64 << 10), record(5, 1, 0)],
    "empty payloads": [[(H, b""), (B, b""), (E, b"")]],
    "whole records among others": [[(R, payload(1, 0, 300))], record(2, 2), [(R, b"")],
                                   [(R, payload(4, 0, 70_000))], record(5)],
}


@pytest.mark.parametrize("recs", SHAPES.values(), ids=SHAPES.keys())
def test_round_trip_and_reopen(jdir: Path, recs: list[Rec]) -> None:
    j = reopen(jdir)
    assert (j.written_lsn, j.flushed_lsn) == (0, 0)
    want = fill(j, 1, recs, sync=False)
    assert (j.written_lsn, j.flushed_lsn) == (len(recs), 0)
    assert j.sync() == len(recs)
    assert j.flushed_lsn == len(recs)
    assert list(j.entries(1, len(recs))) == want
    j.close()
    j = reopen(jdir)
    assert (j.written_lsn, j.flushed_lsn) == (len(recs), len(recs))
    assert list(j.entries(1, len(recs))) == want
    # and it goes on appending where it stopped
    more = fill(j, len(recs) + 1, [record(len(recs) + 1, 2)])
    assert list(j.entries(1, len(recs) + 1)) == want + more
    j.close()


@pytest.mark.parametrize(("lo", "hi", "expect"), [
    (1, 5, [1, 2, 3, 4, 5]),
    (2, 4, [2, 3, 4]),
    (5, 5, [5]),
    (4, 3, []),
    (0, 2, [1, 2]),
])
def test_entries_of_a_range(journal: Journal, lo: int, hi: int, expect: list[int]) -> None:
    fill(journal, 1, [record(i, 1) for i in range(1, 6)])
    got = list(journal.entries(lo, hi))
    assert [e.lsn for e in got if e.kind is H] == expect
    assert all(e.lsn in expect for e in got)


def test_entries_beyond_flushed_are_refused(journal: Journal) -> None:
    fill(journal, 1, [record(1), record(2)])
    append(journal, 3, record(3))  # written, not flushed
    assert journal.written_lsn == 3
    with pytest.raises(ValueError, match="flushed"):
        journal.entries(1, 3)


def test_close_makes_appended_records_durable(jdir: Path) -> None:
    j = reopen(jdir)
    want = fill(j, 1, [record(1, 2), record(2)], sync=False)
    j.close()
    j.close()  # twice is fine
    j = reopen(jdir)
    assert j.flushed_lsn == 2
    assert list(j.entries(1, 2)) == want
    j.close()


def test_fresh_journal_starts_at_any_lsn_then_gap_free(journal: Journal) -> None:
    fill(journal, 41, [record(41), record(42)])
    assert journal.flushed_lsn == 42
    assert [e.lsn for e in journal.entries(1, 42) if e.kind is H] == [41, 42]
    with pytest.raises(ValueError):
        journal.append(44, H, b"")


def test_empty_journal_reopens_at_applied(jdir: Path) -> None:
    j = reopen(jdir, applied=17)
    assert (j.written_lsn, j.flushed_lsn) == (17, 17)
    assert list(j.entries(1, 17)) == []
    j.close()


# ---- order -----------------------------------------------------------------------------


ORDER_VIOLATIONS: dict[str, list[tuple[int, EntryKind]]] = {
    "block outside a record": [(1, B)],
    "end outside a record": [(1, E)],
    "header inside a record": [(1, H), (1, H)],
    "next header inside a record": [(1, H), (2, H)],
    "block of another lsn": [(1, H), (2, B)],
    "end of another lsn": [(1, H), (0, E)],
    "gap": [(1, H), (1, E), (3, H)],
    "repeat": [(1, H), (1, E), (1, H)],
    "backwards": [(1, H), (1, E), (2, H), (2, E), (1, H)],
    "block after end": [(1, H), (1, E), (1, B)],
    "whole record inside a record": [(1, H), (1, R)],
    "whole record of another lsn inside": [(1, H), (2, R)],
    "block after a whole record": [(1, R), (1, B)],
    "end after a whole record": [(1, R), (1, E)],
    "whole record gap": [(1, R), (3, R)],
    "whole record repeat": [(1, R), (1, R)],
}


@pytest.mark.parametrize("steps", ORDER_VIOLATIONS.values(), ids=ORDER_VIOLATIONS.keys())
def test_order_violations_raise(journal: Journal, steps: list[tuple[int, EntryKind]]) -> None:
    for lsn, kind in steps[:-1]:
        journal.append(lsn, kind, b"x")
    lsn, kind = steps[-1]
    written = journal.written_lsn
    with pytest.raises(ValueError):
        journal.append(lsn, kind, b"x")
    assert journal.written_lsn == written


def test_fresh_journal_refuses_lsn_not_beyond_applied(jdir: Path) -> None:
    j = reopen(jdir, applied=10)
    for lsn in (3, 10):
        with pytest.raises(ValueError):
            j.append(lsn, H, b"")
    j.append(11, H, b"")
    j.close()


def test_oversized_payload_is_refused(journal: Journal) -> None:
    journal.append(1, H, b"")
    journal.append(1, B, bytes(MAX_PAYLOAD))  # the limit itself is fine
    with pytest.raises(ValueError, match="exceeds"):
        journal.append(1, B, bytes(MAX_PAYLOAD + 1))
    journal.append(1, E, b"")
    assert journal.sync() == 1


def test_unknown_kind_is_refused(journal: Journal) -> None:
    with pytest.raises(ValueError):
        journal.append(1, 7, b"")  # type: ignore[arg-type]


# ---- torn tails and damage -------------------------------------------------------------


def torn_setup(jdir: Path) -> tuple[list[Entry], Path, int, int]:
    """Three records; returns the first two's entries, the segment, and where the last
    record and its last entry start."""
    j = reopen(jdir)
    want = fill(j, 1, [record(1, 2), record(2)])
    size_before = os.path.getsize(last_segment(jdir))
    last = record(3, 2, 3000)
    fill(j, 3, [last])
    j.close()
    seg = last_segment(jdir)
    last_entry = os.path.getsize(seg) - ENTRY_HEADER_SIZE - len(last[-1][1])
    return want, seg, size_before, last_entry


def check_cut_to_two(jdir: Path, want: list[Entry]) -> None:
    j = reopen(jdir)
    assert (j.written_lsn, j.flushed_lsn) == (2, 2)
    assert list(j.entries(1, 2)) == want
    # the tail is gone for good: the journal goes on from record 3, and survives a reopen
    again = fill(j, 3, [record(3, 1)])
    j.close()
    j = reopen(jdir)
    assert j.flushed_lsn == 3
    assert list(j.entries(1, 3)) == want + again
    j.close()


def check_cuts(jdir: Path, seg: Path, cuts: Iterable[int], want: list[Entry],
               record_start: int) -> None:
    """The segment cut at each of `cuts` reopens as the two records `want`, the torn
    third one cut away from `record_start` on."""
    full = seg.read_bytes()
    for cut in cuts:
        seg.write_bytes(full[:cut])
        j = reopen(jdir)
        assert j.flushed_lsn == 2, cut
        assert list(j.entries(1, 2)) == want
        j.close()
        assert os.path.getsize(seg) == record_start, cut


def test_torn_tail_at_every_offset_of_the_last_entry(jdir: Path) -> None:
    want, seg, record_start, last_entry = torn_setup(jdir)
    full = seg.read_bytes()
    check_cuts(jdir, seg, range(last_entry, len(full)), want, record_start)
    seg.write_bytes(full[:record_start + 1])
    check_cut_to_two(jdir, want)


def test_torn_tail_at_sampled_offsets_of_the_last_record(jdir: Path) -> None:
    want, seg, record_start, last_entry = torn_setup(jdir)
    check_cuts(jdir, seg, range(record_start, last_entry, 97), want, record_start)


@pytest.mark.parametrize("where", ["payload", "crc", "lsn", "kind", "magic", "length"])
def test_damaged_last_entry_is_detected(jdir: Path, where: str) -> None:
    want, seg, _, last_entry = torn_setup(jdir)
    at = {"magic": 0, "kind": 2, "lsn": 3, "length": 14, "crc": 15,
          "payload": ENTRY_HEADER_SIZE + 5}[where]
    data = bytearray(seg.read_bytes())
    data[last_entry + at] ^= 0x40 if where != "length" else 0x80  # length: absurd
    seg.write_bytes(bytes(data))
    check_cut_to_two(jdir, want)


def test_zeroed_tail_is_cut(jdir: Path) -> None:
    want, seg, record_start, _ = torn_setup(jdir)
    data = bytearray(seg.read_bytes())
    data[record_start:] = bytes(len(data) - record_start)  # allocated, never written
    seg.write_bytes(bytes(data))
    check_cut_to_two(jdir, want)


def test_torn_whole_record_at_every_offset_is_cut(jdir: Path) -> None:
    j = reopen(jdir)
    want = fill(j, 1, [record(1, 1), [(R, payload(2, 0, 500))]])
    start = os.path.getsize(last_segment(jdir))
    fill(j, 3, [[(R, payload(3, 0, 700))]])
    j.close()
    seg = last_segment(jdir)
    full = seg.read_bytes()
    check_cuts(jdir, seg, range(start, len(full)), want, start)
    seg.write_bytes(full)
    j = reopen(jdir)
    assert j.flushed_lsn == 3 and list(j.entries(3, 3)) == [Entry(3, R, payload(3, 0, 700))]
    j.close()


def test_unterminated_trailing_record_is_dropped(jdir: Path) -> None:
    j = reopen(jdir)
    want = fill(j, 1, [record(1), record(2, 1)])
    size = os.path.getsize(last_segment(jdir))
    j.append(3, H, b"h")
    j.append(3, B, b"b" * 5000)
    j.sync()  # durable, but without its END it is no record
    assert j.flushed_lsn == 2
    j.close()
    assert os.path.getsize(last_segment(jdir)) > size
    check_cut_to_two(jdir, want)


def test_record_out_of_order_on_disk_is_cut(jdir: Path) -> None:
    j = reopen(jdir)
    want = fill(j, 1, [record(1), record(2)])
    j.close()
    # splice a copy of record 2 after itself: it checks out, but it is no successor
    seg = last_segment(jdir)
    data = seg.read_bytes()
    rec2 = sum(ENTRY_HEADER_SIZE + len(p) for _, p in record(2))
    seg.write_bytes(data + data[-rec2:])
    check_cut_to_two(jdir, want)


def test_torn_new_segment_is_removed(jdir: Path) -> None:
    j = reopen(jdir, segment_size=FILE_HEADER_SIZE + 1)
    want = fill(j, 1, [record(1), record(2)])
    j.close()
    for head in (b"", b"RPL", b"XXXXXXXX"):
        (jdir / segment_name(3)).write_bytes(head)
        j = reopen(jdir, segment_size=FILE_HEADER_SIZE + 1)
        assert j.flushed_lsn == 2
        assert list(j.entries(1, 2)) == want
        j.close()
        assert segments(jdir) == [segment_name(1), segment_name(2)]


def test_damage_in_an_earlier_segment_drops_everything_after(jdir: Path) -> None:
    j = reopen(jdir, segment_size=300)
    fill(j, 1, [record(i) for i in range(1, 11)])
    j.close()
    names = segments(jdir)
    assert len(names) >= 3
    second = jdir / names[1]
    first_of_third = int(names[2].split(".")[0])
    data = bytearray(second.read_bytes())
    data[-1] ^= 1  # the last entry of the second segment
    second.write_bytes(bytes(data))
    j = reopen(jdir)
    assert j.flushed_lsn == first_of_third - 2  # the last record of the second is cut too
    kept = [e.lsn for e in j.entries(1, j.flushed_lsn) if e.kind is H]
    assert kept == list(range(1, j.flushed_lsn + 1))
    assert segments(jdir) == names[:2]
    j.close()


def test_unknown_format_version_is_refused(jdir: Path) -> None:
    j = reopen(jdir)
    fill(j, 1, [record(1)])
    j.close()
    seg = last_segment(jdir)
    data = bytearray(seg.read_bytes())
    data[4] = 99
    seg.write_bytes(bytes(data))
    with pytest.raises(JournalCorrupt, match="version 99"):
        reopen(jdir)
    assert seg.read_bytes() == bytes(data)  # nothing destroyed


def test_damage_found_while_reading_raises(journal: Journal, jdir: Path) -> None:
    fill(journal, 1, [record(1, 1), record(2)])
    seg = last_segment(jdir)
    with open(seg, "r+b") as f:
        f.seek(FILE_HEADER_SIZE + ENTRY_HEADER_SIZE + 1)
        f.write(b"\xff")
    with pytest.raises(JournalCorrupt):
        list(journal.entries(1, 2))


def test_failed_fdatasync_stops_the_journal_until_reopened(
        jdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    j = reopen(jdir)
    want = fill(j, 1, [record(1, 1)])
    append(j, 2, record(2))

    def fail(fd: int) -> None:
        raise OSError(errno.EIO, "injected")

    with monkeypatch.context() as m:
        m.setattr(os, "fdatasync", fail)
        with pytest.raises(OSError):
            j.sync()
    assert j.flushed_lsn == 1
    # a retry must not pretend that the lost pages are durable
    for call in (j.sync, lambda: j.append(3, H, b"")):
        with pytest.raises(OSError, match="reopen"):
            call()
    j.discard_open()  # allowed, and leaves the tail to repair()
    assert list(j.entries(1, 1)) == want  # what was flushed can still be read
    j.release(1)      # allowed: it never touches the segment being appended to
    j.close()
    j = reopen(jdir)
    assert j.flushed_lsn >= 1
    assert list(j.entries(1, 1)) == want
    j.close()


def _fail_with(errno_: int) -> Callable[..., None]:
    def fail(*args: object) -> None:
        raise OSError(errno_, os.strerror(errno_))
    return fail


@pytest.mark.parametrize("where", ["fdatasync", "pwrite", "pwritev", "roll"])
def test_repair_cuts_back_to_the_last_durable_record_and_appends_go_on(
        jdir: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    j = reopen(jdir, segment_size=4096 if where == "roll" else DEFAULT_SEGMENT_SIZE)
    want = fill(j, 1, [record(1, 1), record(2, 2)])
    append(j, 3, record(3, 1))          # complete but never flushed
    with monkeypatch.context() as m:
        if where == "fdatasync":
            m.setattr(os, "fdatasync", _fail_with(errno.EIO))
            with pytest.raises(OSError):
                j.sync()
        elif where == "roll":
            m.setattr(os, "fdatasync", _fail_with(errno.ENOSPC))
            with pytest.raises(OSError):
                append(j, 4, record(4, 3, 2000))   # the segment is full: a new one
        else:
            m.setattr(os, where, _fail_with(errno.ENOSPC))
            with pytest.raises(OSError):
                append(j, 4, record(4, 1, 100_000 if where == "pwritev" else 1_200_000))
                j.sync()
    assert j.failed is not None
    j.discard_open()
    j.repair()
    assert j.failed is None
    assert (j.written_lsn, j.flushed_lsn) == (2, 2)   # 3 is gone although it was written
    want += fill(j, 3, [record(30, 1)])                # the agent sends 3 again
    assert list(j.entries(1, 3)) == want
    j.repair()  # nothing failed: no-op
    j.close()
    j = reopen(jdir)
    assert j.flushed_lsn == 3
    assert list(j.entries(1, 3)) == want
    j.close()


def test_repair_that_fails_again_can_be_retried(jdir: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    j = reopen(jdir)
    want = fill(j, 1, [record(1)])
    append(j, 2, record(2))
    with monkeypatch.context() as m:
        m.setattr(os, "fdatasync", _fail_with(errno.ENOSPC))
        with pytest.raises(OSError):
            j.sync()
        m.setattr(os, "fsync", _fail_with(errno.EIO))
        with pytest.raises(OSError):
            j.repair()
        assert j.failed is not None
        with pytest.raises(OSError, match="reopen"):
            j.append(2, H, b"")
    j.repair()
    want += fill(j, 2, [record(2)])
    assert list(j.entries(1, 2)) == want
    j.close()


def test_repair_of_a_journal_with_nothing_durable_beyond_applied(
        jdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    j = reopen(jdir, applied=7)
    append(j, 8, record(8))
    with monkeypatch.context() as m:
        m.setattr(os, "fdatasync", _fail_with(errno.ENOSPC))
        with pytest.raises(OSError):
            j.sync()
    j.repair()
    assert segments(jdir) == [] and (j.written_lsn, j.flushed_lsn) == (7, 7)
    want = fill(j, 8, [record(8, 1)])
    assert list(j.entries(8, 8)) == want
    j.close()


# ---- discard_open ----------------------------------------------------------------------


@pytest.mark.parametrize("block_size", [10, 100_000])  # buffered / written directly
def test_discard_open_mid_segment(journal: Journal, jdir: Path, block_size: int) -> None:
    want = fill(journal, 1, [record(1), record(2, 1)])
    size = os.path.getsize(last_segment(jdir))
    journal.append(3, H, b"partial")
    journal.append(3, B, b"x" * block_size)
    journal.sync()
    journal.discard_open()
    journal.discard_open()  # nothing open: no-op
    assert (journal.written_lsn, journal.flushed_lsn) == (2, 2)
    journal.sync()
    assert os.path.getsize(last_segment(jdir)) == size
    want += fill(journal, 3, [record(3, 1)])
    assert list(journal.entries(1, 3)) == want


def test_discard_open_of_a_segments_first_record(jdir: Path) -> None:
    j = reopen(jdir, segment_size=FILE_HEADER_SIZE + 1)
    want = fill(j, 1, [record(1)])
    j.append(2, H, b"partial")
    assert segments(jdir) == [segment_name(1), segment_name(2)]
    j.discard_open()
    assert segments(jdir) == [segment_name(1)]
    want += fill(j, 2, [record(2, 1)])
    j.close()
    j = reopen(jdir)
    assert list(j.entries(1, 2)) == want
    j.close()


def test_discard_open_in_a_fresh_journal_allows_another_start(journal: Journal) -> None:
    journal.append(5, H, b"h")
    journal.discard_open()
    want = fill(journal, 1, [record(1)])
    assert list(journal.entries(1, 1)) == want


# ---- segments --------------------------------------------------------------------------


def test_segments_roll_at_record_boundaries(jdir: Path) -> None:
    j = reopen(jdir, segment_size=3000)
    recs = [record(i, blocks=i % 3, block_size=1000) for i in range(1, 21)]
    want = fill(j, 1, recs)
    names = segments(jdir)
    assert len(names) > 3
    for name in names:  # each segment opens with its first record's header
        data = (jdir / name).read_bytes()
        first = int(name.split(".")[0])
        assert data[:4] == b"RPLJ"
        lsn = int.from_bytes(data[FILE_HEADER_SIZE + 3:FILE_HEADER_SIZE + 11], "little")
        assert (lsn, data[FILE_HEADER_SIZE + 2]) == (first, H)
    assert list(j.entries(1, 20)) == want  # across every boundary
    for lo, hi in [(2, 19), (7, 8), (20, 20)]:
        assert list(j.entries(lo, hi)) == [e for e in want if lo <= e.lsn <= hi]
    j.close()
    j = reopen(jdir, segment_size=3000)
    assert list(j.entries(1, 20)) == want
    j.close()


def test_release_deletes_wholly_applied_segments(jdir: Path) -> None:
    j = reopen(jdir, segment_size=300)
    want = fill(j, 1, [record(i) for i in range(1, 21)])
    names = segments(jdir)
    firsts = [int(n.split(".")[0]) for n in names]
    for applied in (0, firsts[1] - 2, firsts[1] - 1, firsts[3], 20, 25):
        j.release(applied)
        kept = [int(n.split(".")[0]) for n in segments(jdir)]
        # the last segment always stays; every other one stays if it holds applied + 1..
        expect = [f for k, f in enumerate(firsts)
                  if k == len(firsts) - 1 or firsts[k + 1] - 1 > applied]
        assert kept == expect, applied
        if applied < 20:
            assert list(j.entries(applied + 1, 20)) == [e for e in want if e.lsn > applied]
    want2 = fill(j, 21, [record(21), record(22)])
    assert list(j.entries(21, 22)) == want2
    j.close()


def test_open_deletes_wholly_applied_segments(jdir: Path) -> None:
    j = reopen(jdir, segment_size=300)
    want = fill(j, 1, [record(i) for i in range(1, 21)])
    j.close()
    names = segments(jdir)
    second = int(names[1].split(".")[0])
    j = reopen(jdir, applied=second - 1, segment_size=300)
    assert segments(jdir) == names[1:]
    assert j.flushed_lsn == 20
    assert list(j.entries(second, 20)) == [e for e in want if e.lsn >= second]
    j.close()
    j = reopen(jdir, applied=20, segment_size=300)
    assert segments(jdir) == []
    assert (j.written_lsn, j.flushed_lsn) == (20, 20)
    assert fill(j, 21, [record(21)]) == list(j.entries(21, 21))
    j.close()


def test_reset_starts_over(jdir: Path) -> None:
    j = reopen(jdir, segment_size=300)
    fill(j, 1, [record(i) for i in range(1, 8)])
    j.append(8, H, b"open")
    j.reset(100)
    assert segments(jdir) == []
    assert (j.written_lsn, j.flushed_lsn) == (100, 100)
    assert list(j.entries(1, 100)) == []
    with pytest.raises(ValueError):
        j.append(8, H, b"")
    want = fill(j, 101, [record(101, 1)])
    j.close()
    j = reopen(jdir, applied=0)
    assert j.flushed_lsn == 101
    assert list(j.entries(1, 101)) == want
    j.close()


# ---- segment sizes that fit the disk, and reclaim -------------------------------------

MiB = 1 << 20


@pytest.mark.parametrize(("free", "ceiling", "expect"), [
    (1 << 40, DEFAULT_SEGMENT_SIZE, DEFAULT_SEGMENT_SIZE),         # a roomy disk: the ceiling
    (64 * MiB * SEGMENT_FREE_DIVISOR, DEFAULT_SEGMENT_SIZE, DEFAULT_SEGMENT_SIZE),
    (12 * MiB, DEFAULT_SEGMENT_SIZE, MIN_SEGMENT_SIZE),            # a small tmpfs: the floor
    (48 * MiB, DEFAULT_SEGMENT_SIZE, 48 * MiB // SEGMENT_FREE_DIVISOR),
    (0, DEFAULT_SEGMENT_SIZE, MIN_SEGMENT_SIZE),                   # a full disk: the floor
    (1 << 40, 3000, 3000),                                         # a small ceiling wins
    (0, 3000, 3000),
])
def test_fit_segment_size(free: int, ceiling: int, expect: int) -> None:
    assert fit_segment_size(free, ceiling) == expect


class _Statvfs:
    """What os.statvfs says of a disk with `free` bytes available (no test can shrink the
    real disk; the integration test does it with a small tmpfs)."""

    def __init__(self, free: int) -> None:
        self.f_frsize = 4096
        self.f_bavail = free // 4096


def report_free(monkeypatch: pytest.MonkeyPatch, free: list[int]) -> None:
    """os.statvfs reports free[0] bytes available, whatever the path."""
    monkeypatch.setattr(os, "statvfs", lambda path: _Statvfs(free[0]))


def segment_sizes(jdir: Path) -> list[int]:
    return [os.path.getsize(jdir / n) for n in segments(jdir)]


RECORD = 100_000  # one block of this size per record: ~0.1 MiB a record


@pytest.mark.parametrize(("free", "limit"), [
    (1 << 40, 4 * MiB),                        # roomy: the ceiling given
    (48 * MiB, 3 * MiB),                       # 1/16 of what is free
    (8 * MiB, MIN_SEGMENT_SIZE),               # little: the floor
])
def test_segments_fit_the_free_space(jdir: Path, monkeypatch: pytest.MonkeyPatch,
                                     free: int, limit: int) -> None:
    report_free(monkeypatch, [free])
    j = reopen(jdir, segment_size=4 * MiB)
    records = 12 * MiB // RECORD
    want = fill(j, 1, [record(i, 1, RECORD) for i in range(1, records + 1)])
    sizes = segment_sizes(jdir)
    assert len(sizes) >= 3
    for size in sizes[:-1]:  # each rolled once past its limit, at a record boundary
        assert limit <= size < limit + RECORD + 1000, sizes
    assert list(j.entries(1, records)) == want
    j.close()


def test_a_segment_is_cut_short_when_the_disk_fills_meanwhile(
        jdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    free = [1 << 40]
    report_free(monkeypatch, free)
    j = reopen(jdir, segment_size=16 * MiB)
    n = 25
    fill(j, 1, [record(i, 1, RECORD) for i in range(1, n + 1)])  # ~2.5 MiB, one segment
    assert len(segments(jdir)) == 1
    free[0] = 0  # something else filled the disk: the segment stops at the next look
    fill(j, n + 1, [record(i, 1, RECORD) for i in range(n + 1, 2 * n + 1)])
    sizes = segment_sizes(jdir)
    assert len(sizes) >= 2 and sizes[0] < 4 * MiB, sizes
    assert all(size < MIN_SEGMENT_SIZE + RECORD + 1000 for size in sizes[1:-1]), sizes
    j.close()


CURRENT_SEGMENT_RELEASE = {
    # (records of ~0.1 MiB, applied, leave a record open, leave the last unsynced): retired?
    "caught up, 1 MiB or more": (12, 12, False, False, True),
    "caught up, but small": (3, 3, False, False, False),
    "one record not applied": (12, 11, False, False, False),
    "a record open": (12, 12, True, False, False),
    "written but not flushed": (12, 12, False, True, False),
}


@pytest.mark.parametrize(("n", "applied", "open_", "unsynced", "retired"),
                         CURRENT_SEGMENT_RELEASE.values(), ids=CURRENT_SEGMENT_RELEASE.keys())
def test_release_of_the_current_segment(jdir: Path, n: int, applied: int, open_: bool,
                                        unsynced: bool, retired: bool) -> None:
    j = reopen(jdir)
    want = fill(j, 1, [record(i, 1, RECORD) for i in range(1, n + 1 - unsynced)])
    if unsynced:
        want += fill(j, n, [record(n, 1, RECORD)], sync=False)
    if open_:
        j.append(n + 1, H, b"open")
    j.release(applied)
    assert segments(jdir) == ([] if retired else [segment_name(1)])
    if open_:
        j.append(n + 1, E, b"end")
        want += [Entry(n + 1, H, b"open"), Entry(n + 1, E, b"end")]
    # appending goes on either way; a retired segment's successor is named after its LSN
    last = j.written_lsn
    want += fill(j, last + 1, [record(last + 1, 1)])
    assert segments(jdir)[-1] == segment_name(last + 1 if retired else 1)
    assert list(j.entries(applied + 1, last + 1)) == [e for e in want if e.lsn > applied]
    j.close()
    j = reopen(jdir, applied=applied)
    assert j.flushed_lsn == last + 1
    assert list(j.entries(applied + 1, last + 1)) == [e for e in want if e.lsn > applied]
    j.close()


def test_a_caught_up_journal_keeps_less_than_the_floor(jdir: Path) -> None:
    """Records applied as they come (as the receiver does): on disk, at most the floor's
    worth of applied records plus one, however much went through."""
    j = reopen(jdir)
    peak = 0
    for lsn in range(1, 40 * MiB // RECORD):
        append(j, lsn, record(lsn, 1, RECORD))
        j.sync()
        j.release(lsn)
        peak = max(peak, sum(segment_sizes(jdir)))
    assert peak < MIN_SEGMENT_SIZE + 2 * RECORD, peak
    j.close()


# ---- reading while writing -------------------------------------------------------------


def test_iteration_interleaved_with_appends(journal: Journal) -> None:
    want = fill(journal, 1, [record(i, 2, 40_000) for i in range(1, 6)])
    got: list[Entry] = []
    more: list[Entry] = []
    it = journal.entries(1, 5)
    for n, e in enumerate(it):
        got.append(e)
        lsn = 6 + n
        append(journal, lsn, record(lsn, 1, 30_000))
        more += entries_of(lsn, record(lsn, 1, 30_000))
        if n % 3 == 0:
            journal.sync()
        if n == 4:
            journal.append(lsn + 1, H, b"to be discarded")
            journal.discard_open()
    assert got == want
    journal.sync()
    assert list(journal.entries(6, journal.flushed_lsn)) == more


def test_reader_thread_while_appending(jdir: Path) -> None:
    j = reopen(jdir, segment_size=200_000)
    errors: list[BaseException] = []
    seen: list[int] = []
    total = 120
    done = threading.Event()

    def reader() -> None:
        try:
            next_lsn = 1
            deadline = time.monotonic() + 20
            while next_lsn <= total and time.monotonic() < deadline:
                hi = j.flushed_lsn
                if hi < next_lsn:
                    time.sleep(0.001)
                    continue
                for e in j.entries(next_lsn, hi):
                    assert e in entries_of(e.lsn, record(e.lsn, 3, 7000))
                    if e.kind is E:
                        seen.append(e.lsn)
                next_lsn = hi + 1
        except BaseException as exc:  # surfaced in the main thread
            errors.append(exc)
        finally:
            done.set()

    t = threading.Thread(target=reader)
    t.start()
    for lsn in range(1, total + 1):
        append(j, lsn, record(lsn, 3, 7000))
        if lsn % 4 == 0:
            j.sync()
        if lsn % 10 == 0:
            j.release(max(0, (seen[-1] if seen else 0) - 5))
    j.sync()
    assert done.wait(30)
    t.join()
    j.close()
    assert errors == []
    assert seen == list(range(1, total + 1))


def test_a_big_record_streams(journal: Journal) -> None:
    block = 256 << 10
    count = 96  # 24 MiB in one record
    journal.append(1, H, b"h")
    for i in range(count):
        journal.append(1, B, i.to_bytes(4, "little") * (block // 4))
    journal.append(1, E, b"e")
    journal.sync()
    tracemalloc.start()
    try:
        n = 0
        for e in journal.entries(1, 1):
            if e.kind is B:
                assert e.payload[:4] == n.to_bytes(4, "little")
                n += 1
            del e
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == count
    assert peak < 3 * READ_CHUNK + 2 * block


# ---- throughput (opt-in) ---------------------------------------------------------------


@pytest.mark.skipif(not os.environ.get("REPLICATOR_BENCH"),
                    reason="set REPLICATOR_BENCH=1 to measure journal throughput")
def test_throughput(jdir: Path) -> None:
    """1 GiB in 64 KiB payloads, one sync per 1 MiB record, then read back."""
    size, per_record = 1 << 30, 16
    block = os.urandom(64 << 10)
    records = size // (len(block) * per_record)
    j = reopen(jdir)
    t0 = time.perf_counter()
    for lsn in range(1, records + 1):
        j.append(lsn, H, b"h" * 100)
        for _ in range(per_record):
            j.append(lsn, B, block)
        j.append(lsn, E, b"e" * 40)
        j.sync()
    t1 = time.perf_counter()
    read = sum(len(e.payload) for e in j.entries(1, records))
    t2 = time.perf_counter()
    j.close()
    j = reopen(jdir)
    t3 = time.perf_counter()
    j.close()
    assert read >= size
    print(f"\njournal append+sync {size / (t1 - t0) / 1e6:.0f} MB/s ({t1 - t0:.2f} s), "
          f"read {size / (t2 - t1) / 1e6:.0f} MB/s ({t2 - t1:.2f} s), "
          f"open scan {t3 - t2:.2f} s")


# ---- a record's END from its tail ----------------------------------------------------

def fake_end(lsn: int) -> bytes:
    """Bytes that look like the start of an END entry of `lsn`, inside another payload."""
    import struct

    return struct.pack("<2sBQI", b"Je", int(E), lsn, 20) + b"\0" * 24


@pytest.mark.parametrize("blocks, block_size", [(0, 1000), (3, 1000), (50, 70_000)])
def test_end_payload_reads_the_end_alone(jdir: Path, blocks: int, block_size: int) -> None:
    j = Journal(jdir)
    j.open(0)
    recs = [record(1), record(2, blocks, block_size), record(3, 1)]
    # a block of record 2 that ends with something shaped like its END: only the real
    # one ends exactly at the record's end
    recs[1].insert(-1, (B, payload(2, 99, 500) + fake_end(2)))
    fill(j, 1, recs)
    for n, rec in enumerate(recs, start=1):
        assert j.end_payload(n) == rec[-1][1]
    assert j.end_payload(4) is None
    j.close()
    j = reopen(jdir)  # the index rebuilt by the scan gives the same answers
    assert j.end_payload(2) == recs[1][-1][1]
    j.close()


def test_end_payload_of_a_record_not_flushed_is_none(journal: Journal) -> None:
    fill(journal, 1, [record(1)])
    append(journal, 2, record(2))
    assert journal.end_payload(1) == record(1)[-1][1]
    assert journal.end_payload(2) is None
