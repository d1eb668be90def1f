"""A simulated database for the pure core, and the driver that reads it.

:class:`FakeDb` plays PostgreSQL's part: transactions take increasing xids,
append rows with increasing seqs, commit or roll back in any order; ticks
record closed snapshots and their seq bounds. :func:`drive` runs one
``read_step`` against it the way :mod:`pgfeed.ranges` runs it against a
server; :func:`canonical` is the specification every reader must meet;
:data:`op` and :func:`build` make histories for hypothesis.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st

from pgfeed.core.positions import NeedRows, NeedTicks, Position, Snapshot, Tick, read_step


@dataclass(frozen=True)
class FakeRow:
    xid: int
    seq: int
    #: Transactions that had committed when this row was appended: its causes.
    after: frozenset[int] = frozenset()


@dataclass
class FakeDb:
    next_xid: int = 100
    next_seq: int = 1
    running: dict[int, list[FakeRow]] = field(default_factory=dict)
    committed: list[FakeRow] = field(default_factory=list)
    ticks: list[Tick] = field(default_factory=list)
    ended: set[int] = field(default_factory=set)  # committed transactions

    def begin(self) -> int:
        xid = self.next_xid
        self.next_xid += 1
        self.running[xid] = []
        return xid

    def append(self, xid: int) -> None:
        self.running[xid].append(FakeRow(xid, self.next_seq, frozenset(self.ended)))
        self.next_seq += 1

    def end(self, xid: int, commit: bool) -> None:
        rows = self.running.pop(xid)
        if commit:
            self.committed.extend(rows)
            self.ended.add(xid)

    def snapshot(self) -> Snapshot:
        xip = frozenset(self.running)
        return Snapshot(min(xip) if xip else self.next_xid, self.next_xid, xip)

    def tick(self) -> Tick:
        # Atomic here, so seq_lo (read before the tick's xid) and seq_hi (read
        # after its snapshot) coincide; the snapshot lists every running xid.
        last_seq = self.next_seq - 1
        t = Tick(len(self.ticks) + 1, self.snapshot(), last_seq, last_seq)
        self.ticks.append(t)
        return t

    # The two queries the reader makes.
    def fetch_ticks(self, first: int, last: int) -> list[Tick]:
        return [t for t in self.ticks if first <= t.id <= last]

    def fetch_rows(self, req: NeedRows) -> list[FakeRow]:
        """What pgfeed.interval_rows_v2 does, by its two parts."""
        start, end = req.start, req.end
        assert start.seq_lo is not None
        assert end.seq_hi is not None
        by_range = [
            r
            for r in self.committed
            if start.seq_lo < r.seq <= end.seq_hi and end.snapshot.visible(r.xid) and not start.snapshot.visible(r.xid)
        ]
        running = {x for x in start.snapshot.xip if end.snapshot.visible(x)}
        by_xid = [r for r in self.committed if r.xid in running and r.seq <= start.seq_lo]
        rows = sorted({*by_range, *by_xid}, key=lambda r: r.seq)
        everything = sorted(
            (r for r in self.committed if end.snapshot.visible(r.xid) and not start.snapshot.visible(r.xid)),
            key=lambda r: r.seq,
        )
        assert rows == everything, "the two parts must cover the interval exactly"
        return [r for r in rows if r.seq > req.after_seq][: req.limit]


def drive(db: FakeDb, pos: Position, head: int, limit: int, window: int) -> tuple[list[tuple[Position, Any]], Position]:
    steps = read_step(pos, head, limit, window)
    reply: Any = None
    try:
        while True:
            req = steps.send(reply)
            reply = db.fetch_ticks(req.first, req.last) if isinstance(req, NeedTicks) else db.fetch_rows(req)
    except StopIteration as done:
        planned = done.value
    assert planned.end is not None
    return planned.rows, planned.end


def read_all(db: FakeDb, start: Position, limit: int, window: int) -> list[tuple[Position, FakeRow]]:
    """Read from ``start`` to the newest tick, checking progress and order."""
    head = db.ticks[-1].id
    pos = start
    out: list[tuple[Position, FakeRow]] = []
    while pos < Position(head):
        rows, end = drive(db, pos, head, limit, window)
        assert end > pos, "a step must make progress"
        assert len(rows) <= limit
        for p, _ in rows:
            assert pos < p <= end
        out.extend(rows)
        pos = end
    return out


def canonical(db: FakeDb, after_tick: int = 0) -> list[tuple[Position, FakeRow]]:
    """The specification: rows by (first tick that sees them, seq)."""
    head = db.ticks[-1]
    placed = []
    for r in db.committed:
        if not head.snapshot.visible(r.xid):
            continue
        tick = next(t for t in db.ticks if t.snapshot.visible(r.xid))
        if tick.id > after_tick:
            placed.append((Position(tick.id, r.seq), r))
    return sorted(placed, key=lambda pr: pr[0])


# A history: a list of operations applied to a FakeDb.
op = st.one_of(
    st.tuples(st.just("begin")),
    st.tuples(st.just("append"), st.integers(0, 50), st.integers(1, 4)),
    st.tuples(st.just("end"), st.integers(0, 50), st.booleans(), st.booleans()),
    st.tuples(st.just("tick")),
)


def build(ops: list[tuple[Any, ...]]) -> FakeDb:
    db = FakeDb()
    db.tick()  # the stream's creation tick
    for o in ops:
        live = sorted(db.running)
        if o[0] == "begin":
            db.begin()
        elif o[0] == "append" and live:
            for _ in range(o[2]):
                db.append(live[o[1] % len(live)])
        elif o[0] == "end" and live:
            # Mostly commit (about 15% rollbacks when both flags are true).
            db.end(live[o[1] % len(live)], commit=not (o[2] and o[3] and o[1] % 2 == 0))
        elif o[0] == "tick":
            db.tick()
    db.tick()
    return db
