"""The only package that imports the generated protobuf modules.

`pb` and `rpc` are the generated modules; `convert` turns core records into protobuf
frames and back, checking everything that comes from the wire.
"""

from replicator.v1 import replicator_pb2 as pb
from replicator.v1 import replicator_pb2_grpc as rpc

PROTOCOL_VERSION = 1
SERVICE_NAME = "replicator.v1.Replicator"
# Welcome.capabilities: the receiver takes Frame.record (a whole record in one frame)
CAPABILITY_RECORDS = "records"

__all__ = ["pb", "rpc", "PROTOCOL_VERSION", "SERVICE_NAME", "CAPABILITY_RECORDS"]
