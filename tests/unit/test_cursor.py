"""The subscription cursor against the simulated database (no I/O).

A subscription reads ahead onto a bounded queue while its consumer takes
batches at its own pace; resets may strike at any moment. Whatever the
interleaving, the consumer must get exactly the canonical rows up to
``until`` (after a reset: all of them again, announced by a reset batch),
and the delivered position must never speak of a row the consumer has not
finished with.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import pytest
from fakedb import FakeDb, FakeRow, build, canonical, drive, histories
from hypothesis import given, settings
from hypothesis import strategies as st

from pgfeed.core.cursor import (
    OLDER_INCARNATION,
    PRUNED,
    RECREATED,
    Cursor,
    Interrupted,
    StreamMeta,
    newest_named,
    parse_spec,
    plan_prefetched,
    pruned_past,
)
from pgfeed.core.positions import NeedRows, Planned, Position
from pgfeed.core.tickcache import Prefetched
from pgfeed.errors import FutureToken, TokenError

META = StreamMeta(id=1, created_tick=1)


@dataclass
class Subscription:
    """What pgfeed.subscription does with a cursor, minus the waiting: a
    task that reads onto a queue of ``room`` batches, a consumer that takes
    them (acknowledging the one before), and resets."""

    db: FakeDb
    limit: int
    window: int
    room: int
    cursor: Cursor = field(init=False)
    queue: deque[tuple[int, list[tuple[Position, FakeRow]], Position, bool]] = field(default_factory=deque)
    held: list[tuple[Position, FakeRow]] | None = None
    acked: list[tuple[Position, FakeRow]] = field(default_factory=list)  # since the last reset batch
    moves: int = 0
    resets: int = 0
    resets_seen: int = 0

    def __post_init__(self) -> None:
        self.cursor = Cursor("s", self._moved)

    def _moved(self) -> None:
        self.moves += 1

    @property
    def head(self) -> int:
        return self.db.ticks[-1].id

    def read(self) -> None:
        """One step of the subscription's task (a no-op while its put would block)."""
        c = self.cursor
        if c.finished or not c.has_work(self.head) or len(self.queue) >= self.room:
            return
        assert c.fetch is not None
        if c.at_head(self.head):
            self._queue([], c.fetch)  # only a pending reset gets here
            return
        rows, end = drive(self.db, c.fetch, self.head, self.limit, self.window)
        cut, end = c.cut(Planned(rows, end))
        if c.read(end, bool(cut)):
            self._queue(cut, end)

    def _queue(self, rows: list[tuple[Position, FakeRow]], end: Position) -> None:
        epoch, reason = self.cursor.queue(end)
        self.queue.append((epoch, rows, end, reason is not None))

    def take(self) -> None:
        """The consumer asks for the next batch (acknowledging the one it holds)."""
        self.cursor.ack()
        if self.held is not None:
            self.acked.extend(self.held)
            self.held = None
        while self.queue:
            epoch, rows, end, reset = self.queue.popleft()
            if self.cursor.take(epoch, end):
                if reset:
                    self.resets_seen += 1
                    self.acked = []
                self.held = rows
                return

    def reset(self) -> None:
        """The database's history changed (the queue is drained, as Subscription._reset does)."""
        if self.cursor.history_changed("history changed"):
            self.resets += 1
            self.queue.clear()
            self.cursor.forget_queued()


def check_delivered(sub: Subscription, expected: list[tuple[Position, FakeRow]]) -> None:
    """The delivered position covers only rows the consumer has finished with."""
    delivered = sub.cursor.delivered
    if delivered is None:
        return
    done = {p for p, _ in sub.acked}
    for p, _ in expected:
        if p <= delivered:
            assert p in done, f"delivered {delivered} covers {p}, which the consumer has not finished with"
    if sub.held:
        assert sub.held[0][0] > delivered, "the batch in hand is not delivered yet"


action = st.sampled_from(["read", "read", "read", "take", "take", "reset"])


