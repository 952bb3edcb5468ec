"""The gRPC servicer: thin, every call handed to the Receiver."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc

from replicator.core.paths import encode_name
from replicator.receiver.session import Session
from replicator.wire import pb, rpc

if TYPE_CHECKING:
    from replicator.receiver.receiver import Receiver


class ReplicatorServicer(rpc.ReplicatorServicer):
    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver

    async def Stream(self, request_iterator: AsyncIterator[pb.AgentMessage],  # noqa: N802
                     context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ReceiverMessage]:
        session = Session(self.receiver, context.peer())
        async for msg in session.run(request_iterator, context):
            yield msg

    async def GetStatus(self, request: pb.StatusRequest,  # noqa: N802
                        context: grpc.aio.ServicerContext) -> pb.StatusReply:
        return pb.StatusReply(json=json.dumps(self.receiver.status_document()))

    async def GetManifest(self, request: pb.ManifestRequest,  # noqa: N802
                          context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ManifestEntry]:
        ds = self.receiver.find(request.source, request.dataset)
        if ds is None:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"no dataset {request.source}/{request.dataset}")
            return
        for e in ds.manifest.entries():
            yield pb.ManifestEntry(path=encode_name(e.path), kind=e.kind, size=e.size,
                                   digest=e.digest or b"", block_hashes=e.hashes or b"",
                                   target=encode_name(e.target or ""))
