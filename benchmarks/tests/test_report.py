from __future__ import annotations

import pytest

from benchmarks.report import Row, Target, median, percentile, render


@pytest.mark.parametrize("values,pct,expected", [
    ([], 99, None),
    ([5.0], 99, 5.0),
    ([float(i) for i in range(1, 101)], 99, 99.0),
    ([float(i) for i in range(1, 101)], 50, 50.0),
    ([float(i) for i in range(1, 101)], 100, 100.0),
    ([3.0, 1.0, 2.0], 99, 3.0),
])
def test_percentile_is_nearest_rank(values: list[float], pct: float,
                                    expected: float | None) -> None:
    assert percentile(values, pct) == expected


def test_median() -> None:
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([]) is None


@pytest.mark.parametrize("target,repl,rsync,met", [
    (Target("ratio", 0.5, ""), 1.0, 2.0, True),
    (Target("ratio", 0.5, ""), 1.1, 2.0, False),
    (Target("ratio", 0.5, ""), None, 2.0, None),
    (Target("ratio", 0.5, ""), 1.0, None, None),
    (Target("absolute", 25, ""), 24.9, None, True),
    (Target("absolute", 25, ""), 25.1, 1.0, False),
])
def test_target_met(target: Target, repl: float | None, rsync: float | None,
                    met: bool | None) -> None:
    assert target.met(repl, rsync) is met


def test_render_shows_medians_ratio_and_verdict() -> None:
    rows = [Row("fast one", "s", [1.0, 3.0, 2.0], [4.0, 4.0, 4.0],
                Target("ratio", 0.67, "<= 0.67")),
            Row("slow one", "s", [9.0], [3.0], Target("ratio", 1.0, "<= 1.00")),
            Row("rsync only", "MiB", [], [7.5])]
    lines = render(rows).splitlines()
    assert lines[0].split()[:3] == ["benchmark", "unit", "replicator"]
    fast, slow, only = lines[2], lines[3], lines[4]
    assert fast.split()[-6:] == ["2.00", "4.00", "0.500", "<=", "0.67", "yes"]
    assert slow.endswith("NO") and " 3.00 " in slow
    assert only.split()[-4:] == ["n/a", "7.50", "n/a", "-"]