@settings(max_examples=300, deadline=None)
@given(
    ops=histories(80),
    actions=st.lists(action, max_size=60),
    limit=st.integers(1, 5),
    window=st.integers(1, 5),
    room=st.integers(1, 3),
    until_at=st.none() | st.integers(0, 1000),
)
def test_the_consumer_gets_the_canonical_rows_and_delivery_never_runs_ahead(
    ops: list[tuple[Any, ...]],
    actions: list[str],
    limit: int,
    window: int,
    room: int,
    until_at: int | None,
) -> None:
    db = build(ops)
    everything = canonical(db)
    until = None
    if until_at is not None:
        # A tick boundary or a row's own position, anywhere in the stream.
        points = [Position(t.id) for t in db.ticks] + [p for p, _ in everything]
        until = sorted(points)[until_at % len(points)]
    expected = [(p, r) for p, r in everything if until is None or p <= until]
    sub = Subscription(db, limit, window, room)
    sub.cursor.start("earliest", until, sub.head, META)
    last = sub.cursor.delivered
    for a in actions:
        getattr(sub, a)()
        now = sub.cursor.delivered
        if a != "reset" and last is not None and now is not None:
            assert now >= last, "the delivered position never goes back but by a reset"
        if now is not None and until is not None:
            assert now <= until
        check_delivered(sub, expected)
        last = now
    # Let it run to the end: the consumer takes everything.
    for _ in range(10 * len(db.committed) + 10 * len(db.ticks) + 10):
        sub.read()
        sub.take()
        check_delivered(sub, expected)
    assert not sub.queue
    assert sub.held is None
    assert sub.acked == expected
    assert sub.cursor.delivered == (until if until is not None else Position(sub.head))
    assert sub.cursor.pending_reset is None
    assert sub.resets_seen <= sub.resets
    assert (sub.resets_seen > 0) == (sub.resets > 0), "every reset is announced to the consumer"


def test_since_before_the_streams_incarnation_resets_to_its_first_tick() -> None:
    c = Cursor("s")
    c.start("3", None, 10, StreamMeta(id=2, created_tick=5))
    assert (c.fetch, c.delivered, c.pending_reset) == (Position(5), Position(5), OLDER_INCARNATION)


@pytest.mark.parametrize(
    ("since", "reset"),
    [("7", None), ("6", PRUNED), ("7.3", PRUNED), ("8.3", None), ("earliest", None)],
)
def test_since_behind_the_floor_resets(since: str, reset: str | None) -> None:
    c = Cursor("s")
    meta = StreamMeta(id=2, created_tick=1, floor_tick=7)
    c.start(since, None, 10, meta)
    assert c.pending_reset == reset
    assert c.fetch == (Position.parse(since) if reset is None and since != "earliest" else Position(7))


def test_since_and_until_accept_earliest_now_and_tokens_and_refuse_the_future() -> None:
    meta = StreamMeta(id=2, created_tick=3, floor_tick=4)
    assert parse_spec("earliest", 10, meta, "since") == Position(4)
    assert parse_spec("now", 10, meta, "since") == Position(10)
    assert parse_spec("9.5", 10, meta, "since") == Position(9, 5)
    assert parse_spec(Position(10), 10, meta, "until") == Position(10)
    with pytest.raises(FutureToken, match="newest tick 10"):
        parse_spec("11", 10, meta, "since")
    with pytest.raises(TokenError, match="malformed"):
        parse_spec("latest", 10, meta, "since")
    with pytest.raises(TokenError, match="invalid until 3"):
        parse_spec(3, 10, meta, "until")  # type: ignore[arg-type]


def test_newest_named_looks_only_at_positions() -> None:
    assert newest_named("now", None) is None
    assert newest_named(Position(4), "earliest", Position(9, 2)) == 9


def test_pruned_past_a_complete_position_is_below_the_floor_a_partial_one_at_it() -> None:
    meta = StreamMeta(id=1, created_tick=1, floor_tick=5)
    assert pruned_past(Position(4), meta)
    assert not pruned_past(Position(5), meta)
    assert pruned_past(Position(5, 1), meta)
    assert not pruned_past(Position(6, 1), meta)


def started(fetch: str = "4", head: int = 10) -> Cursor:
    c = Cursor("s")
    c.start(fetch, None, head, META)
    return c


