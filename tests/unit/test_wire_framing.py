"""The agent's hand-encoded frames and batches are exactly what protobuf would serialise,
so the receiver parses them with the generated classes and both sides count the same
message sizes for flow control."""

from __future__ import annotations

import os

import pytest

from replicator.core.records import Block, Codec, Frame, Header, Op
from replicator.wire import pb
from replicator.wire.convert import frame_from_pb, frame_to_pb
from replicator.wire.framing import (
    batch_message,
    encode_frame,
    parts_size,
    read_varint,
    varint,
)

from .test_wire_convert import FRAMES

BLOCKS = [
    Frame(1, Block(0, Codec.RAW, 65536, os.urandom(65536))),       # index 0: left out
    Frame(2**40, Block(2**35, Codec.LZ4, 1 << 20, b"\x1f" * 300)),  # long varints
    Frame(3, Block(7, Codec.ZERO, 4096, b"")),                      # no data field at all
    Frame(4, Block(1, Codec.RAW, 3, memoryview(b"xabcx")[1:4])),   # a view of a chunk
    Frame(5, Block(127, Codec.RAW, 128, bytes(range(128)))),        # varint edge: 127/128
    Frame(6, Block(128, Codec.LZ4, 16383, b"y" * 16384)),           # 2- and 3-byte lengths
]


@pytest.mark.parametrize("n", [0, 1, 127, 128, 300, 16383, 16384, 2**35, 2**64 - 1])
def test_varint_matches_protobuf(n: int) -> None:
    m = pb.Frame(lsn=n)
    expected = m.SerializeToString()[1:] if n else b""
    assert (varint(n) if n else b"") == expected


@pytest.mark.parametrize("n", [0, 1, 127, 128, 300, 16383, 16384, 2**35, 2**64 - 1])
def test_read_varint_reads_what_varint_wrote(n: int) -> None:
    data = b"\xff" + varint(n) + b"\x01"
    assert read_varint(data, 1) == (n, len(data) - 1)


@pytest.mark.parametrize("data, error", [
    (b"\x80\x80", IndexError),          # runs past the end
    (b"\xff" * 11, ValueError),          # longer than any 64-bit varint
])
def test_read_varint_refuses_what_is_not_one(data: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        read_varint(data, 0)


@pytest.mark.parametrize("dataset", [0, 1, 300])
@pytest.mark.parametrize("frame", [*BLOCKS, *FRAMES], ids=repr)
def test_frame_bytes_are_what_protobuf_serialises(dataset: int, frame: Frame) -> None:
    parts = encode_frame(dataset, frame)
    message = pb.Batch(frames=[frame_to_pb(dataset, frame)])
    expected = message.SerializeToString()
    if isinstance(frame.body, Block):  # encoded by hand: the very bytes
        assert b"".join(parts) == expected
    else:  # by protobuf, whose map order may differ between two serialisations
        assert pb.Batch.FromString(b"".join(parts)) == message
    assert parts_size(parts) == len(expected)


def test_a_block_payload_is_not_copied_into_the_frame() -> None:
    data = memoryview(os.urandom(65536))
    parts = encode_frame(0, Frame(1, Block(3, Codec.RAW, 65536, data)))
    assert parts[-1] is data


def test_batch_message_parses_as_the_agent_message_it_stands_for() -> None:
    frames = [*BLOCKS, *FRAMES]
    parts = [p for f in frames for p in encode_frame(2, f)]
    msg = batch_message(parts)
    expected = pb.AgentMessage()
    for f in frames:
        frame_to_pb(2, f, expected.batch.frames.add())
    assert pb.AgentMessage.FromString(msg) == expected
    assert len(msg) == expected.ByteSize()
    parsed = pb.AgentMessage.FromString(msg)
    assert [frame_from_pb(m) for m in parsed.batch.frames] == [
        Frame(f.lsn, f.body) if not isinstance(f.body, Block)
        else Frame(f.lsn, Block(f.body.index, f.body.codec, f.body.raw_len, bytes(f.body.data)))
        for f in frames]


@pytest.mark.parametrize("sizes", [
    [],
    [0],
    [-5, 100, 0],
    [110, 111, 112, 113, 120, 127, 128, 129],           # frames around a varint step
    [16370, 16371, 16372, 16380, 16383, 16384, 16385],
    [65536] * 16,                                        # a 1 MiB batch
    [-300, (1 << 21) - 20, 3],                          # batch length past 2**21
])
def test_message_size_is_what_the_receiver_sees(sizes: list[int]) -> None:
    """Negative sizes stand for headers with paths of that length, others for blocks."""
    frames = [Frame(1 + i * 1000, Block(i, Codec.RAW, max(n, 1), bytes(n))) if n >= 0
              else Frame(1 + i * 1000, Header(Op.DELETE, "d/" + "x" * -n))
              for i, n in enumerate(sizes)]
    parts = [p for i, f in enumerate(frames) for p in encode_frame(i % 3, f)]
    msg = batch_message(parts, parts_size(parts))
    assert pb.AgentMessage.FromString(msg).ByteSize() == len(msg)
