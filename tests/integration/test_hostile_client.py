"""A client that speaks the protocol but sends hostile paths gets an error, and nothing
lands outside the mirror."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from replicator.core.blocks import block_hash, file_digest
from replicator.core.records import Attrs, Base, Block, Codec, End, Frame, Header, Op
from replicator.wire import PROTOCOL_VERSION, pb, rpc
from replicator.wire.convert import frame_to_pb
from tests.integration.harness import Daemon, free_port, get_json, receiver_config, wait_for

ATTRS = Attrs(mode=0o100644, mtime_ns=1_600_000_000_000_000_000)
DIR_ATTRS = Attrs(mode=0o040755, mtime_ns=1_600_000_000_000_000_000)


def file_record(lsn: int, path: str, data: bytes) -> list[Frame]:
    digest = file_digest(len(data), block_hash(data))
    return [Frame(lsn, Header(Op.FILE, path, attrs=ATTRS, size=len(data), block_size=65536)),
            Frame(lsn, Block(0, Codec.RAW, len(data), data)), Frame(lsn, End(digest=digest))]


async def send(port: int, frames: list[Frame]) -> grpc.StatusCode | None:
    """Sends a hello and the frames; returns the status the receiver ended with (None: ok)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = rpc.ReplicatorStub(channel).Stream()
        hello = pb.Hello(protocol_version=PROTOCOL_VERSION, source_id="evil")
        hello.datasets.append(pb.DatasetHello(name="docs", type="directory", block_size=65536))
        await call.write(pb.AgentMessage(hello=hello))
        welcome = await call.read()
        assert welcome.WhichOneof("kind") == "welcome"
        msg = pb.AgentMessage()
        for f in frames:
            msg.batch.frames.append(frame_to_pb(0, f))
        await call.write(msg)
        await call.done_writing()
        try:
            while (await call.read()) is not grpc.aio.EOF:
                pass
        except grpc.aio.AioRpcError as e:
            return e.code()
        return None


@pytest.fixture
def receiver(tmp_path: Path):  # type: ignore[no-untyped-def]
    port, http = free_port(), free_port()
    conf = receiver_config(tmp_path / "r.toml", listen_port=port, state=tmp_path / "state",
                           mirror_root=tmp_path / "mirror", http_port=http)
    d = Daemon(["receiver", "--config", str(conf)], tmp_path / "r.log").start()
    wait_for(lambda: get_json(f"http://127.0.0.1:{http}/status"), 30)
    yield port, http
    assert d.stop() == 0


@pytest.mark.parametrize("path", ["../escape", "/tmp/escape-abs", "a/../../escape", "",
                                  "a//b", "x\0y", "./x"])
async def test_hostile_paths_are_refused(tmp_path: Path, receiver: tuple[int, int],
                                         path: str) -> None:
    port, _ = receiver
    code = await send(port, file_record(1, path, b"pwned"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert not (tmp_path / "escape").exists()
    assert not Path("/tmp/escape-abs").exists()
    assert not any((tmp_path / "mirror").rglob("*escape*"))


async def test_symlink_then_write_through_it_stays_inside(tmp_path: Path,
                                                          receiver: tuple[int, int]) -> None:
    port, http = receiver
    outside = tmp_path / "outside"
    outside.mkdir()
    frames = [Frame(1, Header(Op.SYMLINK, "evil", target=str(outside), attrs=ATTRS)),
              Frame(1, End()), *file_record(2, "evil/planted", b"pwned")]
    await send(port, frames)

    def error_reported() -> bool:
        rows = get_json(f"http://127.0.0.1:{http}/status")["datasets"]
        return bool(rows and rows[0]["applied_lsn"] == 1 and rows[0].get("error"))

    await asyncio.to_thread(wait_for, error_reported, 30)
    assert list(outside.iterdir()) == []
    link = tmp_path / "mirror" / "evil" / "docs" / "evil"
    assert link.is_symlink()


async def test_patch_on_a_wrong_base_asks_for_the_whole_file(tmp_path: Path,
                                                              receiver: tuple[int, int]) -> None:
    port, _ = receiver
    name = "caf\udcff"  # not UTF-8: travels as the raw byte b"\xff"
    data = b"version one"
    frames = file_record(1, name, data)
    frames.append(Frame(2, Header(Op.FILE, name, attrs=ATTRS, size=len(data), block_size=65536,
                                  base=Base.PREVIOUS, base_digest=b"\x01" * 16)))
    frames.append(Frame(2, End(digest=file_digest(len(data), block_hash(data)))))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = rpc.ReplicatorStub(channel).Stream()
        hello = pb.Hello(protocol_version=PROTOCOL_VERSION, source_id="app1")
        hello.datasets.append(pb.DatasetHello(name="docs", type="directory", block_size=65536))
        await call.write(pb.AgentMessage(hello=hello))
        assert (await call.read()).WhichOneof("kind") == "welcome"
        msg = pb.AgentMessage()
        msg.batch.frames.extend(frame_to_pb(0, f) for f in frames)
        await call.write(msg)
        resync: list[bytes] = []
        applied = 0
        while applied < 2:
            reply = await asyncio.wait_for(call.read(), 30)
            for ack in reply.ack.datasets:
                resync.extend(ack.resync_paths)
                applied = ack.applied_lsn
        await call.done_writing()
    assert resync == [b"caf\xff"]
    assert (tmp_path / "mirror" / "app1" / "docs" / "caf\udcff").read_bytes() == data
