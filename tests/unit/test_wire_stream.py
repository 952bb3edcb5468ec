"""The Stream's own (de)serializers: batches reach the session unparsed, everything else
as the generated code would give it, and a batch that is not one is a protocol error."""

from __future__ import annotations

from typing import Any

import pytest

from replicator.core.records import End, Frame
from replicator.errors import ProtocolError
from replicator.wire import pb, rpc
from replicator.wire.framing import batch_message, encode_frame
from replicator.wire.stream import (
    RawBatch,
    _deserialize,
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
