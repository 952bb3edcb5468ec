"""Records shipped but not yet applied, and the oldest first-seen time behind each position.

Lag asks, once per heartbeat and per status request, for the oldest first-seen time of
the records past the written, the flushed and the applied LSN. Those are suffixes of the
sequence of unapplied records, which grows at the back (new records, in LSN order) and
shrinks at the front (as the applied LSN moves). A slow receiver can leave hundreds of
thousands of records here, so a scan per question is out: a monotonic queue keeps just
the records that are the oldest of their own suffix (first-seen times increase along it),
and the oldest of the suffix after any LSN is the first of them past that LSN, found by
bisection. Appending and dropping from the front are amortised O(1).
"""

from __future__ import annotations

import bisect
import collections

_COMPACT_AT = 4096  # dead entries at the head of the candidate lists before they are cut


class Unapplied:
    def __init__(self) -> None:
        self._records: collections.deque[tuple[int, float, int]] = collections.deque()
        self.bytes = 0          # raw bytes of all the records held
        # candidates: the records older than every record after them, in LSN order; the
        # first `_head` of them are dropped already
        self._lsns: list[int] = []
        self._seen: list[float] = []
        self._head = 0

    def _clear(self) -> None:
        self._records.clear()
        self.bytes = 0
        self._lsns, self._seen, self._head = [], [], 0

    def __len__(self) -> int:
        return len(self._records)

    def add(self, lsn: int, first_seen: float, raw_bytes: int) -> None:
        """A record shipped; LSNs must increase. A first_seen of 0 means "unknown"."""
        if self._records and lsn <= self._records[-1][0]:
            raise ValueError(f"record {lsn} after {self._records[-1][0]}")
        self._records.append((lsn, first_seen, raw_bytes))
        self.bytes += raw_bytes
        if not first_seen:
            return
        while len(self._lsns) > self._head and self._seen[-1] >= first_seen:
            self._lsns.pop()
            self._seen.pop()
        self._lsns.append(lsn)
        self._seen.append(first_seen)

    def drop_through(self, lsn: int) -> list[float]:
        """Forgets the records up to and including `lsn` (they are applied); returns
        their known first-seen times."""
        records = self._records
        seen = []
        while records and records[0][0] <= lsn:
            _, first_seen, raw_bytes = records.popleft()
            self.bytes -= raw_bytes
            if first_seen:
                seen.append(first_seen)
        self._head = bisect.bisect_right(self._lsns, lsn, lo=self._head)
        if self._head >= _COMPACT_AT and self._head * 2 >= len(self._lsns):
            del self._lsns[:self._head]
            del self._seen[:self._head]
            self._head = 0
        return seen

    def keep(self, after: int, through: int) -> None:
        """Keeps only the records after `after` and up to `through` (a reconnect: the
        receiver applied up to `after` and holds up to `through`)."""
        kept = [r for r in self._records if after < r[0] <= through]
        self._clear()
        for r in kept:
            self.add(*r)

    def oldest_after(self, lsn: int) -> float:
        """The oldest first-seen time of the records after `lsn`; 0.0 if there is none."""
        i = bisect.bisect_right(self._lsns, lsn, lo=self._head)
        return self._seen[i] if i < len(self._lsns) else 0.0
