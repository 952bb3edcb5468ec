"""A big new file whose transfer a broken stream cut short, kept for the next stream.

A big new file is staged by the session block by block as it arrives (see the session).
When its stream breaks before the record's END, the staged file is kept, still open, as
its dataset's `Partial`, together with the hashes of the blocks that arrived and the count
of blocks the agent need not send again (blocks arrive in ascending order, and a new
file's holes are never sent, so every block below the last one received is either in
the staged file or a hole). The next stream's Welcome announces it; an agent whose file
is unchanged sends a header with `resume_from` equal to that count, and the record goes
on as if the stream had never broken. It still ends with the whole-file digest check,
which covers the blocks of both streams: the agent hashes every block it did not resend.

The partial lives only in memory: a receiver restart forgets it, and recovery deletes
its staged file with the other incoming files that no flushed record names, so the agent
sends the file whole. Keeping the fd open means the final fdatasync of the record is on
the same open file that took every write, so a write-back error from either stream is
reported there. At most one partial per dataset, so memory stays bounded (16 bytes of
hash per block, as for the record being received).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from replicator.core.paths import encode_name
from replicator.core.records import Base, Header
from replicator.receiver.mirror import Mirror
from replicator.wire import pb

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Partial:
    lsn: int
    header: Header
    fd: int               # the staged file, still open
    staged: str           # its path
    hashes: bytearray     # every block's hash; blocks not received hash as holes
    blocks: int           # blocks 0..blocks-1 need not be sent again
    dirty: int            # bytes written since write-back was last started

    def position(self) -> pb.PartialRecord:
        """What the Welcome says of it."""
        h = self.header
        return pb.PartialRecord(lsn=self.lsn, path=encode_name(h.path), size=h.size,
                                mtime_ns=h.attrs.mtime_ns if h.attrs else 0,
                                block_size=h.block_size, blocks=self.blocks)

    def continued_by(self, h: Header, lsn: int) -> bool:
        """True if `h` (a header with resume_from) continues exactly this record."""
        mine = self.header
        return (lsn == self.lsn and h.path == mine.path and h.size == mine.size
                and h.block_size == mine.block_size and h.base is Base.EMPTY
                and h.resume_from == self.blocks and h.attrs is not None
                and mine.attrs is not None and h.attrs.mtime_ns == mine.attrs.mtime_ns)

    def discard(self, mirror: Mirror, label: str, reason: str) -> None:
        """Closes and deletes the staged file. Call once."""
        self.close()
        mirror.discard_staged(self.staged)
        log.info("partial record dropped dataset=%s lsn=%d path=%r reason=%s", label,
                 self.lsn, self.header.path, reason)

    def close(self) -> None:
        """Closes the staged file, leaving it to recovery's clean-up. Safe to call twice."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)
