"""Conversions between core records and protobuf messages.

Everything that arrives from the wire is checked here before any other module sees it:
enum values, lengths and sizes. Paths are checked by the receiver against its mirror
(`replicator.core.paths`), since only it knows the root.

Paths and symlink targets travel as bytes, because Linux names are bytes and protobuf
`string` fields refuse what is not UTF-8. In the process they are str with surrogateescape.
Sending encodes with `os.fsencode`, the inverse of the `os.fsdecode` the agent read the
names with; receiving decodes with `core.paths.decode_name`, the inverse of the
`encode_name` the receiver's mirror writes them with. So the mirror gets the primary's exact
bytes even if one side's file-system encoding is not UTF-8 (it is by default on Linux, in
the C locale too). Any bytes decode, so a name that is not UTF-8 can never make a frame
unreadable; what is refused is decided by `split_relpath` alone.
"""

from __future__ import annotations

import os

from replicator.core.blocks import block_count
from replicator.core.paths import decode_name
from replicator.core.records import Attrs, Base, Block, Codec, End, Frame, Header, Op, Whole
from replicator.errors import ProtocolError
from replicator.wire import pb

MAX_BLOCK_SIZE = 1 << 20
MAX_DIGEST = 16
MAX_PATH_BYTES = 4096
MAX_XATTRS = 1024
MAX_XATTR_NAME = 255         # XATTR_NAME_MAX on Linux
MAX_XATTR_VALUE = 64 * 1024
MAX_FILE_SIZE = 1 << 50
# blocks one whole-record frame may hold: the agent sends only small records whole
MAX_RECORD_BLOCKS = 64

# wire value -> member: a dict lookup is a tenth of the cost of calling the enum, paid
# three times for every small file the receiver takes
_OPS = {int(v): v for v in Op}
_BASES = {int(v): v for v in Base}
_CODECS = {int(v): v for v in Codec}


def attrs_to_pb(a: Attrs, out: pb.Attrs) -> None:
    out.mode = a.mode
    out.mtime_ns = a.mtime_ns
    if a.uid is not None and a.gid is not None:
        out.has_owner = True
        out.uid = a.uid
        out.gid = a.gid
    if a.xattrs is not None:
        out.has_xattrs = True
        # UTF-8 names in the map, as before xattr_list existed, so that an older receiver
        # (which ignores xattr_list) keeps them; only the others need xattr_list
        for name, value in a.xattrs.items():
            try:
                out.xattrs[name.decode()] = value
            except UnicodeDecodeError:
                x = out.xattr_list.add()
                x.name = name
                x.value = value


def attrs_from_pb(m: pb.Attrs) -> Attrs:
    xattrs: dict[bytes, bytes] | None = None
    if m.has_xattrs:
        # counted before anything is looked at
        count = len(m.xattrs) + len(m.xattr_list)
        if count > MAX_XATTRS:
            raise ProtocolError(f"{count} extended attributes is too many")
        xattrs = {}
        pairs: list[tuple[bytes, bytes]] = []
        if count:  # usually none: then nothing is built to find that out
            # the union of both: map names are UTF-8, list names any bytes
            pairs = [(k.encode(), v) for k, v in m.xattrs.items()]
            pairs += [(x.name, x.value) for x in m.xattr_list]
        for name, value in pairs:
            if (not name or b"\0" in name or len(name) > MAX_XATTR_NAME
                    or len(value) > MAX_XATTR_VALUE):
                raise ProtocolError(f"extended attribute {name[:64]!r} is invalid "
                                    f"(name of {len(name)} bytes, value of {len(value)})")
            if name in xattrs:
                raise ProtocolError(f"extended attribute {name[:64]!r} is sent twice")
            xattrs[name] = value
    return Attrs(
        mode=m.mode, mtime_ns=m.mtime_ns,
        uid=m.uid if m.has_owner else None, gid=m.gid if m.has_owner else None,
        xattrs=xattrs,
    )


def frame_to_pb(dataset: int, frame: Frame, out: pb.Frame | None = None) -> pb.Frame:
    """`frame` as a pb.Frame of `dataset` (filled into `out` if given).

    Raises UnicodeEncodeError for a path holding a lone surrogate that stands for no byte,
    which no name read from the file system does.
    """
    m = out if out is not None else pb.Frame()
    m.dataset = dataset
    m.lsn = frame.lsn
    body = frame.body
    if isinstance(body, Block):
        _block_to_pb(body, m.block)
    elif isinstance(body, Header):
        _header_to_pb(body, m.header)
    elif isinstance(body, End):
        _end_to_pb(body, m.end)
    else:
        r = m.record
        _header_to_pb(body.header, r.header)
        for b in body.blocks:
            _block_to_pb(b, r.blocks.add())
        _end_to_pb(body.end, r.end)
    return m


def _block_to_pb(body: Block, b: pb.Block) -> None:
    b.index = body.index
    b.codec = int(body.codec)  # type: ignore[assignment]
    b.raw_len = body.raw_len
    b.data = body.data if isinstance(body.data, bytes) else bytes(body.data)


def _header_to_pb(body: Header, h: pb.RecordHeader) -> None:
    h.op = int(body.op)  # type: ignore[assignment]
    h.path = os.fsencode(body.path)
    h.new_path = os.fsencode(body.new_path)
    h.target = os.fsencode(body.target)
    if body.attrs is not None:
        attrs_to_pb(body.attrs, h.attrs)
    h.size = body.size
    h.base = int(body.base)  # type: ignore[assignment]
    h.base_digest = body.base_digest
    h.block_size = body.block_size
    h.first_seen = body.first_seen
    h.raw_bytes = body.raw_bytes
    h.resume_from = body.resume_from


