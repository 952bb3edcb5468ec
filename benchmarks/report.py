"""Figures, targets and the side-by-side table the benchmark prints."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

MIB = 1024 * 1024


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def percentile(values: list[float], pct: float) -> float | None:
    """Nearest-rank percentile: a value that was actually observed (p99 of 100 samples is
    the 99th smallest)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class Target:
    """`ratio` targets bound replicator/rsync; `absolute` ones bound replicator's figure."""
    kind: str  # "ratio" or "absolute"
    limit: float
    text: str

    def met(self, replicator: float | None, rsync: float | None) -> bool | None:
        if replicator is None:
            return None
        if self.kind == "absolute":
            return replicator <= self.limit
        if rsync is None or rsync == 0:
            return None
        return replicator / rsync <= self.limit


@dataclass
class Row:
    label: str
    unit: str
    replicator: list[float] = field(default_factory=list)  # one figure per repetition
    rsync: list[float] = field(default_factory=list)
    target: Target | None = None

    @property
    def replicator_median(self) -> float | None:
        return median(self.replicator)

    @property
    def rsync_median(self) -> float | None:
        return median(self.rsync)

    @property
    def ratio(self) -> float | None:
        r, s = self.replicator_median, self.rsync_median
        return r / s if r is not None and s else None

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        return self.target.met(self.replicator_median, self.rsync_median)


def _fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.2f}" if value >= 1 else f"{value:.3f}"


HEADER = ("benchmark", "unit", "replicator", "rsync", "repl/rsync", "target", "met")


def render(rows: list[Row]) -> str:
    """A plain-text table; medians over repetitions."""
    cells = [HEADER]
    for row in rows:
        met = {None: "-" if row.target is None else "n/a", True: "yes", False: "NO"}[row.met]
        cells.append((row.label, row.unit, _fmt(row.replicator_median),
                      _fmt(row.rsync_median), _fmt(row.ratio),
                      row.target.text if row.target else "", met))
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER))]
    lines = []
    for n, c in enumerate(cells):
        lines.append("  ".join(v.ljust(w) if i in (0, 1, 5) else v.rjust(w)
                               for i, (v, w) in enumerate(zip(c, widths, strict=True)))
                     .rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def as_json(rows: list[Row]) -> list[dict[str, object]]:
    return [{"benchmark": r.label, "unit": r.unit, "replicator": r.replicator,
             "rsync": r.rsync, "replicator_median": r.replicator_median,
             "rsync_median": r.rsync_median, "ratio": r.ratio,
             "target": r.target.text if r.target else None, "met": r.met} for r in rows]
