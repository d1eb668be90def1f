"""The reader's tick cache: bounded, never handing out a run with a hole,
and telling when the database's history changed."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from pgfeed.core.positions import Position, Snapshot, Tick
from pgfeed.core.tickcache import COVERING_RUN, Prefetched, TickCache


def tick(i: int, xmax: int | None = None) -> Tick:
    x = 100 + i if xmax is None else xmax
    return Tick(i, Snapshot(x, x, frozenset()), i, i)


def ticks(first: int, last: int) -> list[Tick]:
    return [tick(i) for i in range(first, last + 1)]


def test_eviction_keeps_the_newest_half_of_the_limit() -> None:
    cache: TickCache[object] = TickCache(limit=10)
    cache.add(ticks(1, 10))
    assert len(cache.ticks) == 10
    cache.add([tick(11)])
    assert sorted(cache.ticks) == list(range(7, 12))


@settings(max_examples=200, deadline=None)
@given(
    limit=st.integers(2, 12),
    cached=st.integers(0, 30),
    first=st.integers(1, 30),
    length=st.integers(0, 30),
)
def test_a_run_is_whole_or_none_and_complete_assembles_before_evicting(
    limit: int, cached: int, first: int, length: int
) -> None:
    cache: TickCache[object] = TickCache(limit=limit)
    cache.add(ticks(1, cached))
    last = first + length
    missing = cache.first_missing(first, last)
    run = cache.run(first, last)
    if missing is None:
        assert run == ticks(first, last)
        return
    assert run is None
    assert missing not in cache.ticks
    assert all(i in cache.ticks for i in range(first, missing))
    # What a range read gets back from the server, then caches.
    assert cache.complete(first, missing, ticks(missing, last), last) == ticks(first, last)
    assert len(cache.ticks) <= limit
    assert cache.complete(first, missing, ticks(missing, last - 1), last) is None, "a hole (pruned) is no run"


def test_run_to_walks_back_over_the_cached_run_at_most_covering_run_ticks() -> None:
    cache: TickCache[object] = TickCache()
    cache.add(ticks(1, 10) + ticks(12, 20))
    assert cache.run_to(tick(20)) == ticks(12, 20)
    assert cache.run_to(tick(30)) == [tick(30)], "the head itself, cached or not"
    cache.add(ticks(1, 1000))
    assert cache.run_to(tick(1000)) == ticks(1000 - COVERING_RUN + 1, 1000)


def test_a_tick_seen_with_another_snapshot_is_a_changed_history() -> None:
    cache: TickCache[object] = TickCache()
    cache.add(ticks(1, 5))
    assert cache.changed(ticks(3, 8)) is None
    assert cache.changed([tick(4), tick(5, xmax=999)]) == tick(5, xmax=999)
    cache.remember_prefetched(5, 6, {"s": Prefetched([], 0)})
    cache.clear()
    assert not cache.ticks
    assert not cache.prefetched


def test_a_tick_with_other_seq_bounds_or_another_known_fingerprint_is_a_changed_history() -> None:
    # A promoted standby on a quiet system can take a tick with the same id
    # and snapshot: its seq bounds or its fingerprint (time, term) differ.
    cache: TickCache[object] = TickCache()
    cache.add([replace(tick(1), fp=11), tick(2), replace(tick(3), fp=33)])
    assert cache.changed([replace(tick(1), seq_hi=7)]) is not None
    assert cache.changed([replace(tick(1), fp=12)]) == replace(tick(1), fp=12)
    assert cache.changed([replace(tick(1), fp=11), replace(tick(3), fp=33)]) is None
    # Unknown on either side (taken before migration 0007): the snapshot decides.
    assert cache.changed([tick(1), replace(tick(2), fp=22), tick(3)]) is None


def test_prefetched_rows_serve_a_complete_position_at_the_known_head_with_its_ticks_cached() -> None:
    cache: TickCache[str] = TickCache()
    found = Prefetched(["row"], floor=0)
    cache.remember_prefetched(known=None, head=6, found={"s": found})
    assert not cache.prefetched, "no known head: nothing was prefetched"
    cache.remember_prefetched(known=6, head=6, found={"s": found})
    assert not cache.prefetched, "no new tick"
    cache.remember_prefetched(known=3, head=6, found={"s": found})
    assert cache.prefetched_for("s", Position(3)) is None, "ticks 4..6 are not cached"
    cache.add(ticks(4, 6))
    assert cache.prefetched_for("s", Position(3)) == (ticks(4, 6), found)
    assert cache.prefetched_to("s", Position(3)) == 6
    assert cache.prefetched_for("t", Position(3)) is None
    assert cache.prefetched_for("s", Position(3, 2)) is None, "inside an interval"
    assert cache.prefetched_to("s", Position(3, 2)) is None
    assert cache.prefetched_for("s", Position(4)) is None, "another start"


def test_a_read_from_the_known_head_keeps_the_rows_that_lead_to_it() -> None:
    # A refresh can begin before a subscription planned the previous one's
    # rows: the subscription goes on with those, then with the new ones.
    cache: TickCache[str] = TickCache()
    cache.add(ticks(1, 9))
    first, second, other = Prefetched(["a"], floor=0), Prefetched(["b"], floor=0), Prefetched(["c"], floor=0)
    cache.remember_prefetched(known=3, head=6, found={"s": first, "t": other})
    cache.remember_prefetched(known=6, head=8, found={"s": second})
    assert cache.prefetched_for("s", Position(3)) == (ticks(4, 6), first)
    assert cache.prefetched_for("s", Position(6)) == (ticks(7, 8), second)
    assert cache.prefetched_for("t", Position(3)) == (ticks(4, 6), other)
    cache.remember_prefetched(known=8, head=9, found={})
    assert cache.prefetched_for("s", Position(3)) is None, "reads that end before the known head are dropped"
    assert cache.prefetched_to("s", Position(6)) == 8