def test_a_recreated_stream_resets_once_and_discards_what_was_read_before() -> None:
    c = started()
    assert c.read(Position(6), has_rows=True)
    old_epoch, reason = c.queue(Position(6))
    assert reason is None
    assert c.follow(META) is None
    assert c.follow(StreamMeta(id=2, created_tick=8)) == RECREATED
    assert c.delivered is None, "no delivered position until the consumer learns of the break"
    assert not c.take(old_epoch, Position(6)), "a batch read before the reset is dropped"
    assert c.fetch == Position(8)
    assert c.at_head(8)
    assert c.has_work(8), "the reset must be announced even with nothing to read"
    epoch, reason = c.queue(Position(8))
    assert reason == RECREATED
    assert c.queue(Position(9))[1] is None, "announced once"
    assert c.take(epoch, Position(8))
    c.ack()
    assert c.delivered == Position(8)


def test_a_prune_past_the_read_position_resets() -> None:
    c = started("4")
    assert c.follow(StreamMeta(id=1, created_tick=1, floor_tick=5)) == PRUNED
    assert c.fetch == Position(5)


def test_a_dropped_stream_is_noticed_once_and_its_return_is_a_reset() -> None:
    c = started()
    assert c.lose_stream()
    assert not c.lose_stream()
    assert c.follow(META) == RECREATED


def test_a_history_change_before_the_start_resets_nothing() -> None:
    c = Cursor("s")
    assert not c.history_changed("x")
    c = started()
    assert c.history_changed("x")
    assert c.pending_reset == "x"


def test_an_empty_read_moves_delivery_only_once_the_queue_is_taken() -> None:
    moved: list[Position | None] = []
    c = Cursor("s", lambda: moved.append(c.delivered))
    c.start("4", None, 10, META)
    assert c.read(Position(5), has_rows=True)
    epoch, _ = c.queue(Position(5))
    assert not c.read(Position(7), has_rows=False)
    assert c.delivered == Position(4), "an empty read must not pass the batch still queued"
    assert c.take(epoch, Position(5))
    assert c.delivered == Position(4), "taken is not done: the consumer still holds it"
    c.ack()
    assert c.delivered == Position(7)
    assert moved == [Position(5), Position(7)]
    assert not c.read(Position(8), has_rows=False)
    assert c.delivered == Position(8), "nothing queued: an empty read is delivered at once"


def test_until_cuts_a_read_inside_it() -> None:
    c = Cursor("s")
    c.start("earliest", "5.2", 10, META)
    rows = [(Position(5, 1), "a"), (Position(5, 2), "b"), (Position(5, 3), "c"), (Position(6, 4), "d")]
    assert c.cut(Planned(rows, Position(6))) == (rows[:2], Position(5, 2))
    assert c.cut(Planned(rows[:1], Position(5, 1))) == (rows[:1], Position(5, 1))
    c.read(Position(5, 2), has_rows=True)
    assert c.finished


def test_only_a_caught_up_complete_position_stands_at_the_head() -> None:
    c = started("4")
    assert c.stands_at(4)
    assert not c.stands_at(5)
    assert not c.stands_at(None)
    c.fetch = Position(4, 2)
    assert not c.stands_at(4)


@settings(max_examples=300, deadline=None)
@given(ops=histories(60), limit=st.integers(1, 6), at=st.integers(0, 1000), span=st.integers(1, 6))
def test_prefetched_rows_plan_what_a_read_would(ops: list[tuple[Any, ...]], limit: int, at: int, span: int) -> None:
    db = build(ops)
    if len(db.ticks) < 2:
        return
    i = at % (len(db.ticks) - 1)
    start, window = db.ticks[i], db.ticks[i + 1 : i + 1 + span]
    head = window[-1]
    pos = Position(start.id)
    # What read_live_v4 returns: the first limit + 1 rows from the known head
    # to the newest tick, however many ticks lie between.
    rows = db.fetch_rows(NeedRows(start, head, limit + 1))
    planned = plan_prefetched(pos, (window, Prefetched(rows, floor=0)), limit)
    if len(rows) <= limit:
        assert planned is not None, "everything fits: no second query"
    if planned is not None:
        assert planned.end is not None
        assert planned.end > pos
        assert (planned.rows, planned.end) == drive(db, pos, head.id, limit, len(window))


def test_prefetched_rows_behind_a_prune_interrupt_the_read() -> None:
    db = FakeDb()
    first, second = db.tick(), db.tick()
    assert plan_prefetched(Position(1), None, 5) is None
    with pytest.raises(Interrupted, match="pruned up to tick 2"):
        plan_prefetched(Position(first.id), ([second], Prefetched([], floor=2)), 5)
