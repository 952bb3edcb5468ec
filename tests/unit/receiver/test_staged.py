"""Big new files staged by the session: the whole path, session -> journal -> applier.

A real Session (with a stand-in for the Receiver) takes pb batches into a real
ReceiverDataset in tmp_path, exactly as a stream would, and the dataset's applier applies
them. Crashes are simulated by dropping the objects without their orderly ending (no
session close, no commit) and opening the dataset again, which runs the applier's recovery.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from replicator.core.blocks import HASH_SIZE
from replicator.core.records import Block, Codec, End, Frame, Record
from replicator.errors import ProtocolError
from replicator.receiver import partial as partial_mod
from replicator.receiver import session as session_mod
from replicator.receiver.applier import ApplyError
from replicator.receiver.dataset import ReceiverDataset
from replicator.receiver.journal import EntryKind
from replicator.receiver.mirror import INCOMING_PREFIX
from replicator.receiver.partial import HASHES_SUFFIX, RECORD_NAME, STORE_DIR, new_hashes
from replicator.receiver.session import Session
from replicator.wire import pb
from replicator.wire.convert import frame_to_pb
from replicator.wire.stream import RawBatch
from tests.unit.receiver.test_applier import BS, data, delete, hashes_of, new_file

STAGE_MIN = 64 << 10   # small for the tests; records from here on are staged
BIG = 300_000          # not a multiple of BS: the last block is short


class FakeReceiver:
    def __init__(self) -> None:
        self.sessions: dict[str, Session] = {}

    def detach(self, session: Session) -> bool:
        return True


class Env:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.ds = self._open()
        self.session = self._session()

    def _open(self) -> ReceiverDataset:
        ds = ReceiverDataset("src", "ds", "directory", self.root / "mirror", self.root / "state")
        ds.open()
        return ds

    def _session(self) -> Session:
        s = Session(FakeReceiver(), "test")  # type: ignore[arg-type]
        s.source = "src"
        s.datasets = [self.ds]
        s._open = [None]
        return s

    def send(self, *frames: Frame) -> None:
        """One batch through the session's frame work and group commit."""
        m = pb.AgentMessage()
        m.batch.SetInParent()
        for f in frames:
            frame_to_pb(0, f, m.batch.frames.add())
        touched, error = self.session._ingest([RawBatch(m.SerializeToString())])
        if error is not None:
            raise error

    def send_records(self, *records: Record) -> None:
        self.send(*(f for r in records for f in r.frames()))

    def apply(self) -> None:
        while self.ds.applied_lsn < self.ds.flushed_lsn:
            self.ds.applier.apply_upto(self.ds.flushed_lsn)

    def crash(self, before_open: Callable[[], None] | None = None) -> None:
        """As after kill -9: nothing finishes; the files stay as they are on disk (and
        `before_open` may change them before the dataset is opened again). A save of a
        partial record under way lands first: the tests say which saves they expect."""
        self.ds.partials.close()
        for o in self.session._open:
            if o is not None and o.fd >= 0:
                os.close(o.fd)
        if self.ds.partial is not None:
            self.ds.partial.close()
        self.ds.journal._close_fd()
        self.ds.journal._opened = False
        self.ds.manifest.close()  # discards what was not committed, as a crash would
        self.ds.mirror.close()
        if before_open is not None:
            before_open()
        self.ds = self._open()
        self.session = self._session()

    def close(self) -> None:
        self.ds.partials.close()
        self.ds.journal.close()
        self.ds.mirror.close()
        self.ds.manifest.close()

    def incoming(self) -> list[str]:
        return sorted(n for n in os.listdir(self.root / "state" / "staging")
                      if n.startswith(INCOMING_PREFIX))

    def keeps(self) -> list[str]:
        return sorted(os.listdir(self.root / "state" / "keep"))

    def read(self, rel: str) -> bytes:
        return (self.root / "mirror" / rel).read_bytes()


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    monkeypatch.setattr(session_mod, "STAGE_MIN_SIZE", STAGE_MIN)
    e = Env(tmp_path)
    try:
        yield e
    finally:
        e.close()


