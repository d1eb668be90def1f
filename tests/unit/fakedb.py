"""A simulated PostgreSQL for the pure core, and the driver that reads it.

:class:`FakeDb` plays the server's part one statement at a time, so that a
test (or hypothesis) can interleave whatever concurrent sessions do:

* **Transactions** (:class:`Tx`) get their xid at their first write (an
  append, a row lock) or earlier when they ask for it (``SELECT
  pg_current_xact_id()``); xids are handed out in increasing order. Each
  appended row draws its seq from one global sequence *after* its
  transaction's xid exists (the column default of ``seq`` asks for the xid
  first). A transaction may observe another's commit before appending: read
  its rows, or take a row lock (``key``) that one held. It commits or rolls
  back; either way it *ends*: it leaves the running set, the moment at which
  snapshots, lock waiters and readers all see it. (clog says "committed" a
  little earlier; nothing modelled here asks clog.)
* **Snapshots** follow ``GetSnapshotData``: ``xmax`` is one past the latest
  xid to end (``latestCompletedXid + 1``), ``xip`` lists the running xids
  below it except the taker's own, ``xmin`` is the least of those and the
  taker's own xid.
* **Ticks** are taken statement by statement, as ``tick_v2`` and
  ``_insert_tick_v2`` do (:data:`TICK_STEPS`), by any number of tickers at
  once, or inside a user's transaction as ``create_stream_v2`` does
  (:data:`EMBEDDED_TICK_STEPS`). Other sessions act between the statements.
* **Readers** read an interval as ``interval_rows_v2`` does, clause by
  clause: the two ordered scans, their limits, ``UNION ALL``. Nothing is
  taken from the planner under test: visibility has its own copy here.

:func:`drive` runs one ``read_step`` against it the way :mod:`pgfeed.ranges`
runs it against a server; :func:`canonical`, :func:`check_causal_order` and
:func:`check_mirror` say what every reader must deliver; :func:`histories`
and :func:`build` make histories for hypothesis (a few sessions and tickers,
each acting one statement at a time). Not modelled: ticks of the previous
release (no seq bounds), several streams, retention, the ticker's lease.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st

from pgfeed.core.positions import COMPLETE, NeedRows, NeedTicks, Position, Snapshot, Tick, read_step


def pg_visible_in_snapshot(xid: int, snap: Snapshot) -> bool:
    """PostgreSQL's ``pg_visible_in_snapshot``: had ``xid`` ended when ``snap``
    was taken? (The model's own copy, so that the planner's is not assumed.)"""
    return xid < snap.xmin or (xid < snap.xmax and xid not in snap.xip)


@dataclass(frozen=True)
class FakeRow:
    xid: int
    seq: int
    #: Transactions that had committed when this row's seq was drawn (real time).
    after: frozenset[int] = frozenset()
    #: Transactions whose commit this row's transaction had observed before
    #: appending it (read their rows, waited for their row lock): its causes.
    observed: frozenset[int] = frozenset()
    #: The row lock it was appended under (a captured row's key), if any.
    key: str | None = None


@dataclass(eq=False)
class Tx:
    """One session's transaction."""

    xid: int | None = None
    state: str = "open"  # open, committed, rolled back
    rows: list[FakeRow] = field(default_factory=list)
    observed: set[int] = field(default_factory=set)
    keys: set[str] = field(default_factory=set)  # row locks held
    #: create_stream_v2's ticks, inserted by this transaction: seen when it commits.
    ticks: list[Tick] = field(default_factory=list)
    busy: bool = False  # in the middle of a statement (create_stream_v2)


#: The statements of one ``tick_v2`` call (0004_ticker.sql; _insert_tick_v2
#: as 0007_continuity.sql has it). Other sessions may act between any two.
TICK_STEPS = (
    "changed",  # tick_v2: nothing new since the newest tick? Then no tick (no xid, no write).
    "seq_lo",  # tick_v2: seq_lo := _seq_now_v2(), before anything gives it an xid.
    "xid",  # tick_v2: SELECT ... FROM pgfeed.ticker FOR SHARE: a row lock, so an xid.
    "lock",  # _insert_tick_v2: pg_advisory_xact_lock (waits while another tick holds it).
    "newest",  # the newest tick: id, snapshot, seq_lo.
    "snapshot",  # pg_current_snapshot(), a statement run after the lock was granted.
    "seq_hi",  # hi := _seq_now_v2().
    "close",  # the closed snapshot; INSERT INTO pgfeed.ticks.
    "commit",  # the tick becomes visible, the lock is released.
)
#: create_stream_v2's tick, inside a user's transaction that goes on
#: afterwards (and holds the tick lock until it ends): seq_lo only when that
#: transaction has no xid yet; the tick is seen once it commits.
EMBEDDED_TICK_STEPS = ("seq_lo", "xid", "lock", "newest", "snapshot", "seq_hi", "close")


