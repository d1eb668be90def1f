"""The tick's SQL logic, statement by statement, against the simulated database.

``_insert_tick_v2`` and ``interval_rows_v2`` rest on facts stated in
docs/design.md ("Ticks"): a tick sees exactly the transactions that had
ended when its snapshot was taken; every row with xid at or above its
``xmax`` has a seq above its ``seq_lo``; every row with seq at or below
``seq_lo`` that it does not see belongs to an xid it lists; no row above
``seq_hi`` is visible in it. They are checked here for every tick of random
interleavings, and the two-part read of an interval against its definition.

Then the model is shown to catch flawed variants of the tick and of the read
(plausible edits; one is the first version, which broke on a real server),
so that it can be trusted to catch the next one. Last, what it found in
create_stream_v2's tick, fixed in migration 0007 (it copies the previous tick).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from fakedb import (
    FakeDb,
    FakeRow,
    TickAttempt,
    build,
    canonical,
    check_causal_order,
    check_mirror,
    histories,
    history,
    pg_visible_in_snapshot,
    read_all,
)
from hypothesis import HealthCheck, Phase, find, given, settings
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


# -- Flawed variants the model must catch -------------------------------------


class OpenSnapshot(FakeDb):
    """Stores pg_current_snapshot() as it is: running xids at or above its
    xmax are not listed."""

    def close(self, a: TickAttempt) -> tuple[Snapshot, int]:
        assert a.current is not None
        assert a.seq_lo is not None
        return a.current, a.seq_lo


class AskWhetherEndedWhileClosing(FakeDb):
    """The first version: an xid between the snapshot's xmax and the tick's
    own counts as running only if it has not ended by the time the tick
    closes (pg_xact_status)."""

    def close(self, a: TickAttempt) -> tuple[Snapshot, int]:
        snap, lo = super().close(a)
        assert a.current is not None
        running = frozenset(x for x in snap.xip if x < a.current.xmax or x not in self.ended)
        return Snapshot(min(running, default=snap.xmax), snap.xmax, running), lo


class OwnXidNotListed(FakeDb):
    """Forgets that pg_current_snapshot() leaves out the taker's own xid."""

    def close(self, a: TickAttempt) -> tuple[Snapshot, int]:
        snap, lo = super().close(a)
        running = snap.xip - {a.tx.xid}
        return Snapshot(min(running, default=snap.xmax), snap.xmax, running), lo


class SeqLoAfterTheXid(FakeDb):
    """Reads seq_lo after the lease row lock gave the tick its xid."""

    tick_steps = ("changed", "xid", "seq_lo", "lock", "newest", "snapshot", "seq_hi", "close", "commit")


class SeqHiBeforeTheSnapshot(FakeDb):
    """Reads seq_hi before the snapshot."""

    tick_steps = ("changed", "seq_lo", "xid", "lock", "newest", "seq_hi", "snapshot", "close", "commit")


class SnapshotBeforeTheLock(FakeDb):
    """Takes the snapshot before waiting for the tick lock."""

    tick_steps = ("changed", "seq_lo", "xid", "snapshot", "lock", "newest", "seq_hi", "close", "commit")


class IntervalFromSeqHi(FakeDb):
    """Starts the seq range of interval (a, b] at a's seq_hi, not its seq_lo."""

    def interval_rows(self, a: Tick, b: Tick, after_seq: int, lim: int) -> list[FakeRow]:
        return super().interval_rows(Tick(a.id, a.snapshot, a.seq_hi, a.seq_hi), b, after_seq, lim)


class IntervalXidScanBelowSeqLo(FakeDb):
    """Reads the older rows of a's running xids with seq < seq_lo, not <=."""

    def interval_rows(self, a: Tick, b: Tick, after_seq: int, lim: int) -> list[FakeRow]:
        rows = super().interval_rows(a, b, after_seq, len(self.rows) + 1)
        return [r for r in rows if r.seq != a.seq_lo or r.xid not in a.snapshot.xip][:lim]


FLAWED = [
    OpenSnapshot,
    AskWhetherEndedWhileClosing,
    OwnXidNotListed,
    SeqLoAfterTheXid,
    SeqHiBeforeTheSnapshot,
    SnapshotBeforeTheLock,
    IntervalFromSeqHi,
    IntervalXidScanBelowSeqLo,
]
#: Search, no shrinking: the point is that a failing history exists and is found.
SEARCH = settings(max_examples=3000, derandomize=True, database=None, phases=[Phase.generate])


