"""The dataset's apply loop: a record that failed on our own storage is tried again."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

import pytest

from replicator.receiver import dataset as dataset_mod
from tests.unit.receiver.test_applier import data, new_file
from tests.unit.receiver.test_staged import Env


async def _until(cond: object, what: str, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():  # type: ignore[operator]
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
def test_a_storage_error_in_apply_is_retried_until_it_passes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, err: int) -> None:
    monkeypatch.setattr(dataset_mod, "STORAGE_RETRY_INITIAL", 0.01)
    env = Env(tmp_path)
    mirror = env.ds.mirror
    real = mirror.new_staged
    failing = [True]

    def new_staged() -> tuple[int, str]:
        if failing[0]:
            raise OSError(err, "injected")
        return real()

    monkeypatch.setattr(mirror, "new_staged", new_staged)
    env.send_records(new_file(1, "f", b"hello"), new_file(2, "g", data(5000)))

    async def run() -> None:
        env.ds.start()
        env.ds.flushed()  # what the session does after its group commit
        try:
            await _until(lambda: env.ds.error is not None, "the apply error")
            assert env.ds.applied_lsn == 0 and "injected" in env.ds.status().error
            await asyncio.sleep(0.1)          # retries meanwhile fail the same way
            assert env.ds.applied_lsn == 0
            failing[0] = False                # room again
            await _until(lambda: env.ds.applied_lsn == 2, "the records to apply")
            assert env.ds.error is None and not env.ds.status().error
        finally:
            await env.ds.stop()

    asyncio.run(run())
    assert (tmp_path / "mirror" / "f").read_bytes() == b"hello"
    assert (tmp_path / "mirror" / "g").read_bytes() == data(5000)


def test_stop_waits_for_a_group_under_way_before_closing_what_it_uses(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    env = Env(tmp_path)
    mirror = env.ds.mirror
    real = mirror.install
    inside, go_on = threading.Event(), threading.Event()

    def install(staged: str, path: str) -> bool:
        inside.set()
        go_on.wait(10)  # the group is under way in the apply thread
        return real(staged, path)  # with the mirror's cached fds: still open

    monkeypatch.setattr(mirror, "install", install)
    env.send_records(new_file(1, "d/f", b"hello"))

    async def run() -> None:
        env.ds.start()
        env.ds.flushed()
        await _until(inside.is_set, "the install to start")
        stopping = asyncio.create_task(env.ds.stop())
        await asyncio.sleep(0.2)
        assert not stopping.done()  # it waits for the group, the mirror stays open
        go_on.set()
        await stopping

    asyncio.run(run())
    assert (tmp_path / "mirror" / "d" / "f").read_bytes() == b"hello"
    assert env.ds.applier.error is None