@dataclass(eq=False)
class TickAttempt:
    """A tick in progress, between two of its statements."""

    tx: Tx
    steps: tuple[str, ...]
    embedded: bool = False
    done: int = 0  # steps taken
    nothing_new: bool = False  # tick_v2 found no change: no tick, no xid
    seq_lo: int | None = None
    last: Tick | None = None
    current: Snapshot | None = None
    seq_hi: int | None = None
    ended_at_snapshot: frozenset[int] = frozenset()

    @property
    def finished(self) -> bool:
        return self.done == len(self.steps)


@dataclass(frozen=True)
class TickTruth:
    """What the model knows about a tick that its row does not say."""

    #: Every xid that had ended (committed or rolled back) when its snapshot was taken.
    ended_at_snapshot: frozenset[int]
    #: Taken with no usable seq_lo (create_stream_v2 in a transaction that had
    #: an xid): kept to the previous tick's xmax and seq_lo.
    clamped: bool


@dataclass
class FakeDb:
    """The server: its transactions, the event sequence, the tick lock and
    row locks, the committed ticks. Methods are statements; each one runs
    alone (atomically), and any other session's may come between two."""

    next_xid: int = 100
    last_seq: int = 0  # pgfeed.event_seq's last value (0: never called)
    latest_completed: int = 99  # latestCompletedXid: the newest xid to have ended
    sessions: list[Tx] = field(default_factory=list)  # users' open transactions
    attempts: list[TickAttempt] = field(default_factory=list)  # ticks in progress
    rows: list[FakeRow] = field(default_factory=list)  # every row ever appended, in seq order
    committed: list[FakeRow] = field(default_factory=list)  # rows of committed transactions
    commit_order: list[int] = field(default_factory=list)  # xids, as they committed
    ended: set[int] = field(default_factory=set)  # xids that ended either way
    ticks: list[Tick] = field(default_factory=list)  # committed ticks
    truth: dict[int, TickTruth] = field(default_factory=dict)  # by tick id
    tick_lock: Tx | None = None  # holder of the tick advisory lock
    key_holder: dict[str, Tx] = field(default_factory=dict)  # row locks held
    key_writer: dict[str, int] = field(default_factory=dict)  # last committed writer per key

    tick_steps = TICK_STEPS
    embedded_tick_steps = EMBEDDED_TICK_STEPS

    # -- Transactions ------------------------------------------------------

    def begin(self) -> Tx:
        tx = Tx()
        self.sessions.append(tx)
        return tx

    def take_xid(self, tx: Tx) -> int:
        """``pg_current_xact_id()``: the transaction's xid, assigned on first use."""
        if tx.xid is None:
            tx.xid = self.next_xid
            self.next_xid += 1
        return tx.xid

    def observe(self, tx: Tx, xid: int) -> None:
        """``tx`` reads rows that transaction ``xid`` committed (or hits its
        unique key): a dependency. Only an ended transaction can be seen so."""
        assert xid in self.commit_order
        tx.observed.add(xid)

    def lock_key(self, tx: Tx, key: str) -> bool:
        """Take a row lock (an UPDATE of a captured row). False while another
        open transaction holds it (``tx`` would wait). Whoever last committed
        a row under that lock is observed: the update reads its version."""
        holder = self.key_holder.get(key)
        if holder is not None and holder is not tx:
            return False
        self.take_xid(tx)
        self.key_holder[key] = tx
        tx.keys.add(key)
        if key in self.key_writer:
            tx.observed.add(self.key_writer[key])
        return True

    def append(self, tx: Tx, key: str | None = None) -> FakeRow:
        """INSERT one row: its xid first, then ``nextval`` for its seq."""
        assert key is None or self.key_holder.get(key) is tx, "append under a row lock held"
        xid = self.take_xid(tx)
        self.last_seq += 1
        row = FakeRow(xid, self.last_seq, frozenset(self.commit_order), frozenset(tx.observed), key)
        tx.rows.append(row)
        self.rows.append(row)
        return row

    def end(self, tx: Tx, commit: bool) -> None:
        """COMMIT or ROLLBACK: the transaction leaves the running set."""
        assert tx.state == "open"
        assert not tx.busy
        tx.state = "committed" if commit else "rolled back"
        if tx in self.sessions:
            self.sessions.remove(tx)
        if tx.xid is not None:
            self.ended.add(tx.xid)
            self.latest_completed = max(self.latest_completed, tx.xid)
            if commit:
                self.commit_order.append(tx.xid)
                self.committed.extend(tx.rows)
                for key in tx.keys:
                    if any(r.key == key for r in tx.rows):
                        self.key_writer[key] = tx.xid
        for key in tx.keys:
            del self.key_holder[key]
        if commit:
            self.ticks.extend(tx.ticks)
        if self.tick_lock is tx:
            self.tick_lock = None

    def running(self) -> set[int]:
        """The xids of transactions that have one and have not ended."""
        txs = [*self.sessions, *(a.tx for a in self.attempts)]
        return {tx.xid for tx in txs if tx.xid is not None and tx.state == "open"}

    def pg_current_snapshot(self, taker: Tx) -> Snapshot:
        """``GetSnapshotData`` as ``pg_current_snapshot()`` prints it."""
        xmax = self.latest_completed + 1
        xip = frozenset(x for x in self.running() if x < xmax and x != taker.xid)
        own = {taker.xid} if taker.xid is not None and taker.xid < xmax else set()
        return Snapshot(min(xip | own, default=xmax), xmax, xip)

    # -- Ticks, statement by statement -------------------------------------

    def start_tick(self, force: bool = False) -> TickAttempt:
        """A ticker calls ``pgfeed.tick_v2(term, force)`` in a transaction of its own."""
        steps = self.tick_steps[1:] if force else self.tick_steps
        attempt = TickAttempt(Tx(), steps)
        self.attempts.append(attempt)
        return attempt

    def start_embedded_tick(self, tx: Tx) -> TickAttempt:
        """``tx`` calls ``create_stream_v2``, which takes a tick."""
        assert tx.state == "open"
        assert not tx.busy
        tx.busy = True
        attempt = TickAttempt(tx, self.embedded_tick_steps, embedded=True)
        self.attempts.append(attempt)
        return attempt

    def step(self, attempt: TickAttempt) -> bool:
        """Run the attempt's next statement; False while it waits for the lock."""
        name = attempt.steps[attempt.done]
        if not getattr(self, "_tick_" + name)(attempt):
            return False
        attempt.done = len(attempt.steps) if attempt.nothing_new else attempt.done + 1
        if attempt.finished and attempt in self.attempts:
            self.attempts.remove(attempt)
        return True

    def fail(self, attempt: TickAttempt) -> None:
        """The ticker's call errors out (superseded term, timeout): rollback."""
        assert not attempt.embedded
        self.attempts.remove(attempt)
        self.end(attempt.tx, commit=False)

    def tick(self, force: bool = True) -> Tick | None:
        """A whole tick at once, nobody acting in between (for hand-written histories)."""
        attempt = self.start_tick(force)
        while not attempt.finished:
            assert self.step(attempt), "the tick lock is held by an open transaction"
        return attempt.tx.ticks[-1] if attempt.tx.ticks else None

    def newest_tick(self, tx: Tx) -> Tick | None:
        """``SELECT ... FROM pgfeed.ticks ORDER BY id DESC LIMIT 1`` in ``tx``."""
        if tx.ticks:
            return tx.ticks[-1]
        return self.ticks[-1] if self.ticks else None

    def _tick_changed(self, a: TickAttempt) -> bool:
        last = self.newest_tick(a.tx)
        if last is not None and not self.changed_since(last, self.pg_current_snapshot(a.tx), self.last_seq):
            a.nothing_new = True  # RETURN: the call ends having written nothing
            self.end(a.tx, commit=True)
        return True

    def _tick_seq_lo(self, a: TickAttempt) -> bool:
        # create_stream_v2 passes NULL when its transaction already has an xid
        # (tick_v2 runs in a transaction of its own: it reads it always).
        a.seq_lo = None if a.embedded and a.tx.xid is not None else self.last_seq
        return True

    def _tick_xid(self, a: TickAttempt) -> bool:
        self.take_xid(a.tx)
        return True

    def _tick_lock(self, a: TickAttempt) -> bool:
        if self.tick_lock not in (None, a.tx):
            return False
        self.tick_lock = a.tx
        return True

    def _tick_newest(self, a: TickAttempt) -> bool:
        a.last = self.newest_tick(a.tx)
        return True

    def _tick_snapshot(self, a: TickAttempt) -> bool:
        a.current = self.pg_current_snapshot(a.tx)
        a.ended_at_snapshot = frozenset(self.ended)
        return True

    def _tick_seq_hi(self, a: TickAttempt) -> bool:
        a.seq_hi = self.last_seq
        return True

    def _tick_close(self, a: TickAttempt) -> bool:
        assert a.current is not None
        assert a.seq_hi is not None
        if a.last is not None:
            # _insert_tick_v2 refuses (PF002) a snapshot behind the newest tick's:
            # it means another cluster. On one server it must never happen.
            # The server's next xid is past our own, too (not a restore).
            own = a.tx.xid
            assert own is not None
            next_xid = max(a.current.xmax, own + 1)
            assert next_xid >= a.last.snapshot.xmax, f"PF002 on one server: {a.current} after {a.last}"
        snap, lo = self.close(a)
        tick = Tick((a.last.id if a.last else 0) + 1, snap, lo, a.seq_hi)
        a.tx.ticks.append(tick)
        self.truth[tick.id] = TickTruth(a.ended_at_snapshot, clamped=a.seq_lo is None)
        if a.embedded:
            a.tx.busy = False
        return True

    def _tick_commit(self, a: TickAttempt) -> bool:
        self.end(a.tx, commit=True)
        return True

    def close(self, a: TickAttempt) -> tuple[Snapshot, int]:
        """_insert_tick_v2's closed snapshot and seq_lo, as the SQL builds them."""
        own, current = a.tx.xid, a.current
        assert own is not None
        assert current is not None
        if a.seq_lo is None and a.last is not None:
            # Clamped (create_stream_v2 after its transaction wrote): exactly
            # the previous tick's snapshot and seq_lo, so it sees nothing new.
            # (Clamping only xmax let it see later commits below that xmax and
            # not earlier ones above it: not a prefix of the commit order.)
            assert a.last.seq_lo is not None
            return a.last.snapshot, a.last.seq_lo
        if a.seq_lo is not None:
            top, lo = max(own, current.xmax), a.seq_lo
        else:  # the very first tick, in a transaction that wrote
            top, lo = current.xmax, 0
        running = {x for x in current.xip if x < top} | ({own} if own < top else set()) | set(range(current.xmax, top))
        return Snapshot(min(running, default=top), top, frozenset(running)), lo

    def changed_since(self, last: Tick, cur: Snapshot, cur_seq: int) -> bool:
        """``pgfeed._changed_since_v2``: rows appended since the newest tick (the
        sequence moved), or rows it did not see whose transactions have ended."""
        if last.seq_hi is None or cur_seq > last.seq_hi:
            return True
        newly = {x for x in last.snapshot.xip if pg_visible_in_snapshot(x, cur)}
        return any(
            e.xid in newly or (last.snapshot.xmax <= e.xid < cur.xmax and pg_visible_in_snapshot(e.xid, cur))
            for e in self.committed
            if pg_visible_in_snapshot(e.xid, cur)
        )

    # -- The two queries the reader makes ----------------------------------

    def fetch_ticks(self, first: int, last: int) -> list[Tick]:
        return [t for t in self.ticks if first <= t.id <= last]

    def fetch_rows(self, req: NeedRows) -> list[FakeRow]:
        return self.interval_rows(req.start, req.end, req.after_seq, req.limit)

    def interval_rows(self, a: Tick, b: Tick, after_seq: int, lim: int) -> list[FakeRow]:
        """``pgfeed.interval_rows_v2``, clause by clause, over the rows a reader's
        statement sees now (those of committed transactions), in seq order."""
        assert a.seq_lo is not None, "ticks of the previous release are not modelled"
        events = sorted(self.committed, key=lambda e: e.seq)
        running = sorted(x for x in a.snapshot.xip if pg_visible_in_snapshot(x, b.snapshot))
        by_seq = [
            e
            for e in events
            if e.seq > max(a.seq_lo, after_seq)
            and e.seq <= (COMPLETE if b.seq_hi is None else b.seq_hi)
            and pg_visible_in_snapshot(e.xid, b.snapshot)
            and not pg_visible_in_snapshot(e.xid, a.snapshot)
        ][:lim]
        by_xid = []
        for x in running:  # CROSS JOIN LATERAL: one (xid, seq) scan per xid
            by_xid += [e for e in events if e.xid == x and e.seq > after_seq and e.seq <= a.seq_lo][:lim]
        return sorted(by_seq + by_xid, key=lambda e: e.seq)[:lim]  # UNION ALL ... ORDER BY seq LIMIT lim

    # -- Histories ---------------------------------------------------------

    def finish_ticks(self) -> None:
        """Let every tick in progress finish; a transaction that holds the tick
        lock (its create_stream_v2 done) commits when the others wait for it."""
        while self.attempts:
            moved = [self.step(a) for a in list(self.attempts)]
            if not any(moved):
                holder = self.tick_lock
                assert holder is not None
                assert not holder.busy
                assert holder in self.sessions
                self.end(holder, commit=True)
        if self.tick_lock is not None:
            self.end(self.tick_lock, commit=True)

    def drain(self) -> None:
        """Writers stop: every open transaction commits; the ticker ticks until
        it finds nothing new (``tick_v2`` without force)."""
        self.finish_ticks()
        for tx in list(self.sessions):
            self.end(tx, commit=True)
        for _ in range(3):
            if self.tick(force=False) is None:
                return
        raise AssertionError("the ticker keeps finding changes with no writer left")


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


