"""The Stream RPC's plumbing: how its messages are (de)serialized on each side.

The generated stub and servicer registration parse and serialise every message on the
event loop. For the bulk of the traffic, batches of about 1 MiB, that puts a copy of every
byte on the one thread that also runs gRPC's I/O for both daemons in `replicator mirror`.
So the Stream is registered here with its own serializers:

- agent: a batch arrives as the bytes `wire.framing.batch_message` built and goes out as it
  is; hello and heartbeat messages are serialised as usual;
- receiver: a message that starts with the AgentMessage.batch tag is not parsed on the
  event loop but handed on as a `RawBatch`, which the session parses in its worker thread,
  frame by frame, keeping each frame's bytes as they came for its journal (see
  `RawBatch.frames`); anything else is parsed at once (hellos and heartbeats are small).

The other methods are registered exactly as the generated code does.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from replicator.errors import ProtocolError
from replicator.wire import SERVICE_NAME, pb, rpc
from replicator.wire.framing import AGENT_MESSAGE_BATCH, BATCH_FRAME_TAG, read_varint

STREAM_METHOD = f"/{SERVICE_NAME}/Stream"


@dataclass(frozen=True, slots=True)
class RawBatch:
    """A serialized AgentMessage holding a batch, not parsed yet."""

    data: bytes

    @classmethod
    def of(cls, message: pb.AgentMessage) -> RawBatch:
        """A batch message that arrived parsed (it did not start with the batch tag)."""
        return cls(message.SerializeToString())

    def parse(self) -> pb.Batch:
        """The batch; ProtocolError if the bytes are not an AgentMessage with a batch."""
        try:
            message = pb.AgentMessage.FromString(self.data)
        except Exception as e:  # protobuf raises DecodeError, a bare Exception subclass
            raise ProtocolError(f"undecodable batch message: {e}") from None
        if message.WhichOneof("kind") != "batch":
            raise ProtocolError("a message that began as a batch is not one")
        return message.batch

    def frames(self) -> Iterator[tuple[pb.Frame, bytes]]:
        """Each frame, parsed, with its serialized bytes as they arrived: what the journal
        stores, so that no frame is serialized again, and whose length is what the frame
        took on the wire. A batch laid out as `framing.batch_message` lays it out (one
        batch field; in it, frames only) is cut into frames here and each is parsed on its
        own; any other layout, valid protobuf all the same, is parsed whole and its frames
        serialized. ProtocolError for bytes that do not parse, raised when the frame is
        reached: the frames before it are yielded first."""
        spans = _frame_spans(self.data)
        if spans is None:
            for f in self.parse().frames:
                yield f, f.SerializeToString()
            return
        data, parse = self.data, pb.Frame.FromString
        for start, end in spans:
            raw = data[start:end]
            try:
                f = parse(raw)
            except Exception as e:  # protobuf raises DecodeError, a bare Exception subclass
                raise ProtocolError(f"undecodable frame: {e}") from None
            yield f, raw

    def __len__(self) -> int:
        """Its size on the wire, as the agent counted it for flow control."""
        return len(self.data)


def _frame_spans(data: bytes) -> list[tuple[int, int]] | None:
    """Where each frame of a batch message lies in `data`, if the message is one
    AgentMessage.batch field that holds Batch.frames entries only; else None."""
    n = len(data)
    try:
        if data[:1] != AGENT_MESSAGE_BATCH:
            return None
        size, pos = read_varint(data, 1)
        if pos + size != n:
            return None
        spans = []
        while pos < n:
            if data[pos] != BATCH_FRAME_TAG:
                return None
            length, start = read_varint(data, pos + 1)
            pos = start + length
            if pos > n:
                return None
            spans.append((start, pos))
    except (IndexError, ValueError):
        return None
    return spans


def _serialize(message: Any) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()


def _deserialize(data: bytes) -> pb.AgentMessage | RawBatch:
    if data[:1] == AGENT_MESSAGE_BATCH:
        return RawBatch(data)
    return pb.AgentMessage.FromString(data)


def agent_stream(channel: grpc.aio.Channel) -> grpc.aio.StreamStreamMultiCallable:
    """The Stream RPC on `channel`: takes pb.AgentMessage objects or `batch_message` bytes,
    gives pb.ReceiverMessage objects."""
    return channel.stream_stream(STREAM_METHOD, request_serializer=_serialize,
                                 response_deserializer=pb.ReceiverMessage.FromString)


def add_replicator_servicer(servicer: rpc.ReplicatorServicer, server: grpc.aio.Server) -> None:
    """`rpc.add_ReplicatorServicer_to_server`, with the Stream's requests arriving as
    pb.AgentMessage (hello, heartbeat) or RawBatch."""
    handlers = {
        "Stream": grpc.stream_stream_rpc_method_handler(
            servicer.Stream, request_deserializer=_deserialize,
            response_serializer=pb.ReceiverMessage.SerializeToString),
        "GetStatus": grpc.unary_unary_rpc_method_handler(
            servicer.GetStatus, request_deserializer=pb.StatusRequest.FromString,
            response_serializer=pb.StatusReply.SerializeToString),
        "Promote": grpc.unary_unary_rpc_method_handler(
            servicer.Promote, request_deserializer=pb.PromoteRequest.FromString,
            response_serializer=pb.PromoteReply.SerializeToString),
        "GetManifest": grpc.unary_stream_rpc_method_handler(
            servicer.GetManifest, request_deserializer=pb.ManifestRequest.FromString,
            response_serializer=pb.ManifestEntry.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME,
                                                                           handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
