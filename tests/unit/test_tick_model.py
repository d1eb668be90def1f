"""The tick's SQL logic, statement by statement, against the simulated database.

``_insert_tick_v2`` and ``interval_rows_v2`` rest on facts stated in
docs/design.md ("Ticks"): a tick sees exactly the transactions that had
ended when its snapshot was taken; every row with xid at or above its
``xmax`` has a seq above its ``seq_lo``; every row with seq at or below
``seq_lo`` that it does not see belongs to an xid it lists; no row above
``seq_hi`` is visible in it. They are checked here for every tick of random
interleavings, and the two-part read of an interval against its definition.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from fakedb import FakeDb, FakeRow, TickAttempt, build, histories, history, pg_visible_in_snapshot, read_all
from hypothesis import given, settings
from hypothesis import strategies as st

from pgfeed.core.positions import Position, Snapshot, Tick


def check_ticks(db: FakeDb) -> None:
    """The facts of docs/design.md, "Ticks", for every tick taken."""
    xids = range(100, db.next_xid)
    seen_before: set[int] = set()
    before: Tick | None = None
    for t in db.ticks:
        truth = db.truth[t.id]
        seen = {x for x in xids if pg_visible_in_snapshot(x, t.snapshot)}
        assert seen <= truth.ended_at_snapshot, f"tick {t.id} sees {sorted(seen - truth.ended_at_snapshot)}, running"
        if not truth.clamped:
            assert seen == truth.ended_at_snapshot, f"tick {t.id} misses {sorted(truth.ended_at_snapshot - seen)}"
        commits = [x for x in db.commit_order if x in seen]
        assert commits == db.commit_order[: len(commits)], (
            f"tick {t.id} sees the commits {commits} of {db.commit_order}: not the first ones, so a row can be "
            "delivered before the rows of a transaction that committed before it was appended"
        )
        assert seen_before <= seen, f"tick {t.id} no longer sees {sorted(seen_before - seen)}"
        assert t.seq_lo is not None
        assert t.seq_hi is not None
        if before is not None:
            assert before.seq_hi is not None
            assert t.seq_hi >= before.seq_hi
            assert t.snapshot.xmax >= before.snapshot.xmax
        for r in db.rows:
            visible = pg_visible_in_snapshot(r.xid, t.snapshot)
            if r.xid >= t.snapshot.xmax:
                assert r.seq > t.seq_lo, f"tick {t.id}: {r} is at or above xmax, at or below seq_lo {t.seq_lo}"
            if r.seq <= t.seq_lo and not visible:
                assert r.xid in t.snapshot.xip, f"tick {t.id}: {r}, not seen, not listed, below seq_lo {t.seq_lo}"
            if r.seq > t.seq_hi:
                assert not visible, f"tick {t.id}: {r} is visible, above seq_hi {t.seq_hi}"
        seen_before, before = seen, t


def interval(db: FakeDb, a: Tick, b: Tick) -> list[FakeRow]:
    """The definition: committed rows visible in ``b`` and not in ``a``, by seq."""
    return sorted(
        (
            r
            for r in db.committed
            if pg_visible_in_snapshot(r.xid, b.snapshot) and not pg_visible_in_snapshot(r.xid, a.snapshot)
        ),
        key=lambda r: r.seq,
    )


def check_facts(ops: list[tuple[Any, ...]], drained: bool, after: int, lim: int, db: FakeDb | None = None) -> None:
    db = build(ops, db=db)
    if drained:
        db.drain()
    check_ticks(db)
    seqs = [0] + [r.seq for r in db.committed]
    after_seq = seqs[after % len(seqs)]
    for i, a in enumerate(db.ticks):
        for b in db.ticks[i + 1 :]:
            want = interval(db, a, b)
            assert db.interval_rows(a, b, 0, len(db.rows) + 1) == want, f"interval ({a.id}, {b.id}]"
            assert db.interval_rows(a, b, after_seq, lim) == [r for r in want if r.seq > after_seq][:lim]


facts = {"drained": st.booleans(), "after": st.integers(0, 1000), "lim": st.integers(1, 8)}


@settings(max_examples=300, deadline=timedelta(seconds=2))
@given(ops=history, **facts)
def test_every_tick_keeps_the_facts_the_reads_rest_on(**case: Any) -> None:
    check_facts(**case)


@pytest.mark.slow
@settings(max_examples=400, deadline=timedelta(seconds=5))
@given(ops=histories(300, runs=10), **facts)
def test_every_tick_keeps_the_facts_the_reads_rest_on_deeper(**case: Any) -> None:
    check_facts(**case)


def run(db: FakeDb, attempt: TickAttempt, *steps: str) -> None:
    for name in steps:
        assert attempt.steps[attempt.done] == name
        assert db.step(attempt)


def test_a_tick_lists_the_xids_between_its_snapshot_and_its_own_xid() -> None:
    """The closed snapshot. X got its xid and appended before the ticker read
    seq_lo; the snapshot's xmax (one past the latest xid to end) is at X, so
    pg_current_snapshot() does not list X. The tick lists it, and the next
    interval finds X's row by its xid, its seq being at or below seq_lo."""
    db = FakeDb()
    db.tick()  # tick 1, by a ticker transaction: xid 100
    x = db.begin()
    db.append(x)  # xid 101, seq 1
    ticker = db.start_tick(force=True)
    run(db, ticker, "seq_lo", "xid", "lock", "newest", "snapshot")
    assert ticker.seq_lo == 1
    assert ticker.tx.xid == 102
    assert ticker.current == Snapshot(101, 101, frozenset())  # X at xmax: not listed
    run(db, ticker, "seq_hi", "close", "commit")
    assert db.ticks[-1].snapshot == Snapshot(101, 102, frozenset({101}))
    db.end(x, commit=True)
    db.tick()
    assert [(p.tick, r.seq) for p, r in read_all(db, Position(1), 10, 10)] == [(3, 1)]


def test_a_transaction_that_ends_while_the_tick_closes_stays_running_in_it() -> None:
    """Between the snapshot and the INSERT, X (between the snapshot's xmax and
    the ticker's xid) commits, having appended after Y committed; Y was
    running at the snapshot. Had the tick asked whether X had ended (the first
    version asked pg_xact_status), it would see X but not Y, and deliver X's
    row before Y's."""
    db = FakeDb()
    db.tick()  # xid 100
    y = db.begin()
    db.append(y)  # xid 101, seq 1
    x = db.begin()
    db.take_xid(x)  # xid 102
    ticker = db.start_tick(force=True)
    run(db, ticker, "seq_lo", "xid", "lock", "newest", "snapshot", "seq_hi")  # xid 103, xmax 101
    db.end(y, commit=True)
    db.append(x)  # seq 2, after Y committed
    db.end(x, commit=True)
    run(db, ticker, "close", "commit")
    assert db.ticks[-1].snapshot == Snapshot(101, 103, frozenset({101, 102}))
    db.tick()
    assert [r.xid for _, r in read_all(db, Position(1), 10, 10)] == [y.xid, x.xid]