@dataclass
class Follower:
    """A reader that follows the stream while the history happens (``read`` ops)."""

    limit: int
    window: int
    pos: Position = field(default_factory=lambda: Position(1))
    delivered: list[tuple[Position, FakeRow]] = field(default_factory=list)

    def catch_up(self, db: FakeDb) -> None:
        rows = read_all(db, self.pos, self.limit, self.window)
        self.delivered += rows
        self.pos = max(self.pos, Position(db.ticks[-1].id))


def first_seen(db: FakeDb, xid: int) -> Tick | None:
    """The first tick whose snapshot sees ``xid`` (None: not yet)."""
    return next((t for t in db.ticks if pg_visible_in_snapshot(xid, t.snapshot)), None)


def canonical(db: FakeDb, after_tick: int = 0) -> list[tuple[Position, FakeRow]]:
    """The specification: committed rows by (first tick that sees them, seq)."""
    placed = []
    for r in db.committed:
        tick = first_seen(db, r.xid)
        if tick is not None and tick.id > after_tick:
            placed.append((Position(tick.id, r.seq), r))
    return sorted(placed, key=lambda pr: pr[0])


def check_causal_order(db: FakeDb, delivered: list[tuple[Position, FakeRow]]) -> None:
    """Each row once; every row after all rows of each transaction it observed
    (and of each one that had committed when it was appended); per row lock,
    in lock order."""
    rows = [r for _, r in delivered]
    index = {r: i for i, r in enumerate(rows)}
    assert len(index) == len(rows), "a row was delivered twice"
    rows_of: dict[int, list[FakeRow]] = defaultdict(list)
    for r in db.committed:
        rows_of[r.xid].append(r)
    for i, r in enumerate(rows):
        assert r.observed <= r.after  # one can only observe a commit that happened
        for causes, how in ((r.observed, "observed"), (r.after, "was appended after")):
            for x in causes:
                late = [c for c in rows_of[x] if index.get(c, len(rows)) > i]
                assert not late, f"{r} {how} the commit of {x} but came before its rows {late}"
    by_key: dict[str, list[int]] = defaultdict(list)
    for r in rows:
        if r.key is not None:
            by_key[r.key].append(r.seq)
    for key, seqs in by_key.items():
        assert seqs == sorted(seqs), f"key {key}: rows appended under its lock at seqs {sorted(seqs)} came as {seqs}"