def journal_kinds(e: Env, lsn: int) -> list[EntryKind]:
    return [x.kind for x in e.ds.journal.entries(lsn, lsn)]


def sparse(n: int) -> bytes:
    """Data with a run of zero blocks in the middle and a zero tail: holes."""
    b = bytearray(data(n, seed=7))
    b[BS * 10:BS * 30] = bytes(BS * 20)
    b[n - BS * 3:] = bytes(BS * 3)
    return bytes(b)


@pytest.mark.parametrize(("size", "staged"), [
    (STAGE_MIN - 1, False),
    (STAGE_MIN, True),
    (BIG, True),
])
def test_only_big_new_files_are_staged(env: Env, size: int, staged: bool) -> None:
    content = data(size)
    env.send_records(new_file(1, "d/f", content))
    kinds = journal_kinds(env, 1)
    assert (EntryKind.STAGED in kinds) is staged
    assert (EntryKind.BLOCK not in kinds) is staged
    assert len(env.incoming()) == (1 if staged else 0)
    env.apply()
    assert env.read("d/f") == content
    assert env.incoming() == [] and env.keeps() == []
    entry = env.ds.manifest.get("d/f")
    assert entry is not None and entry.size == size


def test_staged_file_keeps_holes_and_attributes(env: Env) -> None:
    content = sparse(BIG)
    rec = new_file(1, "f", content)
    env.send_records(rec)
    env.apply()
    p = env.root / "mirror" / "f"
    assert p.read_bytes() == content
    st = p.stat()
    assert st.st_mtime_ns == rec.header.attrs.mtime_ns  # type: ignore[union-attr]
    assert st.st_mode & 0o777 == 0o644
    # the zero blocks were never written: fewer 512-byte sectors than the size needs
    assert st.st_blocks * 512 <= BIG - 20 * BS


def test_blocks_spread_over_many_batches(env: Env) -> None:
    content = data(BIG, seed=3)
    frames = new_file(1, "f", content).frames()
    for i in range(0, len(frames), 7):
        env.send(*frames[i:i + 7])
    env.apply()
    assert env.read("f") == content


def test_aborted_staged_record_leaves_nothing(env: Env) -> None:
    r = new_file(1, "f", data(BIG))
    env.send_records(Record(1, r.header, r.blocks, End(r.end.digest, aborted=True)))
    assert env.incoming() == []
    env.apply()
    assert env.ds.applied_lsn == 1
    assert not (env.root / "mirror" / "f").exists()


def test_wrong_digest_asks_for_a_resync(env: Env) -> None:
    r = new_file(1, "f", data(BIG))
    env.send_records(Record(1, r.header, r.blocks, End(b"\1" * 16)))
    env.apply()
    assert env.ds.applier.resync_paths == ["f"]
    assert not (env.root / "mirror" / "f").exists()
    assert env.incoming() == [] and env.keeps() == []


def test_corrupt_block_ends_the_stream_and_its_file(env: Env) -> None:
    r = new_file(1, "f", data(BIG))
    bad = Frame(1, type(r.blocks[1])(r.blocks[1].index, r.blocks[1].codec,
                                    r.blocks[1].raw_len + 1, r.blocks[1].data))
    env.send(Frame(1, r.header), Frame(1, r.blocks[0]))
    assert len(env.incoming()) == 1
    with pytest.raises(ProtocolError):
        env.send(bad)
    asyncio.run(env.session._close())
    # a malformed frame ended the stream: nothing of it is kept for a resume
    assert env.incoming() == [] and env.ds.partial is None
    assert env.ds.written_lsn == 0


def broken_off(env: Env, r: Record, blocks: int) -> None:
    """The record's header and first `blocks` blocks arrive, then the stream breaks."""
    env.send(Frame(1, r.header), *(Frame(1, b) for b in r.blocks[:blocks]))
    assert len(env.incoming()) == 1
    asyncio.run(env.session._close())  # what the servicer does when the stream breaks
    env.session = env._session()


