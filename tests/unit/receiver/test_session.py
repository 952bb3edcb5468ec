"""Session helpers that need no stream."""

from __future__ import annotations

import pytest

from replicator.receiver.session import batch_message_size
from replicator.wire import pb


def _batch(sizes: list[int]) -> pb.AgentMessage:
    m = pb.AgentMessage()
    m.batch.SetInParent()
    for i, n in enumerate(sizes):
        f = m.batch.frames.add()
        f.dataset = i % 3
        f.lsn = 1 + i * 1000
        if n < 0:
            f.header.path = b"d/" + b"x" * -n
            f.header.size = 1 << 40
        else:
            f.block.index = i
            f.block.raw_len = n
            f.block.data = bytes(n)
    return m


@pytest.mark.parametrize("sizes", [
    [],
    [0],
    [-5, 100, 0],
    [110, 111, 112, 113, 120, 127, 128, 129],           # frames around a varint step
    [16370, 16371, 16372, 16380, 16383, 16384, 16385],
    [65536] * 16,                                        # a 1 MiB batch
    [-300, (1 << 21) - 20, 3],                          # batch length past 2**21
])
def test_batch_message_size_is_what_the_agent_counts(sizes: list[int]) -> None:
    m = _batch(sizes)
    assert batch_message_size(m.batch) == m.ByteSize()