def fails(check: Callable[[], None]) -> bool:
    try:
        check()
    except (AssertionError, ValueError):
        return True
    return False


@pytest.mark.parametrize("flawed", FLAWED, ids=lambda c: c.__name__)
def test_the_facts_reject_a_flawed_tick_or_read(flawed: type[FakeDb]) -> None:
    find(
        st.fixed_dictionaries({"ops": history, **facts}),
        lambda case: fails(lambda: check_facts(**case, db=flawed())),
        settings=settings(SEARCH, max_examples=1000),
    )


def delivers_wrongly(flawed: type[FakeDb], ops: list[tuple[Any, ...]]) -> bool:
    """Whether, once every writer is done, a reader misses or repeats a
    committed row or breaks the order of test_positions."""

    def check() -> None:
        db = build(ops, db=flawed())
        db.drain()
        for limit, window in ((2, 1), (1, 3)):  # window 1: every interval is read from its own start
            delivered = read_all(db, Position(1), limit, window)
            assert delivered == canonical(db)
            check_causal_order(db, delivered)
            check_mirror(db, delivered)

    return fails(check)


@pytest.mark.slow
@pytest.mark.parametrize("flawed", FLAWED, ids=lambda c: c.__name__)
def test_a_reader_of_a_flawed_tick_or_read_delivers_wrongly(flawed: type[FakeDb]) -> None:
    find(
        history,
        lambda ops: delivers_wrongly(flawed, ops),
        settings=settings(SEARCH, suppress_health_check=[HealthCheck.too_slow]),
    )


# -- What the model found in create_stream_v2's tick ---------------------------


def test_a_tick_taken_by_create_stream_in_a_writing_transaction_keeps_causal_order() -> None:
    """create_stream_v2 in a transaction that already has an xid (a migration
    that created a table first) takes a tick with no seq_lo: _insert_tick_v2
    keeps it to the previous tick's xmax. That tick sees T2, whose xid is
    below that xmax, and not T1, whose xid is above: T2's update of the row,
    made after T1 committed its own update of it, is delivered first. The
    replayed mirror keeps T1's value; the table has T2's. Reproduced on
    PostgreSQL 15."""
    db = FakeDb()
    db.tick()  # tick 1 (its ticker: xid 100)
    t2 = db.begin()
    db.take_xid(t2)  # xid 101: wrote something unrelated first
    db.tick()  # tick 2 (xid 102) lists 101; its xmax is 102
    t1 = db.begin()
    assert db.lock_key(t1, "row 1")  # xid 103
    db.append(t1, "row 1")
    db.end(t1, commit=True)
    assert db.lock_key(t2, "row 1")  # T2's update, after T1's commit
    db.append(t2, "row 1")
    db.end(t2, commit=True)
    s = db.begin()
    db.take_xid(s)  # xid 104: CREATE TABLE ...
    create_stream = db.start_embedded_tick(s)  # ... then SELECT pgfeed.create_stream_v2(...)
    while not create_stream.finished:
        assert db.step(create_stream)
    db.end(s, commit=True)  # tick 3 copies tick 2 (0004 clamped only its xmax: it saw 101, not 103)
    db.tick()  # tick 4 sees 101 and 103
    delivered = read_all(db, Position(1), 10, 10)
    assert [r.xid for _, r in delivered] == [t1.xid, t2.xid]  # 0004 gave [t2, t1]: 3.2 then 4.1


def test_two_streams_created_in_one_transaction() -> None:
    """The second create_stream_v2 in a transaction reads the first one's tick
    (its own, not committed yet) as the newest; that tick's xmax was raised to
    the transaction's xid, while the snapshot's xmax is still below it when an
    older transaction runs: _insert_tick_v2 refuses with PF002 ("transaction
    ids behind the newest tick", with a hint about restored databases).
    Reproduced on PostgreSQL 15."""
    db = FakeDb()
    db.tick()  # xid 100
    older = db.begin()
    db.take_xid(older)  # xid 101, running
    m = db.begin()
    for _ in range(2):
        create_stream = db.start_embedded_tick(m)  # xid 102; the second time, seq_lo NULL
        while not create_stream.finished:
            assert db.step(create_stream)
    db.end(m, commit=True)