def check_mirror(db: FakeDb, delivered: list[tuple[Position, FakeRow]]) -> None:
    """Once every writer is done and ticked: each committed row delivered, and
    a mirror replayed from the stream holds each key's last committed row."""
    assert sorted(r.seq for _, r in delivered) == sorted(r.seq for r in db.committed)
    mirror = {r.key: r for _, r in delivered if r.key is not None}
    table = {r.key: r for r in sorted(db.committed, key=lambda r: r.seq) if r.key is not None}
    assert mirror == table


# A history: what a few sessions and tickers do, one statement at a time,
# played by History.apply. An operation that cannot happen now is skipped.
SESSIONS = 3  # connections of writers; each runs one transaction at a time
TICKERS = 2  # ticker processes (two at once: a deposed leader, an old release)


def history_op(clamped: bool = False) -> st.SearchStrategy[tuple[Any, ...]]:
    """One operation. ``clamped``: whether create_stream_v2 may also run in a
    transaction that already has an xid (its tick then has no seq_lo and
    breaks causal order: see test_tick_model.py)."""
    session = st.integers(0, SESSIONS - 1)
    ticker = st.integers(0, TICKERS - 1)
    kinds = {  # how often, and with what (the first is what hypothesis shrinks towards)
        "read": (1, st.tuples()),  # the follower catches up
        "append": (6, st.tuples(session, st.integers(1, 3), st.none() | st.sampled_from("kl"))),  # rows, row lock
        "tick": (8, st.tuples(ticker, st.integers(1, 3), st.booleans())),  # statements of tick_v2 (force?)
        "end": (4, st.tuples(session, st.sampled_from([True, True, True, False]))),  # commit?
        "xid": (2, st.tuples(session)),  # SELECT pg_current_xact_id()
        "observe": (2, st.tuples(session, st.integers(0, 50))),  # reads a committed transaction's rows
        "tick_fails": (1, st.tuples(ticker)),  # the ticker's call errors out: rollback
        "create_stream": (1, st.tuples(session, st.booleans() if clamped else st.just(False))),
    }
    return st.one_of([args.map(lambda a, k=k: (k, *a)) for k, (n, args) in kinds.items() for _ in range(n)])


