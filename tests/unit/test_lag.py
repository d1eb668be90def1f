"""TickClock: a subscription's lag in ticks and seconds, from when its reader learned of each head."""

from __future__ import annotations

from pgfeed.core.lag import TickClock
from pgfeed.core.positions import Position


def test_a_position_trails_by_ticks_and_by_the_time_since_the_first_tick_past_it() -> None:
    clock = TickClock()
    assert clock.lag(5, 0.0) is None  # nothing learned yet
    clock.learned(10, 100.0)
    clock.learned(12, 101.0)
    clock.learned(12, 150.0)  # the same head again: still learned at 101
    clock.learned(11, 150.0)  # an older one: ignored
    clock.learned(15, 103.0)
    assert clock.lag(15, 110.0) == (0, 0.0)
    assert clock.lag(20, 110.0) == (0, 0.0)
    assert clock.lag(12, 110.0) == (3, 7.0)  # tick 15 was learned at 103
    assert clock.lag(11, 110.0) == (4, 9.0)  # 12 at 101
    assert clock.lag(3, 110.0) == (12, 10.0)  # the oldest known


def test_what_no_position_needs_is_forgotten_but_the_newest_stays() -> None:
    clock = TickClock()
    for tick in range(1, 6):
        clock.learned(tick, float(tick))
    clock.forget_through(3)
    assert clock.lag(3, 10.0) == (2, 6.0)
    clock.forget_through(99)
    assert clock.lag(5, 10.0) == (0, 0.0)
    assert clock.lag(1, 10.0) == (4, 5.0)  # only the newest is left: known since it was learned


def test_past_its_limit_the_oldest_entry_and_the_newest_half_stay_exact() -> None:
    clock = TickClock(limit=8)
    for tick in range(1, 101):
        clock.learned(tick, float(tick))
    assert clock.lag(0, 200.0) == (100, 199.0)  # the oldest is never thinned
    assert clock.lag(99, 200.0) == (1, 100.0)  # the newest are exact
    ticks, seconds = clock.lag(50, 200.0)  # type: ignore[misc]
    assert ticks == 50
    assert 100.0 <= seconds <= 149.0  # told late at most, never early
    assert len(clock._entries) <= 9


def test_a_partial_position_covers_the_tick_before_it() -> None:
    assert Position(7).covered_tick == 7
    assert Position(7, 3).covered_tick == 6
