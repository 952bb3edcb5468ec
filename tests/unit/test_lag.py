"""The lag model: ages on the agent's clock, carried forward on the receiver's."""

from __future__ import annotations

import pytest

from replicator.lag import AgentLag, ClockOffset


@pytest.mark.parametrize(("beats", "offset"), [
    ([(1000.0, 10.0)], 990.0),
    # a backlog read late (a stalled receiver) looks earlier: the least-delayed one wins
    ([(1000.0, 10.0), (1001.0, 14.0), (1002.0, 14.001)], 990.0),
    ([(1000.0, 10.5), (1001.0, 11.0)], 990.0),
])
def test_clock_offset_keeps_the_least_delayed(beats: list[tuple[float, float]],
                                              offset: float) -> None:
    clock = ClockOffset()
    for agent_time, mono in beats:
        got = clock.update(agent_time, mono)
    assert got == pytest.approx(offset)


def test_clock_offset_forgets_old_heartbeats() -> None:
    clock = ClockOffset(window=3)
    clock.update(1000.0, 10.0)             # then the agent's clock steps back a minute
    for i in range(3):
        got = clock.update(941.0 + i, 11.0 + i)
    assert got == pytest.approx(930.0)


@pytest.mark.parametrize(("lag", "oldest_at", "now_mono", "age"), [
    (AgentLag(agent_time=1000.0, received_mono=10.0), 0.0, 20.0, 0.0),       # nothing pending
    (AgentLag(agent_time=1000.0, received_mono=10.0), 998.0, 13.0, 5.0),     # 2 s + 3 s since
    (AgentLag(agent_time=1000.0, received_mono=14.0, clock_offset=990.0), 998.0, 14.0, 6.0),
    (AgentLag(agent_time=1000.0, received_mono=10.0), 1005.0, 10.0, 0.0),    # never negative
])
def test_age(lag: AgentLag, oldest_at: float, now_mono: float, age: float) -> None:
    assert lag.age(oldest_at, now_mono) == pytest.approx(age)
