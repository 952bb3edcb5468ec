"""The Stream RPC's plumbing: how its messages are (de)serialized on each side.

The generated stub and servicer registration parse and serialise every message on the
event loop. For the bulk of the traffic, batches of about 1 MiB, that puts a copy of every
byte on the one thread that also runs gRPC's I/O for both daemons in `replicator mirror`.
So the Stream is registered here with its own serializers:

- agent: a batch arrives as the bytes `wire.framing.batch_message` built and goes out as it
  is; hello and heartbeat messages are serialised as usual;
- receiver: a message that starts with the AgentMessage.batch tag is not parsed on the
  event loop but handed on as a `RawBatch`, which the session parses in its worker thread;
  anything else is parsed at once (hellos and heartbeats are small).

The other methods are registered exactly as the generated code does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc

from replicator.errors import ProtocolError
from replicator.wire import SERVICE_NAME, pb, rpc
from replicator.wire.framing import AGENT_MESSAGE_BATCH

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

    def __len__(self) -> int:
        """Its size on the wire, as the agent counted it for flow control."""
        return len(self.data)


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
