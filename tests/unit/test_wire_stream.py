"""The Stream's own (de)serializers: batches reach the session unparsed, everything else
as the generated code would give it, and a batch that is not one is a protocol error."""

from __future__ import annotations

from typing import Any

import pytest

from replicator.core.records import Attrs, Base, Block, Codec, End, Frame, Header, Op, Whole
from replicator.errors import ProtocolError
from replicator.wire import pb, rpc
from replicator.wire.framing import batch_message, encode_frame
from replicator.wire.stream import (
    RawBatch,
    _deserialize,
    _frame_spans,
    _serialize,
    add_replicator_servicer,
)


def test_a_batch_is_handed_on_unparsed_and_parses_later() -> None:
    msg = batch_message(encode_frame(0, Frame(7, End())))
    got = _deserialize(msg)
    assert isinstance(got, RawBatch) and got.data is msg and len(got) == len(msg)
    assert [f.lsn for f in got.parse().frames] == [7]


@pytest.mark.parametrize("message", [
    pb.AgentMessage(hello=pb.Hello(source_id="a")),
    pb.AgentMessage(heartbeat=pb.Heartbeat(agent_time=1.5)),
    pb.AgentMessage(),
])
def test_other_messages_are_parsed_at_once(message: pb.AgentMessage) -> None:
    got = _deserialize(_serialize(message))
    assert isinstance(got, pb.AgentMessage) and got == message


def test_the_agent_serializer_passes_bytes_through() -> None:
    data = b"\x12\x00"
    assert _serialize(data) is data


@pytest.mark.parametrize("data, error", [
    (b"\x12\x05abc", "undecodable"),                       # length past the end
    (b"\x12\x00\x0a\x02\x08\x01", "not one"),              # batch, then a hello after it
    (b"\x12\x02\x0a\x03", "undecodable"),                  # a frame cut short
])
def test_a_batch_that_is_not_one_is_refused(data: bytes, error: str) -> None:
    raw = _deserialize(data)
    assert isinstance(raw, RawBatch)
    with pytest.raises(ProtocolError, match=error):
        raw.parse()


def test_a_parsed_batch_message_becomes_a_raw_batch_of_the_same_frames() -> None:
    m = pb.AgentMessage()
    m.batch.frames.add(lsn=3)
    assert [f.lsn for f in RawBatch.of(m).parse().frames] == [3]


class _Recorder:
    """Stands in for grpc.aio.Server: records what gets registered."""

    def __init__(self) -> None:
        self.methods: dict[str, set[str]] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.methods[service] = set(handlers)


def test_every_method_of_the_service_is_registered() -> None:
    """A method added to the proto must not be left out of our registration."""
    generated, ours = _Recorder(), _Recorder()
    rpc.add_ReplicatorServicer_to_server(rpc.ReplicatorServicer(), generated)
    add_replicator_servicer(rpc.ReplicatorServicer(), ours)  # type: ignore[arg-type]
    assert ours.methods == generated.methods


def _mixed_frames() -> list[bytes | bytearray | memoryview]:
    """Frames of every kind, with lengths whose varints take one, two and three bytes."""
    attrs = Attrs(mode=0o100644, mtime_ns=1_700_000_000_123_456_789)
    small = Header(Op.FILE, "d/small.txt", attrs=attrs, size=5, base=Base.EMPTY,
                   block_size=65536)
    big = Header(Op.FILE, "big.bin", attrs=attrs, size=200_000, base=Base.EMPTY,
                 block_size=65536)
    parts: list[bytes | bytearray | memoryview] = []
    parts += encode_frame(0, Frame(1, Whole(small, (Block(0, Codec.RAW, 5, b"hello"),),
                                             End(b"\x01" * 16))))
    parts += encode_frame(1, Frame(2, big))
    parts += encode_frame(1, Frame(2, Block(0, Codec.RAW, 65536, bytes(range(256)) * 256)))
    parts += encode_frame(1, Frame(2, Block(1, Codec.ZERO, 65536, b"")))
    parts += encode_frame(1, Frame(2, Block(3, Codec.RAW, 3392, b"x" * 3392)))
    parts += encode_frame(1, Frame(2, End(b"\x02" * 16)))
    parts += encode_frame(0, Frame(3, Header(Op.DELETE, "d/gone")))
    return parts


def test_frames_come_cut_from_the_batch_exactly_as_protobuf_gives_them() -> None:
    msg = batch_message(_mixed_frames())
    assert _frame_spans(msg) is not None  # cut here, not parsed whole
    whole = [(f, f.SerializeToString()) for f in RawBatch(msg).parse().frames]
    assert list(RawBatch(msg).frames()) == whole
    assert [f.lsn for f, _ in whole] == [1, 2, 2, 2, 2, 2, 3]


def test_frames_of_a_batch_laid_out_otherwise_are_still_every_frame() -> None:
    one = pb.AgentMessage()
    one.batch.frames.add(lsn=4, dataset=1)
    two = pb.AgentMessage()
    two.batch.frames.add(lsn=5)
    unknown_field = b"\x10\x07"  # Batch field 2, varint 7: not ours, ignored by protobuf
    for data in (one.SerializeToString() + two.SerializeToString(),  # two batch fields
                 b"\x12\x04\x0a\x00" + unknown_field):
        assert _frame_spans(data) is None  # parsed whole
        expected = [(f, f.SerializeToString()) for f in RawBatch(data).parse().frames]
        assert list(RawBatch(data).frames()) == expected
    merged = list(RawBatch(one.SerializeToString() + two.SerializeToString()).frames())
    assert [(f.dataset, f.lsn) for f, _ in merged] == [(1, 4), (0, 5)]
    assert list(RawBatch(b"\x12\x00").frames()) == []  # an empty batch


@pytest.mark.parametrize("data, error", [
    (b"\x12\x05abc", "undecodable batch"),                  # length past the end
    (b"\x12\x00\x0a\x02\x08\x01", "not one"),               # batch, then a hello after it
    (b"\x12\x02\x0a\x03", "undecodable batch"),              # a frame cut short
    (b"\x12\x0b\x0a\x02\x10\x01\x0a\x05\xff\xff\xff\xff\xff", "undecodable frame"),
])
def test_frames_of_a_batch_that_is_not_one_are_refused(data: bytes, error: str) -> None:
    got = []
    with pytest.raises(ProtocolError, match=error):
        for f, _ in RawBatch(data).frames():
            got.append(f.lsn)
    # a frame that does not parse comes after the good frames before it
    assert got == ([1] if error == "undecodable frame" else [])