op = history_op()


def histories(longest: int, runs: int = 0, clamped: bool = False) -> st.SearchStrategy[list[tuple[Any, ...]]]:
    """Histories of up to ``longest`` operations, drawn as at least ``runs``
    runs of 5 to 15 (long enough to matter; they still shrink well, the
    operation they shrink to does nothing). ``clamped``: see history_op."""
    one = history_op(clamped=True) if clamped else op
    drawn = st.lists(st.lists(one, min_size=5, max_size=15), min_size=runs, max_size=longest // 5)
    return drawn.map(lambda rs: [o for r in rs for o in r][:longest])


history = histories(100)


@dataclass
class History:
    """Plays a list of operations on a database: sessions begin a transaction
    when they first act, tickers start a tick_v2 call when they first act."""

    db: FakeDb
    follower: Follower | None = None
    txs: dict[int, Tx] = field(default_factory=dict)  # by session
    tickers: dict[int, TickAttempt] = field(default_factory=dict)

    def session(self, s: int) -> Tx:
        tx = self.txs.get(s)
        if tx is None:
            tx = self.txs[s] = self.db.begin()
        return tx

    def apply(self, o: tuple[Any, ...]) -> None:
        db, kind = self.db, o[0]
        if kind in ("tick", "tick_fails"):
            attempt = self.tickers.get(o[1])
            if attempt is not None and attempt.finished:
                attempt = None
            if kind == "tick_fails":
                if attempt is not None:
                    db.fail(attempt)
                    del self.tickers[o[1]]
                return
            if attempt is None:
                attempt = self.tickers[o[1]] = db.start_tick(force=o[3])
            for _ in range(o[2]):
                if attempt.finished or not db.step(attempt):
                    break
            return
        if kind == "read":
            if self.follower is not None:
                self.follower.catch_up(db)
            return
        if kind == "end" and o[1] not in self.txs:
            return
        tx = self.session(o[1])
        if tx.busy:  # inside create_stream_v2: its next statement
            db.step(next(a for a in db.attempts if a.tx is tx))
        elif kind == "xid":
            db.take_xid(tx)
        elif kind == "append":
            key = o[3]
            if key is None or db.lock_key(tx, key):  # else it waits for the holder
                for _ in range(o[2]):
                    db.append(tx, key)
        elif kind == "observe" and db.commit_order:
            db.observe(tx, db.commit_order[o[2] % len(db.commit_order)])
        elif kind == "end":
            db.end(tx, commit=o[2])
            del self.txs[o[1]]
        elif kind == "create_stream" and (tx.xid is None or o[2]):
            db.start_embedded_tick(tx)


def build(ops: list[tuple[Any, ...]], follower: Follower | None = None, db: FakeDb | None = None) -> FakeDb:
    """The database after ``ops``: ticks in progress finished and one more
    tick_v2 call; transactions still open stay open."""
    db = FakeDb() if db is None else db
    db.tick()  # the stream's creation tick
    played = History(db, follower)
    for o in ops:
        played.apply(o)
    db.finish_ticks()
    db.tick(force=False)
    return db
