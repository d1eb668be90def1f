"""The ordering core against a simulated database (no I/O, exhaustive via hypothesis).

The simulation (``fakedb``) plays PostgreSQL's part statement by statement:
transactions take xids at their first write, append rows with seqs drawn
after their xid, observe each other's commits, take row locks, commit or roll
back in any interleaving with the ticker's own statements. A reader driven by
``read_step`` must deliver exactly the committed rows, once each, in one
canonical order, whatever the batch size, tick window or resume token, and
whether it reads at the end or follows along. A row appended after its
transaction observed another's commit comes after all of that one's rows;
rows appended under one row lock come in lock order.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from fakedb import (
    FakeDb,
    FakeRow,
    Follower,
    build,
    canonical,
    check_causal_order,
    check_mirror,
    drive,
    histories,
    history,
    read_all,
)
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from pgfeed.core.positions import (
    COMPLETE,
    NeedRows,
    NeedTicks,
    Position,
    Snapshot,
    Tick,
    first_visible_tick,
    plan_interval,
    plan_window,
    read_step,
)
from pgfeed.errors import TokenError

readers = {
    "limit": st.integers(1, 6),
    "window": st.integers(1, 7),
    "follow": st.tuples(st.integers(1, 6), st.integers(1, 7)),  # a reader that follows along
    "drained": st.booleans(),  # at the end, every writer done and the ticker ticked until nothing new
}


def check_every_reader(
    ops: list[tuple[Any, ...]], limit: int, window: int, follow: tuple[int, int], drained: bool
) -> None:
    follower = Follower(*follow)
    db = build(ops, follower)
    if drained:
        db.drain()
    expected = canonical(db)
    delivered = read_all(db, Position(1), limit, window)
    assert delivered == expected
    follower.catch_up(db)
    assert follower.delivered == expected, "a reader that followed along delivered another order"
    check_causal_order(db, delivered)
    if drained:
        check_mirror(db, delivered)
    # From every token: each tick boundary and each delivered row's position.
    for at in sorted({Position(t.id) for t in db.ticks} | {p for p, _ in delivered}):
        token = Position.parse(str(at))
        assert read_all(db, token, limit, window) == [(p, r) for p, r in expected if p > token]


@settings(max_examples=300, deadline=timedelta(seconds=2))
@given(ops=history, **readers)
def test_every_reader_delivers_the_committed_rows_once_in_one_causal_order(**case: Any) -> None:
    check_every_reader(**case)


@pytest.mark.slow
@settings(max_examples=300, deadline=timedelta(seconds=5))
@given(ops=histories(300, runs=10), **readers)
def test_every_reader_delivers_the_committed_rows_once_in_one_causal_order_deeper(**case: Any) -> None:
    check_every_reader(**case)


@pytest.mark.slow
@settings(max_examples=1000, deadline=None, derandomize=True, database=None, phases=[Phase.generate])
@given(ops=histories(100, clamped=True), **readers)
def test_every_reader_delivers_in_causal_order_with_streams_created_anywhere(**case: Any) -> None:
    check_every_reader(**case)


def test_a_transaction_with_an_older_xid_that_waited_for_another_comes_after_it() -> None:
    """Issue 7, scenario 1: T2 took its xid first, then waited for T1's row
    lock; both commit before the next tick. Replayed in order, T2's value wins."""
    db = FakeDb()
    db.tick()
    t2 = db.begin()
    db.take_xid(t2)  # xid 100: wrote something unrelated first
    t1 = db.begin()
    assert db.lock_key(t1, "row 1")  # xid 101 updates the row (captured)
    db.append(t1, "row 1")
    assert not db.lock_key(t2, "row 1")  # T2 waits for T1's row lock
    db.end(t1, commit=True)
    assert db.lock_key(t2, "row 1")  # now T2's update goes through
    db.append(t2, "row 1")
    db.end(t2, commit=True)
    db.tick()
    got = [(r.xid, p.tick) for p, r in read_all(db, Position(1), 10, 10)]
    assert got == [(t1.xid, 2), (t2.xid, 2)]
    assert t1.xid is not None
    assert t2.xid is not None
    assert t2.xid < t1.xid


def test_out_of_order_commit_is_not_skipped() -> None:
    db = FakeDb()
    db.tick()
    a = db.begin()
    db.append(a)  # seq 1, allocated first
    b = db.begin()
    db.append(b)  # seq 2
    db.end(b, commit=True)  # B commits first
    db.tick()  # tick 2 sees B only
    db.end(a, commit=True)
    db.tick()  # tick 3 sees A
    got = [(p.tick, r.seq) for p, r in read_all(db, Position(1), 10, 10)]
    assert got == [(2, 2), (3, 1)]


def test_rollback_leaves_no_hole_that_stalls() -> None:
    db = FakeDb()
    db.tick()
    a = db.begin()
    db.append(a)
    db.end(a, commit=False)
    b = db.begin()
    db.append(b)
    db.end(b, commit=True)
    db.tick()
    assert [r.seq for _, r in read_all(db, Position(1), 10, 10)] == [2]


