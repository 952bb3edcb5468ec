"""Frames to protobuf and back: every field survives, names are bytes, and whatever is
malformed on the wire is refused with ProtocolError before anything else sees it."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from replicator.core.records import Attrs, Base, Block, Codec, End, Frame, Header, Op, Whole
from replicator.errors import ProtocolError
from replicator.wire import pb
from replicator.wire.convert import (
    MAX_BLOCK_SIZE,
    MAX_FILE_SIZE,
    MAX_PATH_BYTES,
    MAX_RECORD_BLOCKS,
    MAX_XATTR_NAME,
    MAX_XATTR_VALUE,
    MAX_XATTRS,
    decode_frame,
    encode_frame,
    frame_from_pb,
    frame_to_pb,
)

ODD = os.fsdecode(b"\x80dir/\xff\xfe.bin")    # not UTF-8: lone surrogates in the str
ODD_TARGET = os.fsdecode(b"../\xc3\xbc\xfa")  # "ü" and a byte that is not UTF-8
ATTRS = Attrs(mode=0o100644, mtime_ns=1_700_000_000_123_456_789)
FULL_ATTRS = Attrs(mode=0o100600, mtime_ns=-1, uid=1000, gid=100,
                   xattrs={b"user.a": b"1", b"user.empty": b"", b"user.\xff\xfe": b"odd"})
DIGEST = bytes(range(16))


def file_header(**kw: object) -> Header:
    args: dict[str, object] = dict(op=Op.FILE, path="f", attrs=ATTRS, size=70_000,
                                   block_size=65536, first_seen=1_700_000_000.25, raw_bytes=7)
    args.update(kw)
    return Header(**args)  # type: ignore[arg-type]


FRAMES = [
    Frame(1, file_header(path=ODD)),
    Frame(2, file_header(attrs=FULL_ATTRS, base=Base.PREVIOUS, base_digest=DIGEST)),
    Frame(3, file_header(attrs=Attrs(mode=0o100644, mtime_ns=0, xattrs={}))),  # clear all
    Frame(4, Header(Op.MKDIR, "ünïcödé", attrs=Attrs(mode=0o040755, mtime_ns=5))),
    Frame(5, Header(Op.SYMLINK, ODD + "l", target=ODD_TARGET,
                    attrs=Attrs(mode=0o120777, mtime_ns=6))),
    Frame(6, Header(Op.DELETE, "-rf")),
    Frame(7, Header(Op.RENAME, ODD, new_path=os.fsdecode(b"..hidden\xfd"))),
    Frame(8, Header(Op.SETATTR, "with space", attrs=ATTRS)),
    Frame(9, Block(0, Codec.RAW, 5, b"hello")),
    Frame(9, Block(1, Codec.LZ4, 65536, b"\x1f\x00\x01\x00")),
    Frame(9, Block(2**40, Codec.ZERO, 4096, b"")),
    Frame(9, End(DIGEST)),
    Frame(10, End(aborted=True)),
    Frame(11, End()),
    Frame(12, file_header(resume_from=2)),        # continues a partial: all its blocks
    Frame(13, Whole(file_header(size=5, attrs=FULL_ATTRS),             # a whole small file
                    (Block(0, Codec.RAW, 5, b"hello"),), End(DIGEST))),
    Frame(14, Whole(Header(Op.MKDIR, ODD, attrs=ATTRS), (), End())),   # a whole mkdir
    Frame(15, Whole(file_header(size=0), (), End(aborted=True))),
]


@pytest.mark.parametrize("frame", FRAMES)
def test_frame_round_trips(frame: Frame) -> None:
    m = frame_to_pb(3, frame)
    assert m.dataset == 3
    assert frame_from_pb(m) == frame
    assert decode_frame(encode_frame(frame)) == frame


@pytest.mark.parametrize("header", [f.body for f in FRAMES if isinstance(f.body, Header)])
def test_names_travel_as_the_file_systems_bytes(header: Header) -> None:
    h = frame_to_pb(0, Frame(1, header)).header
    assert (h.path, h.new_path, h.target) == (
        os.fsencode(header.path), os.fsencode(header.new_path), os.fsencode(header.target))


def test_frame_to_pb_fills_the_message_given() -> None:
    out = pb.Frame()
    assert frame_to_pb(0, FRAMES[0], out) is out and out.header.path == b"\x80dir/\xff\xfe.bin"


def test_a_lone_surrogate_that_stands_for_no_byte_cannot_be_sent() -> None:
    with pytest.raises(UnicodeEncodeError):
        frame_to_pb(0, Frame(1, Header(Op.DELETE, "\ud800")))


@pytest.mark.parametrize("raw", [b"\xff", b"\xc3", b"\xed\xa0\x80", b"a/\x00b",
                                 b"\xf4\x90\x80\x80"])
def test_any_bytes_from_the_wire_decode_and_encode_back(raw: bytes) -> None:
    # invalid UTF-8, a truncated sequence, an encoded surrogate, NUL, beyond U+10FFFF: the
    # receiver's path checks decide, not the decoder
    m = pb.Frame(lsn=1, header=pb.RecordHeader(op=pb.OP_DELETE, path=raw))
    h = frame_from_pb(m).body
    assert isinstance(h, Header) and os.fsencode(h.path) == raw


@pytest.mark.parametrize("raw, ok", [
    ("é".encode() * (MAX_PATH_BYTES // 2), True),           # 2048 chars, 4096 bytes
    ("é".encode() * (MAX_PATH_BYTES // 2) + b"x", False),   # 2049 chars, 4097 bytes
    (b"\xff" * MAX_PATH_BYTES, True),
    (b"\xff" * (MAX_PATH_BYTES + 1), False),
])
@pytest.mark.parametrize("field", ["path", "new_path", "target"])
def test_path_length_is_counted_in_bytes(raw: bytes, ok: bool, field: str) -> None:
    h = pb.RecordHeader(op=pb.OP_RENAME, path=b"p", new_path=b"q")
    setattr(h, field, raw)
    m = pb.Frame(lsn=1, header=h)
    if ok:
        assert os.fsencode(getattr(frame_from_pb(m).body, field)) == raw
    else:
        with pytest.raises(ProtocolError, match=f"{MAX_PATH_BYTES + 1} bytes"):
            frame_from_pb(m)


def _set(*steps: tuple[str, object]) -> Callable[[pb.Frame], None]:
    """A mutation of a valid frame: (dotted field, value) pairs set in order."""
    def apply(m: pb.Frame) -> None:
        for dotted, value in steps:
            *parents, name = dotted.split(".")
            target: object = m
            for p in parents:
                target = getattr(target, p)
            setattr(target, name, value)
    return apply


def _clear(field: str) -> Callable[[pb.Frame], None]:
    return lambda m: m.header.ClearField(field)  # type: ignore[arg-type]


def _xattrs(n: int, key: str = "user.k", size: int = 1) -> Callable[[pb.Frame], None]:
    """n entries in the old string-keyed map."""
    def apply(m: pb.Frame) -> None:
        m.header.attrs.has_xattrs = True
        for i in range(n):
            m.header.attrs.xattrs[f"{key}{i}" if n > 1 else key] = b"v" * size
    return apply


def _xattr_list(n: int, name: bytes = b"user.k", size: int = 1) -> Callable[[pb.Frame], None]:
    """n entries in xattr_list (the same name n times unless n > 1 numbers them)."""
    def apply(m: pb.Frame) -> None:
        m.header.attrs.has_xattrs = True
        for i in range(n):
            m.header.attrs.xattr_list.add(name=name + b"%d" % i if n > 1 else name,
                                          value=b"v" * size)
    return apply


VALID_FILE = Frame(1, file_header())
VALID_BLOCK = Frame(1, Block(0, Codec.RAW, 4, b"data"))
VALID_LZ4 = Frame(1, Block(0, Codec.LZ4, 65536, b"\x1f\x00\x01\x00"))
VALID_WHOLE = Frame(1, Whole(file_header(size=4), (Block(0, Codec.RAW, 4, b"data"),), End(DIGEST)))


def _blocks(n: int) -> Callable[[pb.Frame], None]:
    def apply(m: pb.Frame) -> None:
        for i in range(n):
            m.record.blocks.add(index=i, raw_len=1, data=b"x")
    return apply


@pytest.mark.parametrize("frame, mutate, message", [
    (VALID_FILE, _set(("lsn", 0)), "LSN 0"),
    (VALID_FILE, _set(("header.op", 99)), "unknown op 99"),
    (VALID_FILE, _set(("header.op", 0)), "unknown op 0"),
    (VALID_FILE, _set(("header.base", 7)), "base 7"),
    (VALID_BLOCK, _set(("block.codec", 3)), "unknown codec 3"),
    (VALID_BLOCK, _set(("block.raw_len", MAX_BLOCK_SIZE + 1)), f"{MAX_BLOCK_SIZE + 1} bytes"),
    (VALID_BLOCK, _set(("block.raw_len", 0)), "block of 0 bytes"),
    (VALID_BLOCK, _set(("block.raw_len", 5)), "raw block length 4 != 5"),
    (VALID_BLOCK, _set(("block.data", b"")), "raw block length 0 != 4"),
    (VALID_BLOCK, _set(("block.codec", pb.CODEC_ZERO)), "zero block carries data"),
    (VALID_LZ4, _set(("block.data", b"x" * (MAX_BLOCK_SIZE + 4097))), "payload"),
    (VALID_FILE, _set(("header.base", pb.BASE_PREVIOUS)), "patch without a valid base"),
    (VALID_FILE, _set(("header.base", pb.BASE_PREVIOUS), ("header.base_digest", b"x" * 15)),
     "patch without a valid base"),
    (VALID_FILE, _set(("header.block_size", 65535)), "block size 65535"),
    (VALID_FILE, _set(("header.block_size", 2048)), "block size 2048"),
    (VALID_FILE, _set(("header.block_size", 2 * MAX_BLOCK_SIZE)), "block size"),
    (VALID_FILE, _set(("header.size", MAX_FILE_SIZE + 1)), "file size"),
    (VALID_FILE, _clear("attrs"), "FILE without attributes"),
    (Frame(1, Header(Op.MKDIR, "d", attrs=ATTRS)), _clear("attrs"), "MKDIR without attr"),
    (Frame(1, Header(Op.SYMLINK, "l", target="t", attrs=ATTRS)), _clear("attrs"),
     "SYMLINK without attributes"),
    (Frame(1, Header(Op.SETATTR, "s", attrs=ATTRS)), _clear("attrs"), "SETATTR without"),
    (VALID_FILE, _xattrs(MAX_XATTRS + 1), "too many"),
    (VALID_FILE, _xattrs(1, key=""), "extended attribute"),
    (VALID_FILE, _xattrs(1, key="user.\0"), "extended attribute"),
    (VALID_FILE, _xattrs(1, size=MAX_XATTR_VALUE + 1), "extended attribute"),
    (VALID_FILE, _xattr_list(MAX_XATTRS + 1), f"{MAX_XATTRS + 1} extended attributes"),
    (VALID_FILE, lambda m: (_xattrs(MAX_XATTRS // 2 + 1)(m), _xattr_list(MAX_XATTRS // 2)(m)),
     f"{MAX_XATTRS + 1} extended attributes"),            # counted across both fields
    (VALID_FILE, _xattr_list(1, name=b""), "invalid"),
    (VALID_FILE, _xattr_list(1, name=b"user.\0x"), "invalid"),
    (VALID_FILE, _xattr_list(1, name=b"user." + b"\xff" * (MAX_XATTR_NAME - 4)),
     f"name of {MAX_XATTR_NAME + 1} bytes"),
    (VALID_FILE, _xattr_list(1, size=MAX_XATTR_VALUE + 1), f"value of {MAX_XATTR_VALUE + 1}"),
    (VALID_FILE, lambda m: (_xattrs(1)(m), _xattr_list(1)(m)), "sent twice"),
    (VALID_FILE, lambda m: (_xattr_list(1, name=b"user.\xff")(m),
                            _xattr_list(1, name=b"user.\xff")(m)), "sent twice"),
    (Frame(1, End(DIGEST)), _set(("end.digest", b"x" * 5)), "digest of 5 bytes"),
    (VALID_FILE, _set(("header.resume_from", 3)), "resume from block 3"),  # 2 blocks
    (VALID_FILE, _set(("header.resume_from", 1), ("header.base", pb.BASE_PREVIOUS),
                      ("header.base_digest", DIGEST)), "resume from block 1"),
    (Frame(1, Header(Op.MKDIR, "d", attrs=ATTRS)), _set(("header.resume_from", 1)),
     "MKDIR record cannot resume"),
    (Frame(1, End()), lambda m: m.ClearField("end"), "without a body"),
    (VALID_WHOLE, _set(("record.header.op", 99)), "unknown op 99"),          # header checks,
    (VALID_WHOLE, lambda m: m.record.blocks[0].ClearField("data"),
     "raw block length 0 != 4"),                                           # block checks,
    (VALID_WHOLE, _set(("record.end.digest", b"x")), "digest of 1 bytes"),  # end checks
    (VALID_WHOLE, _set(("record.header.resume_from", 1)), "cannot resume"),
    (VALID_WHOLE, _blocks(MAX_RECORD_BLOCKS), f"{MAX_RECORD_BLOCKS + 1} blocks"),
    (VALID_WHOLE, lambda m: m.record.header.ClearField("attrs"), "FILE without attributes"),
])
def test_frame_from_pb_refuses_malformed_frames(frame: Frame, mutate: Callable[[pb.Frame], None],
                                                message: str) -> None:
    m = frame_to_pb(0, frame)
    frame_from_pb(m)  # valid before the mutation: the mutation alone is refused
    mutate(m)
    with pytest.raises(ProtocolError, match=message):
        frame_from_pb(m)


@pytest.mark.parametrize("op", [Op.DELETE, Op.RENAME])
def test_ops_without_attributes_need_none(op: Op) -> None:
    frame = Frame(1, Header(op, "a", new_path="b" if op is Op.RENAME else ""))
    assert frame_from_pb(frame_to_pb(0, frame)) == frame


@pytest.mark.parametrize("payload", [b"\xff\xff\xff", b"\x0a\x05ab"])
def test_decode_frame_refuses_undecodable_bytes(payload: bytes) -> None:
    with pytest.raises(ProtocolError, match="undecodable"):
        decode_frame(payload)


def test_xattr_names_that_are_not_utf8_travel_as_bytes_in_xattr_list() -> None:
    # UTF-8 names stay in the map: a receiver that predates xattr_list keeps them
    m = frame_to_pb(0, Frame(1, file_header(attrs=FULL_ATTRS))).header.attrs
    assert m.has_xattrs
    assert dict(m.xattrs) == {"user.a": b"1", "user.empty": b""}
    assert [(x.name, x.value) for x in m.xattr_list] == [(b"user.\xff\xfe", b"odd")]


@pytest.mark.parametrize(("old_map", "new_list", "expected"), [
    ({}, [], {}),                                             # has_xattrs: clear them all
    ({"user.a": b"1"}, [], {b"user.a": b"1"}),                # an older agent's record
    ({"user.ü": b"1"}, [], {"user.ü".encode(): b"1"}),        # map names are UTF-8
    ({"user.a": b"1"}, [(b"user.\xff", b"2")], {b"user.a": b"1", b"user.\xff": b"2"}),
    ({}, [(b"user." + b"n" * (MAX_XATTR_NAME - 5), b"x" * MAX_XATTR_VALUE)],
     {b"user." + b"n" * (MAX_XATTR_NAME - 5): b"x" * MAX_XATTR_VALUE}),  # both at the limit
])
def test_xattrs_are_read_from_the_old_map_and_the_list(
        old_map: dict[str, bytes], new_list: list[tuple[bytes, bytes]],
        expected: dict[bytes, bytes]) -> None:
    m = frame_to_pb(0, VALID_FILE)
    m.header.attrs.has_xattrs = True
    for k, v in old_map.items():
        m.header.attrs.xattrs[k] = v
    for name, value in new_list:
        m.header.attrs.xattr_list.add(name=name, value=value)
    header = decode_frame(m.SerializeToString()).body
    assert isinstance(header, Header) and header.attrs is not None
    assert header.attrs.xattrs == expected


def test_xattrs_absent_means_leave_them_alone() -> None:
    header = frame_from_pb(frame_to_pb(0, VALID_FILE)).body
    assert isinstance(header, Header) and header.attrs is not None
    assert header.attrs.xattrs is None


@pytest.mark.parametrize(("name", "in_map"), [
    (b"user.a", True),
    ("user.ü".encode(), True),
    (b"user.\xff", False),             # not UTF-8 at all
    (b"user.\xc3", False),             # a truncated sequence
    (b"user.\xed\xa0\x80", False),     # an encoded surrogate, which UTF-8 forbids
])
def test_every_xattr_name_round_trips_exactly(name: bytes, in_map: bool) -> None:
    frame = Frame(1, file_header(attrs=Attrs(mode=0o100644, mtime_ns=0,
                                             xattrs={name: b"v"})))
    m = frame_to_pb(0, frame)
    assert (len(m.header.attrs.xattrs), len(m.header.attrs.xattr_list)) == (
        (1, 0) if in_map else (0, 1))
    assert decode_frame(m.SerializeToString()) == frame
