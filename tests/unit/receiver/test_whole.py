"""Whole records: a small record in one frame is checked as its frames would be, journaled as
one RECORD entry, and applied, after a crash too, exactly as the same record sent as
header, block and end frames."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from replicator.core.records import Block, Codec, End, Frame, Header, Op, Record, Whole
from replicator.errors import ProtocolError
from replicator.receiver import session as session_mod
from replicator.receiver.journal import EntryKind
from tests.unit.receiver.test_applier import (
    BS,
    data,
    delete,
    mkdir,
    new_file,
    patch,
    rename,
    setattr_,
    symlink,
)
from tests.unit.receiver.test_staged import STAGE_MIN, Env, journal_kinds


def _records() -> list[Record]:
    small = data(3 * BS + 10, seed=2)
    return [
        mkdir(1, "d"),
        new_file(2, "d/a", data(100)),
        new_file(3, "d/b", small),
        patch(4, "d/b", small, small[:BS] + data(BS, seed=9) + small[2 * BS:]),
        symlink(5, "d/l", "a"),
        new_file(6, "big", data(STAGE_MIN + 5 * BS, seed=3)),  # staged: frames, not whole
        rename(7, "d/a", "d/c"),
        setattr_(8, "d/c", 0o100600, 1_600_000_000_000_000_000),
        new_file(9, "empty", b""),
        delete(10, "d/l"),
    ]


def _whole_when_small(r: Record) -> list[Frame]:
    return r.frames() if r.header.size >= STAGE_MIN else [r.whole()]


def _tree(root: Path) -> dict[str, tuple[int, int, bytes]]:
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            st = p.lstat()
            content = (os.readlink(p).encode() if p.is_symlink()
                       else p.read_bytes() if p.is_file() else b"")
            out[str(p.relative_to(root))] = (st.st_mode, st.st_mtime_ns, content)
    return out


@pytest.fixture
def two_envs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Env, Env]]:
    monkeypatch.setattr(session_mod, "STAGE_MIN_SIZE", STAGE_MIN)
    (tmp_path / "frames").mkdir()
    (tmp_path / "whole").mkdir()
    a, b = Env(tmp_path / "frames"), Env(tmp_path / "whole")
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def test_whole_records_apply_as_their_frames_do(two_envs: tuple[Env, Env]) -> None:
    frames, whole = two_envs
    records = _records()
    frames.send_records(*records)
    whole.send(*(f for r in records for f in _whole_when_small(r)))
    for r in records:
        kinds = journal_kinds(whole, r.lsn)
        assert kinds == [EntryKind.RECORD] if r.header.size < STAGE_MIN else \
            EntryKind.RECORD not in kinds
    frames.apply()
    whole.apply()
    assert _tree(whole.root / "mirror") == _tree(frames.root / "mirror") != {}


def test_whole_records_survive_a_crash_before_they_are_applied(
        two_envs: tuple[Env, Env]) -> None:
    frames, whole = two_envs
    records = _records()
    frames.send_records(*records)
    frames.apply()
    whole.send(*(f for r in records for f in _whole_when_small(r)))
    whole.crash()       # flushed, nothing applied: the reopened journal has it all
    whole.apply()
    assert _tree(whole.root / "mirror") == _tree(frames.root / "mirror")


def _with(header: Header | None = None, blocks: tuple[Block, ...] | None = None,
          end: End | None = None) -> Callable[[Whole], Whole]:
    def change(w: Whole) -> Whole:
        return Whole(header or w.header, w.blocks if blocks is None else blocks, end or w.end)
    return change


SMALL = new_file(1, "f", data(BS + 1)).whole()
assert isinstance(SMALL.body, Whole)
H = SMALL.body.header


@pytest.mark.parametrize("change, message", [
    (_with(header=Header(Op.FILE, "../f", attrs=H.attrs, size=H.size, block_size=BS)), "\\.\\."),
    (_with(header=Header(Op.FILE, "f", attrs=H.attrs, size=STAGE_MIN, block_size=BS)),
     "travel whole"),
    (_with(blocks=(Block(2, Codec.RAW, 1, b"x"),)), "block 2 of a 2-block file"),
    (_with(blocks=(Block(1, Codec.RAW, 2, b"xy"),)), "block 1 has length 2"),
    (_with(header=Header(Op.MKDIR, "d", attrs=H.attrs)), "block in a MKDIR record"),
])
def test_malformed_whole_records_are_refused(two_envs: tuple[Env, Env],
                                             change: Callable[[Whole], Whole],
                                             message: str) -> None:
    _, env = two_envs
    assert isinstance(SMALL.body, Whole)
    with pytest.raises(ProtocolError, match=message):
        env.send(Frame(1, change(SMALL.body)))
    assert env.ds.journal.written_lsn == 0


def test_a_whole_record_inside_an_open_record_is_refused(two_envs: tuple[Env, Env]) -> None:
    _, env = two_envs
    big = new_file(1, "big", data(STAGE_MIN, seed=4))
    with pytest.raises(ProtocolError, match="record inside record 1"):
        env.send(*big.frames()[:2], new_file(2, "f", b"x").whole())


def test_the_applier_takes_what_the_session_decoded(two_envs: tuple[Env, Env],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from replicator.receiver import applier as applier_mod

    _, env = two_envs
    records = _records()[:5]                       # small ones, LSNs 1-5
    env.send(*(r.whole() for r in records))
    assert len(env.ds.applier.decoded) == len(records)
    decodes: list[bytes] = []
    real = applier_mod.decode_frame
    monkeypatch.setattr(applier_mod, "decode_frame", lambda p: (decodes.append(p), real(p))[1])
    env.apply()
    assert decodes == [] and len(env.ds.applier.decoded) == 0
    assert env.read("d/a") == data(100)


def test_decoded_records_are_used_only_for_the_very_bytes_and_stay_bounded() -> None:
    from replicator.receiver.applier import DecodedRecords

    whole = new_file(1, "f", b"x").whole().body
    assert isinstance(whole, Whole)
    d = DecodedRecords()
    d.put(1, b"payload", whole)
    assert d.take(1, b"other bytes") is None and len(d) == 0   # a rewritten journal entry
    d.put(2, b"payload", whole)
    assert d.take(2, b"payload") is whole and d.take(2, b"payload") is None
    d.MAX_BYTES = 10
    d.put(3, b"12345678", whole)
    d.put(4, b"12345678", whole)                                # over the bound: not kept
    assert d.take(3, b"12345678") is whole and d.take(4, b"12345678") is None
