"""The gRPC servicer: thin, every call handed to the Receiver.

When the receiver requires client certificates, the agent's identity is checked here,
before a session starts: the certificate's CN or one of its DNS SANs must equal the
source_id of the hello (CONTRACT.md, receiver [tls] client_ca).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc

from replicator.core.paths import encode_name
from replicator.receiver.session import HELLO_TIMEOUT, Session
from replicator.wire import pb, rpc
from replicator.wire.stream import RawBatch

if TYPE_CHECKING:
    from replicator.receiver.receiver import Receiver

log = logging.getLogger(__name__)


def peer_identities(context: grpc.aio.ServicerContext) -> set[str]:
    """The names a client certificate vouches for: its CN and DNS SANs."""
    auth = context.auth_context() or {}
    names: set[str] = set()
    for key in ("x509_common_name", "x509_subject_alternative_name"):
        for value in auth.get(key, []):
            names.add(value.decode("utf-8", "replace"))
    return names


async def _chain(first: pb.AgentMessage | RawBatch,
                 rest: AsyncIterator[pb.AgentMessage | RawBatch]
                 ) -> AsyncIterator[pb.AgentMessage | RawBatch]:
    yield first
    async for msg in rest:
        yield msg


class ReplicatorServicer(rpc.ReplicatorServicer):
    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver

    async def Stream(self,  # noqa: N802
                     request_iterator: AsyncIterator[pb.AgentMessage | RawBatch],
                     context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ReceiverMessage]:
        requests = request_iterator
        if self.receiver.require_client_identity:
            try:
                async with asyncio.timeout(HELLO_TIMEOUT):  # not wait_for: see Link._session
                    first = await anext(request_iterator)
            except (StopAsyncIteration, TimeoutError):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no hello")
                return
            if isinstance(first, RawBatch) or first.WhichOneof("kind") != "hello":
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    "the stream must open with a hello")
                return
            source = first.hello.source_id
            names = peer_identities(context)
            if source not in names:
                log.warning("stream refused: certificate does not match source source=%s "
                            "peer=%s certificate=%s", source[:100], context.peer(),
                            ",".join(sorted(names)) or "-")
                await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                    f"the client certificate is not for source {source[:100]!r}")
                return
            requests = _chain(first, request_iterator)
        session = Session(self.receiver, context.peer())
        async for msg in session.run(requests, context):
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