def _end_to_pb(body: End, e: pb.RecordEnd) -> None:
    e.digest = body.digest
    e.aborted = body.aborted


def _path_from_pb(raw: bytes, lsn: int, what: str) -> str:
    # measured on the bytes, before anything is decoded or kept
    if len(raw) > MAX_PATH_BYTES:
        raise ProtocolError(f"LSN {lsn}: {what} of {len(raw)} bytes, over {MAX_PATH_BYTES}")
    return decode_name(raw)


def frame_from_pb(m: pb.Frame) -> Frame:
    """Checks and converts one frame; raises ProtocolError on anything malformed."""
    lsn = m.lsn
    if lsn <= 0:
        raise ProtocolError(f"frame with LSN {lsn}")
    kind = m.WhichOneof("body")
    if kind == "block":
        return Frame(lsn, _block_from_pb(m.block, lsn))
    if kind == "header":
        return Frame(lsn, _header_from_pb(m.header, lsn))
    if kind == "end":
        return Frame(lsn, _end_from_pb(m.end, lsn))
    if kind == "record":
        r = m.record
        header = _header_from_pb(r.header, lsn)
        if header.resume_from:
            raise ProtocolError(f"LSN {lsn}: a whole record cannot resume")
        if len(r.blocks) > MAX_RECORD_BLOCKS:
            raise ProtocolError(f"LSN {lsn}: {len(r.blocks)} blocks in one record frame")
        blocks = tuple([_block_from_pb(b, lsn) for b in r.blocks])
        return Frame(lsn, Whole(header, blocks, _end_from_pb(r.end, lsn)))
    raise ProtocolError(f"LSN {lsn}: frame without a body")


def _block_from_pb(b: pb.Block, lsn: int) -> Block:
    codec = _CODECS.get(b.codec)
    if codec is None:
        raise ProtocolError(f"LSN {lsn}: unknown codec {b.codec}")
    raw_len = b.raw_len
    if not 0 < raw_len <= MAX_BLOCK_SIZE:
        raise ProtocolError(f"LSN {lsn}: block of {raw_len} bytes")
    data = b.data  # once: every read of a bytes field copies it out of the message
    if codec is Codec.RAW and len(data) != raw_len:
        raise ProtocolError(f"LSN {lsn}: raw block length {len(data)} != {raw_len}")
    if codec is Codec.ZERO and data:
        raise ProtocolError(f"LSN {lsn}: zero block carries data")
    if len(data) > MAX_BLOCK_SIZE + 4096:
        raise ProtocolError(f"LSN {lsn}: block payload of {len(data)} bytes")
    return Block(b.index, codec, raw_len, data)


def _header_from_pb(h: pb.RecordHeader, lsn: int) -> Header:
    op = _OPS.get(h.op)
    base = _BASES.get(h.base)
    if op is None or base is None:
        raise ProtocolError(f"LSN {lsn}: unknown op {h.op} or base {h.base}")
    path = _path_from_pb(h.path, lsn, "path")
    raw = h.new_path
    new_path = _path_from_pb(raw, lsn, "new_path") if raw else ""
    raw = h.target
    target = _path_from_pb(raw, lsn, "symlink target") if raw else ""
    if op is Op.FILE:
        bs = h.block_size
        if not 4096 <= bs <= MAX_BLOCK_SIZE or bs & (bs - 1):
            raise ProtocolError(f"LSN {lsn}: block size {bs}")
        if h.size > MAX_FILE_SIZE:
            raise ProtocolError(f"LSN {lsn}: file size {h.size}")
        if base is Base.PREVIOUS and len(h.base_digest) != MAX_DIGEST:
            raise ProtocolError(f"LSN {lsn}: patch without a valid base digest")
        if h.resume_from and (base is not Base.EMPTY
                              or h.resume_from > block_count(h.size, bs)):
            raise ProtocolError(f"LSN {lsn}: resume from block {h.resume_from}")
    elif h.resume_from:
        raise ProtocolError(f"LSN {lsn}: a {op.name} record cannot resume")
    has_attrs = h.HasField("attrs")
    if op in (Op.FILE, Op.MKDIR, Op.SYMLINK, Op.SETATTR) and not has_attrs:
        raise ProtocolError(f"LSN {lsn}: {op.name} without attributes")
    return Header(
        op=op, path=path, new_path=new_path, target=target,
        attrs=attrs_from_pb(h.attrs) if has_attrs else None,
        size=h.size, base=base, base_digest=h.base_digest, block_size=h.block_size,
        first_seen=h.first_seen, raw_bytes=h.raw_bytes, resume_from=h.resume_from,
    )


def _end_from_pb(e: pb.RecordEnd, lsn: int) -> End:
    digest = e.digest
    if len(digest) not in (0, MAX_DIGEST):
        raise ProtocolError(f"LSN {lsn}: digest of {len(digest)} bytes")
    return End(digest, e.aborted)


def encode_frame(frame: Frame) -> bytes:
    """A frame as the bytes the receiver's journal stores (a serialized pb.Frame)."""
    return frame_to_pb(0, frame).SerializeToString()


def decode_frame(payload: bytes) -> Frame:
    """Inverse of encode_frame; checks the frame like anything else from the wire."""
    try:
        m = pb.Frame.FromString(payload)
    except Exception as e:  # protobuf raises DecodeError, a bare Exception subclass
        raise ProtocolError(f"undecodable frame: {e}") from None
    return frame_from_pb(m)