def test_stream_broken_mid_record_keeps_a_partial_the_next_stream_continues(env: Env) -> None:
    r = new_file(1, "f", data(BIG))
    broken_off(env, r, 3)
    partial = env.ds.partial
    assert partial is not None and partial.lsn == 1 and partial.blocks == 3
    assert len(env.incoming()) == 1 and env.ds.written_lsn == 0
    pos = partial.position()
    assert (pos.path, pos.size, pos.blocks, pos.block_size) == (b"f", BIG, 3, BS)
    # the next stream sends only the rest
    resumed = dataclasses.replace(r.header, resume_from=3)
    env.send(Frame(1, resumed), *(Frame(1, b) for b in r.blocks[3:]), Frame(1, r.end))
    assert env.ds.partial is None
    env.apply()
    assert env.read("f") == data(BIG)
    assert env.incoming() == [] and env.keeps() == []


def test_a_partial_resumed_twice_still_ends_whole(env: Env) -> None:
    r = new_file(1, "f", data(BIG, seed=9))
    broken_off(env, r, 1)
    env.send(Frame(1, dataclasses.replace(r.header, resume_from=1)), Frame(1, r.blocks[1]),
             Frame(1, r.blocks[2]))
    asyncio.run(env.session._close())
    env.session = env._session()
    assert env.ds.partial is not None and env.ds.partial.blocks == 3
    env.send(Frame(1, dataclasses.replace(r.header, resume_from=3)),
             *(Frame(1, b) for b in r.blocks[3:]), Frame(1, r.end))
    env.apply()
    assert env.read("f") == data(BIG, seed=9)


def test_another_record_at_that_lsn_drops_the_partial(env: Env) -> None:
    r = new_file(1, "f", data(BIG))
    broken_off(env, r, 4)
    other = data(BIG, seed=4)  # the file changed: the agent sends it whole
    env.send_records(new_file(1, "f", other))
    assert env.ds.partial is None
    env.apply()
    assert env.read("f") == other
    assert env.incoming() == []


@pytest.mark.parametrize("change", ["blocks", "size", "path", "lsn"])
def test_a_resume_that_does_not_fit_ends_the_stream(env: Env, change: str) -> None:
    r = new_file(1, "f", data(BIG))
    broken_off(env, r, 2)
    h, lsn = dataclasses.replace(r.header, resume_from=2), 1
    if change == "blocks":
        h = dataclasses.replace(h, resume_from=1)
    elif change == "size":
        h = dataclasses.replace(h, size=BIG + 1)
    elif change == "path":
        h = dataclasses.replace(h, path="g")
    else:
        env.send_records(delete(1, "x"))
        lsn = 2
    with pytest.raises(ProtocolError, match="does not hold"):
        env.send(Frame(lsn, h))
    asyncio.run(env.session._close())
    assert env.ds.partial is None and env.incoming() == []


def test_a_resume_with_no_partial_ends_the_stream(env: Env) -> None:
    r = new_file(1, "f", data(BIG))
    with pytest.raises(ProtocolError, match="does not hold"):
        env.send(Frame(1, dataclasses.replace(r.header, resume_from=2)))


def test_a_partial_whose_early_blocks_differ_fails_the_digest(env: Env) -> None:
    # what the receiver holds of blocks 0-1 is not what the file holds now: the whole-file
    # digest at the end catches it, and the receiver asks for the file whole
    r = new_file(1, "f", data(BIG))
    broken_off(env, r, 2)
    now = new_file(1, "f", data(BIG, seed=8))
    env.send(Frame(1, dataclasses.replace(now.header, resume_from=2)),
             *(Frame(1, b) for b in now.blocks[2:]), Frame(1, now.end))
    env.apply()
    assert env.ds.applier.resync_paths == ["f"]
    assert not (env.root / "mirror" / "f").exists()
    assert env.incoming() == [] and env.keeps() == []


def test_blocks_out_of_order_leave_no_partial(env: Env) -> None:
    r = new_file(1, "f", data(BIG))
    env.send(Frame(1, r.header), Frame(1, r.blocks[2]), Frame(1, r.blocks[0]))
    asyncio.run(env.session._close())
    assert env.ds.partial is None and env.incoming() == []


