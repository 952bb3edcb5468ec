"""The agent's side of the Stream: frames encoded once, batches assembled with one copy.

Going through protobuf objects, a block's bytes were copied five times on the agent before
gRPC took them (into the Block message, into the batch by `append`, once more for every
`len(block.data)`, and by serialisation), and in a 1 GiB transfer those copies cost more CPU
than reading the file. Here a frame is encoded as soon as it is queued, as the Batch's
`frames` entry it will be: block frames by hand (a few varints around the payload, which is
kept as the caller's buffer, not copied), header and end frames by protobuf (they are small).
A batch is then one `b"".join`, the only copy of the payload before gRPC's own.

The bytes are exactly what `pb.AgentMessage(batch=...).SerializeToString()` gives for the
same frames (tests compare them), so the receiver parses them with the generated classes
and counts the same message sizes for flow control. `wire.stream.agent_stream` opens the
Stream with a serializer that passes such bytes through untouched.
"""

from __future__ import annotations

from collections.abc import Iterable

from replicator.core.records import Block, Frame
from replicator.wire.convert import frame_to_pb

Buffer = bytes | bytearray | memoryview

# protobuf tags: (field number << 3) | wire type; 0 = varint, 2 = length-delimited
AGENT_MESSAGE_BATCH = b"\x12"    # AgentMessage.batch = 2
BATCH_FRAME_TAG = 0x0A           # Batch.frames = 1, as an int
_BATCH_FRAME = bytes((BATCH_FRAME_TAG,))
_FRAME_DATASET = 0x08            # Frame.dataset = 1
_FRAME_LSN = 0x10                # Frame.lsn = 2
_FRAME_BLOCK = 0x22              # Frame.block = 4
_BLOCK_INDEX = 0x08              # Block.index = 1
_BLOCK_CODEC = 0x10              # Block.codec = 2
_BLOCK_RAW_LEN = 0x18            # Block.raw_len = 3
_BLOCK_DATA = 0x22               # Block.data = 4


def varint(n: int) -> bytes:
    """`n` (>= 0) as a protobuf base-128 varint."""
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """The protobuf varint at `pos` in `data` and the position after it (the inverse of
    `varint`). IndexError if it runs past the end, ValueError if past 10 bytes."""
    value = shift = 0
    for _ in range(10):
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7
    raise ValueError("varint longer than 10 bytes")


def _field(tag: int, n: int, out: bytearray) -> None:
    """A varint field, left out when 0 as proto3 does."""
    if n:
        out.append(tag)
        out += varint(n)


def _block_parts(dataset: int, lsn: int, b: Block) -> list[Buffer]:
    block = bytearray()
    _field(_BLOCK_INDEX, b.index, block)
    _field(_BLOCK_CODEC, int(b.codec), block)
    _field(_BLOCK_RAW_LEN, b.raw_len, block)
    n = len(b.data)
    if n:
        block.append(_BLOCK_DATA)
        block += varint(n)
    frame = bytearray()
    _field(_FRAME_DATASET, dataset, frame)
    _field(_FRAME_LSN, lsn, frame)
    frame.append(_FRAME_BLOCK)
    frame += varint(len(block) + n)
    frame += block
    head = _BATCH_FRAME + varint(len(frame) + n) + frame
    return [head, b.data] if n else [head]


def encode_frame(dataset: int, frame: Frame) -> list[Buffer]:
    """`frame` as its entry in Batch.frames (tag, length, Frame), in parts to be joined.

    A block's payload is one of the parts, as given: the caller must not change that buffer
    until the batch is joined. Raises UnicodeEncodeError as `frame_to_pb` does.
    """
    if isinstance(frame.body, Block):
        return _block_parts(dataset, frame.lsn, frame.body)
    encoded = frame_to_pb(dataset, frame).SerializeToString()
    return [_BATCH_FRAME + varint(len(encoded)) + encoded]


def parts_size(parts: Iterable[Buffer]) -> int:
    return sum(len(p) for p in parts)


def batch_message(parts: list[Buffer], size: int | None = None) -> bytes:
    """The serialized AgentMessage whose batch holds the encoded frames `parts`
    (`size`: their total length, if the caller knows it)."""
    if size is None:
        size = parts_size(parts)
    return b"".join([AGENT_MESSAGE_BATCH, varint(size), *parts])