def test_running_transaction_delays_only_itself() -> None:
    db = FakeDb()
    db.tick()
    long_tx = db.begin()
    db.append(long_tx)
    short = db.begin()
    db.append(short)
    db.end(short, commit=True)
    db.tick()
    assert [r.seq for _, r in read_all(db, Position(1), 10, 10)] == [2]
    db.end(long_tx, commit=True)
    db.tick()
    assert [r.seq for _, r in read_all(db, Position(2), 10, 10)] == [1]


def test_big_transaction_is_split_across_batches_in_order() -> None:
    db = FakeDb()
    db.tick()
    tx = db.begin()
    for _ in range(25):
        db.append(tx)
    db.end(tx, commit=True)
    db.tick()
    head = db.ticks[-1].id
    pos = Position(1)
    sizes = []
    seqs = []
    while pos < Position(head):
        rows, pos = drive(db, pos, head, 10, 5)
        sizes.append(len(rows))
        seqs.extend(r.seq for _, r in rows)
    assert sizes == [10, 10, 5]
    assert seqs == list(range(1, 26))


def test_snapshot_visibility_matches_postgres_rule() -> None:
    snap = Snapshot.parse("10:20:12,15")
    assert snap.visible(9)
    assert snap.visible(11)
    assert not snap.visible(12)
    assert not snap.visible(15)
    assert snap.visible(19)
    assert not snap.visible(20)
    assert str(snap) == "10:20:12,15"
    assert Snapshot.parse("5:5:") == Snapshot(5, 5, frozenset())
    with pytest.raises(ValueError, match="malformed"):
        Snapshot.parse("5:x")


@pytest.mark.parametrize(
    "token",
    ["", "x", "1.2.3.4", "-1", "1..2", "1.a", "99999999999999999999", " 1 2", "1~", "1~abc", "1~ABCDEF", "1~abcdefa",
     "1.2~abcdeg", "1~abcdef~abcdef", "~abcdef", "1.2.3~abcdef"],
)  # fmt: skip
def test_malformed_tokens_are_refused_with_the_accepted_forms(token: str) -> None:
    with pytest.raises(TokenError, match=r"expected TICK, TICK\.SEQ, TICK~CHECK or TICK\.SEQ~CHECK") as refused:
        Position.parse(token)
    assert "\n" not in str(refused.value)


def test_a_partial_token_of_the_previous_release_is_refused_saying_what_to_do() -> None:
    with pytest.raises(TokenError, match=r"pgfeed 0\.1.*resume from 41 to receive tick 42 again.*or from 42"):
        Position.parse("42.700.3")


def test_token_round_trip_and_order() -> None:
    assert str(Position.parse("42")) == "42"
    assert Position.parse("42") == Position(42, COMPLETE)
    assert str(Position.parse("42.3")) == "42.3"
    # The check is accepted, and ignored by Position (a reader verifies it).
    assert Position.parse(" 42.3~0a1b2c ") == Position(42, 3)
    assert Position(41) < Position(42, 1) < Position(42, 2) < Position(42) < Position(43, 0)


def test_first_visible_tick_requires_visibility_in_the_last() -> None:
    ticks = [Tick(1, Snapshot(5, 5, frozenset())), Tick(2, Snapshot(6, 6, frozenset()))]
    assert first_visible_tick(ticks, 5).id == 2
    with pytest.raises(ValueError, match="not visible"):
        first_visible_tick(ticks, 6)


def test_plan_window_cut_when_rows_exceed_the_limit() -> None:
    # Tick 2 sees xid 100; tick 3 sees 101..; more rows than the limit.
    window = [Tick(2, Snapshot(101, 101, frozenset()), 0, 1), Tick(3, Snapshot(103, 103, frozenset()), 1, 3)]
    rows = [FakeRow(100, 1), FakeRow(101, 2), FakeRow(102, 3)]
    planned = plan_window(window, rows, 2)
    assert planned.end == Position(2)
    assert [r.seq for _, r in planned.rows] == [1]
    assert plan_window(window[1:], rows[1:], 1).end is None
    assert plan_interval(3, rows[1:], 1).end == Position(3, 2)


def test_a_transaction_open_across_many_ticks_does_not_slow_catch_up_to_a_crawl() -> None:
    db = FakeDb()
    db.tick()
    big = db.begin()
    for _ in range(50):
        db.append(big)
    for _ in range(40):  # small transactions commit, each followed by a tick
        tx = db.begin()
        db.append(tx)
        db.end(tx, commit=True)
        db.tick()
    db.end(big, commit=True)
    db.tick()
    head = db.ticks[-1].id
    pos, steps, queries = Position(1), 0, 0
    delivered: list[tuple[Position, FakeRow]] = []
    while pos < Position(head):
        gen = read_step(pos, head, 10, 100)
        reply: Any = None
        try:
            while True:
                req = gen.send(reply)
                queries += isinstance(req, NeedRows)
                reply = db.fetch_ticks(req.first, req.last) if isinstance(req, NeedTicks) else db.fetch_rows(req)
        except StopIteration as done:
            delivered.extend(done.value.rows)
            pos = done.value.end
        steps += 1
    assert delivered == canonical(db)
    # 90 rows in batches of 10: about 9 steps, not one step per tick (41).
    assert steps <= 12
    assert queries <= 2 * steps