def test_a_hole_sent_over_a_block_already_written_reads_as_zeros(env: Env) -> None:
    """A staged file is all holes, so a ZERO block normally writes nothing; one that comes
    after data for the same block (in the run or on disk) must zero it, or the file
    would keep the data while its hashes, and so the digest check, say zeros."""
    first = data(BIG, seed=31)
    final = bytes(2 * BS) + first[2 * BS:]
    r = new_file(1, "f", final)  # its blocks leave out the holes: they start at block 2
    old = new_file(1, "f", first)
    assert r.blocks[0].index == 2

    def hole(i: int) -> Frame:
        return Frame(1, Block(i, Codec.ZERO, BS, b""))

    env.send(Frame(1, r.header), Frame(1, old.blocks[0]))  # block 0 is on disk
    env.send(Frame(1, old.blocks[1]), hole(1), hole(0),  # block 1 still in the run
             *(Frame(1, b) for b in r.blocks), Frame(1, r.end))
    env.apply()
    assert env.read("f") == final


def saved_state(env: Env) -> list[str]:
    """The files of the dataset's saved partial record (see receiver.partial)."""
    d = env.root / "state" / STORE_DIR
    return sorted(os.listdir(d)) if d.is_dir() else []


def resume_rest(env: Env, r: Record, start: int) -> None:
    env.send(Frame(r.lsn, dataclasses.replace(r.header, resume_from=start)),
             *(Frame(r.lsn, b) for b in r.blocks[start:]), Frame(r.lsn, r.end))


def test_a_partial_saved_when_the_stream_broke_survives_a_restart(env: Env) -> None:
    content = data(BIG, seed=11)
    r = new_file(1, "f", content)
    broken_off(env, r, 3)
    assert env.ds.partial is not None
    staged_name = os.path.basename(env.ds.partial.staged)
    assert saved_state(env) == sorted([RECORD_NAME, staged_name + HASHES_SUFFIX])
    env.crash()  # as kill -9: the partial is loaded back from disk, its file kept
    p = env.ds.partial
    assert p is not None and (p.lsn, p.blocks, p.header) == (1, 3, r.header)
    assert len(env.incoming()) == 1
    # the hashes of the blocks it holds come back from disk, the rest are holes' hashes
    assert bytes(p.hashes) == hashes_of(content[:3 * BS]) + bytes(
        new_hashes(r.header))[3 * HASH_SIZE:]
    pos = p.position()
    assert (pos.lsn, pos.path, pos.size, pos.blocks) == (1, b"f", BIG, 3)
    resume_rest(env, r, 3)
    assert env.ds.partial is None and saved_state(env) == []  # its record is journaled
    env.apply()
    assert env.read("f") == content
    assert env.incoming() == [] and env.keeps() == []


