from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Op(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OP_UNSPECIFIED: _ClassVar[Op]
    OP_FILE: _ClassVar[Op]
    OP_MKDIR: _ClassVar[Op]
    OP_SYMLINK: _ClassVar[Op]
    OP_DELETE: _ClassVar[Op]
    OP_RENAME: _ClassVar[Op]
    OP_SETATTR: _ClassVar[Op]

class Base(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BASE_EMPTY: _ClassVar[Base]
    BASE_PREVIOUS: _ClassVar[Base]

class Codec(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CODEC_RAW: _ClassVar[Codec]
    CODEC_LZ4: _ClassVar[Codec]
    CODEC_ZERO: _ClassVar[Codec]
OP_UNSPECIFIED: Op
OP_FILE: Op
OP_MKDIR: Op
OP_SYMLINK: Op
OP_DELETE: Op
OP_RENAME: Op
OP_SETATTR: Op
BASE_EMPTY: Base
BASE_PREVIOUS: Base
CODEC_RAW: Codec
CODEC_LZ4: Codec
CODEC_ZERO: Codec

class AgentMessage(_message.Message):
    __slots__ = ("hello", "batch", "heartbeat")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    batch: Batch
    heartbeat: Heartbeat
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., batch: _Optional[_Union[Batch, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("protocol_version", "source_id", "datasets", "capabilities", "agent_version")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    DATASETS_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    source_id: str
    datasets: _containers.RepeatedCompositeFieldContainer[DatasetHello]
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    agent_version: str
    def __init__(self, protocol_version: _Optional[int] = ..., source_id: _Optional[str] = ..., datasets: _Optional[_Iterable[_Union[DatasetHello, _Mapping]]] = ..., capabilities: _Optional[_Iterable[str]] = ..., agent_version: _Optional[str] = ...) -> None: ...

class DatasetHello(_message.Message):
    __slots__ = ("name", "type", "block_size", "acked_lsn", "epoch")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    ACKED_LSN_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: str
    block_size: int
    acked_lsn: int
    epoch: int
    def __init__(self, name: _Optional[str] = ..., type: _Optional[str] = ..., block_size: _Optional[int] = ..., acked_lsn: _Optional[int] = ..., epoch: _Optional[int] = ...) -> None: ...

class Batch(_message.Message):
    __slots__ = ("frames",)
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    frames: _containers.RepeatedCompositeFieldContainer[Frame]
    def __init__(self, frames: _Optional[_Iterable[_Union[Frame, _Mapping]]] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("dataset", "lsn", "header", "block", "end", "record")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    LSN_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    RECORD_FIELD_NUMBER: _ClassVar[int]
    dataset: int
    lsn: int
    header: RecordHeader
    block: Block
    end: RecordEnd
    record: Record
    def __init__(self, dataset: _Optional[int] = ..., lsn: _Optional[int] = ..., header: _Optional[_Union[RecordHeader, _Mapping]] = ..., block: _Optional[_Union[Block, _Mapping]] = ..., end: _Optional[_Union[RecordEnd, _Mapping]] = ..., record: _Optional[_Union[Record, _Mapping]] = ...) -> None: ...

class Record(_message.Message):
    __slots__ = ("header", "blocks", "end")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    header: RecordHeader
    blocks: _containers.RepeatedCompositeFieldContainer[Block]
    end: RecordEnd
    def __init__(self, header: _Optional[_Union[RecordHeader, _Mapping]] = ..., blocks: _Optional[_Iterable[_Union[Block, _Mapping]]] = ..., end: _Optional[_Union[RecordEnd, _Mapping]] = ...) -> None: ...

class Attrs(_message.Message):
    __slots__ = ("mode", "mtime_ns", "has_owner", "uid", "gid", "has_xattrs", "xattrs", "xattr_list")
    class XattrsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    MODE_FIELD_NUMBER: _ClassVar[int]
    MTIME_NS_FIELD_NUMBER: _ClassVar[int]
    HAS_OWNER_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    GID_FIELD_NUMBER: _ClassVar[int]
    HAS_XATTRS_FIELD_NUMBER: _ClassVar[int]
    XATTRS_FIELD_NUMBER: _ClassVar[int]
    XATTR_LIST_FIELD_NUMBER: _ClassVar[int]
    mode: int
    mtime_ns: int
    has_owner: bool
    uid: int
    gid: int
    has_xattrs: bool
    xattrs: _containers.ScalarMap[str, bytes]
    xattr_list: _containers.RepeatedCompositeFieldContainer[Xattr]
    def __init__(self, mode: _Optional[int] = ..., mtime_ns: _Optional[int] = ..., has_owner: _Optional[bool] = ..., uid: _Optional[int] = ..., gid: _Optional[int] = ..., has_xattrs: _Optional[bool] = ..., xattrs: _Optional[_Mapping[str, bytes]] = ..., xattr_list: _Optional[_Iterable[_Union[Xattr, _Mapping]]] = ...) -> None: ...

class Xattr(_message.Message):
    __slots__ = ("name", "value")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    name: bytes
    value: bytes
    def __init__(self, name: _Optional[bytes] = ..., value: _Optional[bytes] = ...) -> None: ...

class RecordHeader(_message.Message):
    __slots__ = ("op", "path", "new_path", "target", "attrs", "size", "base", "base_digest", "block_size", "first_seen", "raw_bytes", "resume_from")
    OP_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    NEW_PATH_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    ATTRS_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    BASE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    FIRST_SEEN_FIELD_NUMBER: _ClassVar[int]
    RAW_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESUME_FROM_FIELD_NUMBER: _ClassVar[int]
    op: Op
    path: bytes
    new_path: bytes
    target: bytes
    attrs: Attrs
    size: int
    base: Base
    base_digest: bytes
    block_size: int
    first_seen: float
    raw_bytes: int
    resume_from: int
    def __init__(self, op: _Optional[_Union[Op, str]] = ..., path: _Optional[bytes] = ..., new_path: _Optional[bytes] = ..., target: _Optional[bytes] = ..., attrs: _Optional[_Union[Attrs, _Mapping]] = ..., size: _Optional[int] = ..., base: _Optional[_Union[Base, str]] = ..., base_digest: _Optional[bytes] = ..., block_size: _Optional[int] = ..., first_seen: _Optional[float] = ..., raw_bytes: _Optional[int] = ..., resume_from: _Optional[int] = ...) -> None: ...

class Block(_message.Message):
    __slots__ = ("index", "codec", "raw_len", "data")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    RAW_LEN_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    index: int
    codec: Codec
    raw_len: int
    data: bytes
    def __init__(self, index: _Optional[int] = ..., codec: _Optional[_Union[Codec, str]] = ..., raw_len: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class RecordEnd(_message.Message):
    __slots__ = ("digest", "aborted")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    ABORTED_FIELD_NUMBER: _ClassVar[int]
    digest: bytes
    aborted: bool
    def __init__(self, digest: _Optional[bytes] = ..., aborted: _Optional[bool] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("agent_time", "datasets")
    AGENT_TIME_FIELD_NUMBER: _ClassVar[int]
    DATASETS_FIELD_NUMBER: _ClassVar[int]
    agent_time: float
    datasets: _containers.RepeatedCompositeFieldContainer[DatasetLag]
    def __init__(self, agent_time: _Optional[float] = ..., datasets: _Optional[_Iterable[_Union[DatasetLag, _Mapping]]] = ...) -> None: ...

class DatasetLag(_message.Message):
    __slots__ = ("dataset", "state", "error", "last_lsn", "oldest_unwritten_at", "oldest_unflushed_at", "oldest_unapplied_at", "pending_bytes", "pending_changes")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    LAST_LSN_FIELD_NUMBER: _ClassVar[int]
    OLDEST_UNWRITTEN_AT_FIELD_NUMBER: _ClassVar[int]
    OLDEST_UNFLUSHED_AT_FIELD_NUMBER: _ClassVar[int]
    OLDEST_UNAPPLIED_AT_FIELD_NUMBER: _ClassVar[int]
    PENDING_BYTES_FIELD_NUMBER: _ClassVar[int]
    PENDING_CHANGES_FIELD_NUMBER: _ClassVar[int]
    dataset: int
    state: str
    error: str
    last_lsn: int
    oldest_unwritten_at: float
    oldest_unflushed_at: float
    oldest_unapplied_at: float
    pending_bytes: int
    pending_changes: int
    def __init__(self, dataset: _Optional[int] = ..., state: _Optional[str] = ..., error: _Optional[str] = ..., last_lsn: _Optional[int] = ..., oldest_unwritten_at: _Optional[float] = ..., oldest_unflushed_at: _Optional[float] = ..., oldest_unapplied_at: _Optional[float] = ..., pending_bytes: _Optional[int] = ..., pending_changes: _Optional[int] = ...) -> None: ...

class ReceiverMessage(_message.Message):
    __slots__ = ("welcome", "ack")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    welcome: Welcome
    ack: Ack
    def __init__(self, welcome: _Optional[_Union[Welcome, _Mapping]] = ..., ack: _Optional[_Union[Ack, _Mapping]] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("protocol_version", "datasets", "capabilities")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    DATASETS_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    datasets: _containers.RepeatedCompositeFieldContainer[DatasetPosition]
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, protocol_version: _Optional[int] = ..., datasets: _Optional[_Iterable[_Union[DatasetPosition, _Mapping]]] = ..., capabilities: _Optional[_Iterable[str]] = ...) -> None: ...

class DatasetPosition(_message.Message):
    __slots__ = ("dataset", "epoch", "written_lsn", "flushed_lsn", "applied_lsn", "state", "partial")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    WRITTEN_LSN_FIELD_NUMBER: _ClassVar[int]
    FLUSHED_LSN_FIELD_NUMBER: _ClassVar[int]
    APPLIED_LSN_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_FIELD_NUMBER: _ClassVar[int]
    dataset: int
    epoch: int
    written_lsn: int
    flushed_lsn: int
    applied_lsn: int
    state: str
    partial: PartialRecord
    def __init__(self, dataset: _Optional[int] = ..., epoch: _Optional[int] = ..., written_lsn: _Optional[int] = ..., flushed_lsn: _Optional[int] = ..., applied_lsn: _Optional[int] = ..., state: _Optional[str] = ..., partial: _Optional[_Union[PartialRecord, _Mapping]] = ...) -> None: ...

class PartialRecord(_message.Message):
    __slots__ = ("lsn", "path", "size", "mtime_ns", "block_size", "blocks")
    LSN_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    MTIME_NS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    lsn: int
    path: bytes
    size: int
    mtime_ns: int
    block_size: int
    blocks: int
    def __init__(self, lsn: _Optional[int] = ..., path: _Optional[bytes] = ..., size: _Optional[int] = ..., mtime_ns: _Optional[int] = ..., block_size: _Optional[int] = ..., blocks: _Optional[int] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("datasets", "stream_bytes")
    DATASETS_FIELD_NUMBER: _ClassVar[int]
    STREAM_BYTES_FIELD_NUMBER: _ClassVar[int]
    datasets: _containers.RepeatedCompositeFieldContainer[DatasetAck]
    stream_bytes: int
    def __init__(self, datasets: _Optional[_Iterable[_Union[DatasetAck, _Mapping]]] = ..., stream_bytes: _Optional[int] = ...) -> None: ...

class DatasetAck(_message.Message):
    __slots__ = ("dataset", "written_lsn", "flushed_lsn", "applied_lsn", "state", "error", "resync_paths")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    WRITTEN_LSN_FIELD_NUMBER: _ClassVar[int]
    FLUSHED_LSN_FIELD_NUMBER: _ClassVar[int]
    APPLIED_LSN_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RESYNC_PATHS_FIELD_NUMBER: _ClassVar[int]
    dataset: int
    written_lsn: int
    flushed_lsn: int
    applied_lsn: int
    state: str
    error: str
    resync_paths: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, dataset: _Optional[int] = ..., written_lsn: _Optional[int] = ..., flushed_lsn: _Optional[int] = ..., applied_lsn: _Optional[int] = ..., state: _Optional[str] = ..., error: _Optional[str] = ..., resync_paths: _Optional[_Iterable[bytes]] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("json",)
    JSON_FIELD_NUMBER: _ClassVar[int]
    json: str
    def __init__(self, json: _Optional[str] = ...) -> None: ...

class PromoteRequest(_message.Message):
    __slots__ = ("source", "dataset", "force")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    source: str
    dataset: str
    force: bool
    def __init__(self, source: _Optional[str] = ..., dataset: _Optional[str] = ..., force: _Optional[bool] = ...) -> None: ...

class PromoteReply(_message.Message):
    __slots__ = ("json", "exit_code")
    JSON_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    json: str
    exit_code: int
    def __init__(self, json: _Optional[str] = ..., exit_code: _Optional[int] = ...) -> None: ...

class ManifestRequest(_message.Message):
    __slots__ = ("source", "dataset")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    source: str
    dataset: str
    def __init__(self, source: _Optional[str] = ..., dataset: _Optional[str] = ...) -> None: ...

class ManifestEntry(_message.Message):
    __slots__ = ("path", "kind", "size", "digest", "block_hashes", "target")
    PATH_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    path: bytes
    kind: str
    size: int
    digest: bytes
    block_hashes: bytes
    target: bytes
    def __init__(self, path: _Optional[bytes] = ..., kind: _Optional[str] = ..., size: _Optional[int] = ..., digest: _Optional[bytes] = ..., block_hashes: _Optional[bytes] = ..., target: _Optional[bytes] = ...) -> None: ...