def test_a_kill_mid_stream_keeps_what_was_saved_and_cuts_the_rest(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(session_mod, "SAVE_EVERY_BYTES", 8 * BS)
    content = data(BIG, seed=12)
    r = new_file(1, "f", content)
    env.send(Frame(1, r.header), *(Frame(1, b) for b in r.blocks[:10]))   # saved: 10
    env.ds.partials.wait()  # (in the store's thread)
    env.send(*(Frame(1, b) for b in r.blocks[10:17]))                     # 7 more: not yet
    staged = env.root / "state" / "staging" / env.incoming()[0]
    assert staged.stat().st_size == 17 * BS
    env.crash()  # no stream end: only the save made while it arrived counts
    p = env.ds.partial
    assert p is not None and p.blocks == 10
    # blocks 10-16 were written but never made durable: cut, so they read as holes
    assert staged.stat().st_size == 10 * BS
    assert bytes(p.hashes[:10 * HASH_SIZE]) == hashes_of(content[:10 * BS])
    resume_rest(env, r, 10)
    env.apply()
    assert env.read("f") == content


def test_a_partial_broken_off_again_after_a_restart_saves_its_progress(env: Env) -> None:
    content = data(BIG, seed=13)
    r = new_file(1, "f", content)
    broken_off(env, r, 2)
    env.crash()
    env.send(Frame(1, dataclasses.replace(r.header, resume_from=2)),
             *(Frame(1, b) for b in r.blocks[2:6]))
    asyncio.run(env.session._close())
    env.crash()
    p = env.ds.partial
    assert p is not None and p.blocks == 6
    assert bytes(p.hashes[:6 * HASH_SIZE]) == hashes_of(content[:6 * BS])
    resume_rest(env, r, 6)
    env.apply()
    assert env.read("f") == content


def test_a_save_that_fails_does_not_stop_the_record(
        env: Env, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(session_mod, "SAVE_EVERY_BYTES", 8 * BS)
    (env.root / "state" / STORE_DIR).write_text("in the way")  # no store can be made
    content = data(BIG, seed=17)
    r = new_file(1, "f", content)
    env.send(Frame(1, r.header))
    for i in range(0, len(r.blocks), 10):
        env.send(*(Frame(1, b) for b in r.blocks[i:i + 10]))
    env.send(Frame(1, r.end))
    env.ds.partials.wait()
    assert caplog.text.count("partial record not saved") == 1  # once, not every 8 blocks
    env.apply()
    assert env.read("f") == content


def test_blocks_out_of_order_after_a_save_forget_it(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(session_mod, "SAVE_EVERY_BYTES", 8 * BS)
    r = new_file(1, "f", data(BIG))
    env.send(Frame(1, r.header), *(Frame(1, b) for b in r.blocks[:10]))
    env.ds.partials.wait()
    assert saved_state(env) != []
    env.send(Frame(1, r.blocks[2]))  # below the saved blocks: they are no longer trusted
    env.crash()
    assert env.ds.partial is None and saved_state(env) == [] and env.incoming() == []


def test_a_block_below_the_saved_ones_forgets_them_before_it_is_written(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """kill -9 right after such a block is written, before its batch is committed, must not
    leave a saved state whose hashes no longer match the staged file."""
    monkeypatch.setattr(session_mod, "SAVE_EVERY_BYTES", 8 * BS)
    r = new_file(1, "f", data(BIG))
    env.send(Frame(1, r.header), *(Frame(1, b) for b in r.blocks[:10]))
    env.ds.partials.wait()
    assert saved_state(env) != []
    other = new_file(1, "f", data(BIG, seed=5))
    m = pb.Frame()
    frame_to_pb(0, Frame(1, other.blocks[2]), m)
    env.session._frame(m, m.SerializeToString())  # only the frame work: no commit after it
    open_ = env.session._open[0]
    assert open_ is not None
    open_.flush()  # and the block is in the staged file
    assert saved_state(env) == []
    env.crash()
    assert env.ds.partial is None and saved_state(env) == []


def _rewrite_record(env: Env, lsn: int) -> None:
    path = env.root / "state" / STORE_DIR / RECORD_NAME
    _, header, name, blocks = partial_mod._decode(path.read_bytes())
    path.write_bytes(partial_mod._encode(lsn, header, os.fsdecode(name), blocks))


def _flip(path: Path, at: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0x55
    path.write_bytes(bytes(raw))


def _hashes_file(env: Env) -> Path:
    return next((env.root / "state" / STORE_DIR).glob("*" + HASHES_SUFFIX))


UNUSABLE: dict[str, Callable[[Env], object]] = {
    "not the next record": lambda env: _rewrite_record(env, 2),
    "staged file gone": lambda env: os.unlink(
        env.root / "state" / "staging" / env.incoming()[0]),
    "hashes gone": lambda env: os.unlink(_hashes_file(env)),
    "hashes short": lambda env: os.truncate(_hashes_file(env), 2 * HASH_SIZE),
    "record torn": lambda env: _flip(env.root / "state" / STORE_DIR / RECORD_NAME, 30),
    "record of another version": lambda env: _flip(
        env.root / "state" / STORE_DIR / RECORD_NAME, 4),
    "record empty": lambda env: (env.root / "state" / STORE_DIR / RECORD_NAME).write_bytes(b""),
}


@pytest.mark.parametrize("damage", UNUSABLE.values(), ids=UNUSABLE.keys())
def test_a_saved_partial_that_does_not_check_out_is_dropped(
        env: Env, damage: Callable[[Env], object]) -> None:
    r = new_file(1, "f", data(BIG, seed=14))
    broken_off(env, r, 3)
    env.crash(before_open=lambda: damage(env))
    assert env.ds.partial is None
    assert saved_state(env) == [] and env.incoming() == []  # recovery deleted its file
    env.send_records(r)  # the agent is told of no partial: it sends the file whole
    env.apply()
    assert env.read("f") == data(BIG, seed=14)


def test_a_saved_partial_whose_record_was_journaled_leaves_its_file_to_the_journal(
        env: Env) -> None:
    r = new_file(1, "f", data(BIG, seed=15))
    broken_off(env, r, 3)
    record_file = (env.root / "state" / STORE_DIR / RECORD_NAME).read_bytes()
    resume_rest(env, r, 3)
    assert saved_state(env) == []
    # a crash before the cleared state was durable: the record is there again
    (env.root / "state" / STORE_DIR / RECORD_NAME).write_bytes(record_file)
    env.crash()
    assert env.ds.partial is None and saved_state(env) == []
    assert env.read("f") == data(BIG, seed=15)  # recovery applied it from the staged file
    assert env.incoming() == []


def test_another_record_at_that_lsn_after_a_restart_drops_the_saved_partial(env: Env) -> None:
    broken_off(env, new_file(1, "f", data(BIG)), 4)
    env.crash()
    assert env.ds.partial is not None
    other = data(BIG, seed=16)  # the file changed while the receiver was down
    env.send_records(new_file(1, "f", other))
    assert env.ds.partial is None and saved_state(env) == []
    env.apply()
    assert env.read("f") == other
    assert env.incoming() == []


def test_crash_before_apply_replays_from_the_staged_file(env: Env) -> None:
    content = data(BIG, seed=5)
    env.send_records(new_file(1, "f", content))
    env.crash()  # flushed, acknowledged, not applied
    assert env.ds.applied_lsn == 1
    assert env.read("f") == content
    assert env.incoming() == [] and env.keeps() == []


@pytest.mark.parametrize("then_delete", [False, True])
def test_crash_after_install_before_commit(env: Env, monkeypatch: pytest.MonkeyPatch,
                                           then_delete: bool) -> None:
    content = data(BIG, seed=6)
    records = [new_file(1, "f", content)]
    if then_delete:
        records.append(delete(2, "f"))
    env.send_records(*records)

    def crash() -> None:
        raise RuntimeError("crash")

    monkeypatch.setattr(env.ds.mirror, "sync", crash)
    with pytest.raises(ApplyError):
        env.apply()
    assert env.keeps() == ["1"]           # installed, but only the keep link can replay it
    assert env.incoming() == []
    monkeypatch.undo()
    monkeypatch.setattr(session_mod, "STAGE_MIN_SIZE", STAGE_MIN)
    env.crash()
    assert env.ds.applied_lsn == len(records)
    assert env.ds.error is None and env.ds.applier.error is None
    assert (env.root / "mirror" / "f").exists() is not then_delete
    if not then_delete:
        assert env.read("f") == content
    assert env.keeps() == [] and env.incoming() == []


def test_crash_between_keep_link_and_install(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    content = data(BIG, seed=8)
    env.send_records(new_file(1, "f", content))

    def crash(staged: str, path: str) -> None:
        raise RuntimeError("crash")

    monkeypatch.setattr(env.ds.mirror, "install", crash)
    with pytest.raises(ApplyError):
        env.apply()
    assert env.keeps() == ["1"] and len(env.incoming()) == 1
    monkeypatch.undo()
    env.crash()
    assert env.read("f") == content
    assert env.keeps() == [] and env.incoming() == []


def test_crash_mid_record_orphan_is_removed_at_open(env: Env) -> None:
    content = data(BIG, seed=9)
    env.send_records(new_file(1, "a", content))
    r = new_file(2, "b", data(BIG, seed=10))
    env.send(Frame(2, r.header), *(Frame(2, b) for b in r.blocks[:3]))
    assert len(env.incoming()) == 2
    env.crash()  # record 2 never completed: its file is an orphan; record 1's is needed
    assert env.ds.applied_lsn == 1 and env.ds.flushed_lsn == 1
    assert env.read("a") == content
    assert env.incoming() == []


def test_flushed_record_in_an_errored_dataset_keeps_its_file(env: Env) -> None:
    env.send_records(new_file(1, "x/f", data(BIG)))
    # a record that cannot be applied (through a symlink) stops the dataset at record 2 ...
    (env.root / "mirror" / "x").mkdir()
    (env.root / "mirror" / "x" / "g").symlink_to("/")
    env.send_records(new_file(2, "x/g/h", data(BIG, seed=2)), new_file(3, "y", data(BIG)))
    env.crash()
    # ... whose file stays on disk for when the dataset is repaired
    assert env.ds.applier.error is not None
    assert env.ds.applied_lsn == 1
    assert len(env.incoming()) == 2
    assert env.read("x/f") == data(BIG)


def test_journal_reset_orphans_are_removed_at_open(env: Env) -> None:
    env.send_records(new_file(1, "f", data(BIG)))
    assert len(env.incoming()) == 1
    env.ds.journal.reset(0)
    env.crash()
    assert env.incoming() == []
    assert not (env.root / "mirror" / "f").exists()


def test_a_header_inside_a_staged_record_ends_the_stream_and_its_file(env: Env) -> None:
    r = new_file(1, "f", data(BIG))
    env.send(Frame(1, r.header), Frame(1, r.blocks[0]))
    with pytest.raises(ProtocolError, match="header inside record 1"):
        env.send(Frame(2, r.header))
    asyncio.run(env.session._close())
    assert env.incoming() == [] and env.ds.partial is None


def _batch_of(*records: Record) -> pb.AgentMessage:
    m = pb.AgentMessage()
    for f in (f for r in records for f in r.frames()):
        frame_to_pb(0, f, m.batch.frames.add())
    return m


async def test_batches_that_wait_for_the_worker_share_one_group_commit(env: Env) -> None:
    """While the worker commits the first batch, nine more arrive: they go to the worker
    together and are made durable by one fsync, not nine; every record lands, in order."""
    journal = env.ds.journal
    real_sync = journal.sync
    syncs: list[int] = []
    in_sync, release = threading.Event(), threading.Event()

    def sync() -> None:
        syncs.append(journal.written_lsn)
        if len(syncs) == 1:
            in_sync.set()
            release.wait(10)
        real_sync()

    journal.sync = sync  # type: ignore[method-assign]
    batches = [_batch_of(new_file(i, f"f{i}", data(100, i))) for i in range(1, 11)]

    async def stream() -> AsyncIterator[pb.AgentMessage]:
        yield batches[0]
        assert await asyncio.to_thread(in_sync.wait, 10)
        for b in batches[1:]:
            yield b
        release.set()  # all nine are in the inbox by now

    await env.session._read(stream())
    assert syncs == [1, 10]
    assert env.ds.flushed_lsn == 10
    assert env.session._stream_bytes == sum(b.ByteSize() for b in batches)
    env.apply()
    for i in range(1, 11):
        assert (env.ds.mirror.root / f"f{i}").read_bytes() == data(100, i)


async def test_a_bad_message_ends_the_stream_after_the_batches_before_it(env: Env) -> None:
    async def stream() -> AsyncIterator[pb.AgentMessage]:
        for i in range(1, 4):
            yield _batch_of(new_file(i, f"f{i}", data(10, i)))
        yield pb.AgentMessage(hello=pb.Hello())

    with pytest.raises(ProtocolError, match="unexpected hello"):
        await env.session._read(stream())
    assert env.ds.flushed_lsn == 3
