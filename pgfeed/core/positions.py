"""Positions, ticks and batch planning: the pure heart of pgfeed's ordering.

No I/O happens here; the reader fetches ticks and rows and asks this module
what to deliver and where its position moves.

The correctness argument
------------------------
Every event row records ``xid``, the id of the transaction that wrote it,
and ``seq``, drawn from one global sequence when the row is appended (the
transaction's xid is assigned first). A *tick* is a row ``(id, snapshot,
seq_lo, seq_hi)`` taken under one advisory lock, after the previous tick
committed. Hence:

1. Ticks are totally ordered by id, and tick ``n+1``'s snapshot sees every
   transaction tick ``n`` sees: visibility of a given xid is monotonic in the
   tick id (false ... false, true ... true).
2. A snapshot sees a transaction only once it has ended. Rolled-back
   transactions leave no rows, so the rows whose xid is visible in tick ``b``
   are exactly the rows of transactions that committed before ``b`` was taken,
   and a reader's query issued after ``b`` committed sees all of them.
3. Interval ``(a, b]`` of a stream is the set of rows visible in ``b`` and not
   in ``a``. Intervals of consecutive ticks partition the committed rows:
   each row belongs to the first tick whose snapshot sees its xid. A
   transaction still running at ``b`` simply belongs to a later interval, so
   out-of-order commits are never skipped and rolled-back allocations never
   stall anything. No timer is involved anywhere.
4. The order of a stream is ``(tick, seq)``: by interval, then by append
   order. It is a function of durable data only, so every reader in every
   process sees the same order, and a :class:`Position` names the same prefix
   in every process.
5. **Causal order.** If transaction T2 appended a row *after* it observed T1's
   commit (read its rows, waited for its row lock, hit its key), that row's
   seq was drawn after T1 committed, so after every seq of T1: T1's rows are
   in the same or an earlier interval (T2 committed later, point 1) and, in
   the same interval, earlier by seq. Per key, captured changes follow the
   row lock, so they come in the order the table applied them. A
   transaction's rows are *not* necessarily contiguous: rows of concurrent
   transactions in the same interval interleave in append order.
6. A long transaction delays only the interval in which it commits; a stream it
   has not written to has no row with its xid, so it delays nothing there.

Reading an interval in seq order with bounded work uses the two bounds of a
tick: ``seq_hi`` (read after the snapshot: no row above it is visible in the
tick) and ``seq_lo`` (read before the tick's transaction got its xid, with the
snapshot *closed* to that xid: every row with seq at or below it that the tick
does not see belongs to a transaction the snapshot lists as running). See
``pgfeed.interval_rows_v2``.

Rows of one interval may be split across *batches* when there are more of
them than the batch size; the position then points inside the interval (a
"partial" position ``n.seq``) and the next read resumes after that seq.
"""

from __future__ import annotations

import bisect
from collections.abc import Generator, Iterable, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

from pgfeed.errors import TokenError

#: Sentinel above every real xid/seq: a position whose xid and seq are COMPLETE
#: covers its whole interval.
COMPLETE = 2**63 - 1


@dataclass(frozen=True)
class Snapshot:
    """A PostgreSQL ``pg_snapshot``: which transactions had ended when it was taken."""

    xmin: int
    xmax: int
    xip: frozenset[int]

    @classmethod
    def parse(cls, text: str) -> Snapshot:
        """Parse the text form ``xmin:xmax:xip1,xip2,...``."""
        try:
            xmin_s, xmax_s, xip_s = text.split(":")
            xip = frozenset(int(x) for x in xip_s.split(",") if x)
            return cls(int(xmin_s), int(xmax_s), xip)
        except ValueError:
            raise ValueError(f"malformed pg_snapshot {text!r}") from None

    def visible(self, xid: int) -> bool:
        """Whether transaction ``xid`` had ended when this snapshot was taken
        (the same rule as ``pg_visible_in_snapshot``)."""
        if xid < self.xmin:
            return True
        if xid >= self.xmax:
            return False
        return xid not in self.xip

    def __str__(self) -> str:
        return f"{self.xmin}:{self.xmax}:{','.join(str(x) for x in sorted(self.xip))}"


@dataclass(frozen=True)
class Tick:
    """A numbered snapshot, shared by every reader, with its seq bounds
    (None on ticks of the previous release) and its fingerprint ``fp``
    (``pgfeed.ticks.fp``: the same id with another fingerprint is another
    history; None where the reader did not read it)."""

    id: int
    snapshot: Snapshot
    seq_lo: int | None = None
    seq_hi: int | None = None
    fp: int | None = None


class Position(NamedTuple):
    """A point in a stream's order; rendered as a token string.

    ``Position(n)`` (token ``"n"``) covers every interval up to and including
    tick ``n``. ``Position(n, seq)`` (token ``"n.seq"``) covers the intervals
    before ``n`` and the rows of interval ``n`` up to and including ``seq``.
    Positions compare in stream order (a named tuple: one is created per
    delivered row, so it must be cheap).
    """

    tick: int
    seq: int = COMPLETE

    @property
    def complete(self) -> bool:
        """True when the position sits on a tick boundary."""
        return self.seq == COMPLETE

    @property
    def covered_tick(self) -> int:
        """The newest tick whose interval this position covers whole."""
        return self.tick if self.complete else self.tick - 1

    @classmethod
    def parse(cls, token: str) -> Position:
        """Parse a token; raise :class:`TokenError` naming the accepted forms.

        A check (``~CHECK``) is accepted and *not verified* here: it proves
        which stream and history the token belongs to only where a reader
        checks it (``subscribe``, ``wait_for``); see :class:`PositionToken`."""
        return PositionToken.parse(token).position

    def __str__(self) -> str:
        if self.complete:
            return str(self.tick)
        return f"{self.tick}.{self.seq}"


#: How many hex digits a position token's check has (``TICK[.SEQ]~CHECK``).
CHECK_DIGITS = 6


class PositionToken(NamedTuple):
    """A position token as text: the position, and the check pgfeed printed
    after ``~`` (None for a bare token).

    The check (:func:`pgfeed.core.tokens.token_check`) is a hash of the
    stream's incarnation and the fingerprint of the position's tick: a reader
    verifies it against the database, so that a token of another stream,
    another incarnation or another history is refused instead of read as a
    cut. A bare token (``41``, ``41.7``) is not verified against history; it
    stays accepted for hand use and for positions saved by earlier releases.
    """

    position: Position
    check: str | None = None

    @classmethod
    def parse(cls, token: str) -> PositionToken:
        """Parse ``TICK``, ``TICK.SEQ``, ``TICK~CHECK`` or ``TICK.SEQ~CHECK``;
        raise :class:`TokenError` (one line) naming the accepted forms."""
        body, sep, check = token.strip().partition("~") if isinstance(token, str) else ("", "", "")
        parts = body.split(".")
        well_formed = all(p.isdigit() and p.isascii() and len(p) <= 19 for p in parts) and all(
            int(p) < COMPLETE for p in parts
        )
        if sep and not (len(check) == CHECK_DIGITS and all(c in "0123456789abcdef" for c in check)):
            well_formed = False
        if well_formed:
            if len(parts) == 1:
                return cls(Position(int(parts[0])), check or None)
            if len(parts) == 2:
                return cls(Position(int(parts[0]), int(parts[1])), check or None)
            if len(parts) == 3 and not sep:
                n = int(parts[0])
                raise TokenError(
                    f"position token {token!r} is a partial position of pgfeed 0.1, whose order inside a tick "
                    f"differs: resume from {max(n - 1, 0)} to receive tick {n} again (some rows twice), "
                    f"or from {n} to skip the rest of it"
                )
        raise TokenError(
            f"malformed position token {token!r}: expected TICK, TICK.SEQ, TICK~CHECK or TICK.SEQ~CHECK "
            f"(non-negative integers, CHECK {CHECK_DIGITS} lowercase hex digits), as printed by pgfeed"
        )

    def __str__(self) -> str:
        if self.check is None:
            return str(self.position)
        return f"{self.position}~{self.check}"


class RowLike(Protocol):
    """What the planner needs of a row: its transaction and append order."""

    @property
    def xid(self) -> int: ...

    @property
    def seq(self) -> int: ...


R = TypeVar("R", bound=RowLike)
T = TypeVar("T")


@dataclass(frozen=True)
class Planned(Generic[T]):
    """The outcome of one planning step.

    ``rows`` are ``(position, row)`` pairs in stream order, ready to deliver.
    ``end`` is the reader's position once they are delivered, or ``None`` when
    nothing could be decided from a multi-tick window (the caller then pages
    through the first interval on its own with :func:`plan_interval`).
    """

    rows: list[tuple[Position, T]]
    end: Position | None


def first_visible_tick(window: Sequence[Tick], xid: int, lo: int = 0) -> Tick:
    """The first tick of ``window`` (from index ``lo``) whose snapshot sees ``xid``.

    Visibility is monotonic along the window (argument point 1), so a binary
    search finds it. The caller guarantees the last tick sees ``xid``.
    """
    hi = len(window) - 1
    if not window[hi].snapshot.visible(xid):
        raise ValueError(f"xid {xid} is not visible in tick {window[hi].id}")
    while lo < hi:
        mid = (lo + hi) // 2
        if window[mid].snapshot.visible(xid):
            hi = mid
        else:
            lo = mid + 1
    return window[lo]


def plan_window(window: Sequence[Tick], rows: Sequence[R], limit: int) -> Planned[R]:
    """Plan delivery from a complete position through a window of ticks.

    ``window`` holds consecutive ticks after the reader's position (ascending,
    non-empty). ``rows`` are the first ``limit + 1`` (at most) rows of interval
    ``(position, window[-1]]`` in seq order.

    If all rows fit, every row gets its tick and the reader moves to the end of
    the window. Otherwise the rows not fetched all have ``seq >= s`` where
    ``s`` is the seq of the first row beyond the limit; a tick whose
    ``seq_hi < s`` cannot see any of them, so every interval up to the last such
    tick is fully inside what was fetched and can be delivered whole.
    """
    if not window:
        raise ValueError("empty tick window")
    if len(rows) <= limit:
        return Planned(_order(window, rows), Position(window[-1].id))
    cut_seq = rows[limit].seq
    cut = bisect.bisect_left([_seq_hi(t) for t in window], cut_seq)
    if cut == 0:
        return Planned([], None)
    settled = window[:cut]
    last = settled[-1]
    fits = [r for r in rows[:limit] if last.snapshot.visible(r.xid)]
    return Planned(_order(settled, fits), Position(last.id))


def plan_interval(tick: int, rows: Sequence[R], limit: int) -> Planned[R]:
    """Plan delivery inside one interval, ending at ``tick``.

    ``rows`` are the next ``limit + 1`` (at most) rows of the interval after
    the reader's position, in seq order.
    """
    if len(rows) <= limit:
        return Planned([(Position(tick, r.seq), r) for r in rows], Position(tick))
    taken = rows[:limit]
    return Planned([(Position(tick, r.seq), r) for r in taken], Position(tick, taken[-1].seq))


def _seq_hi(tick: Tick) -> int:
    return COMPLETE if tick.seq_hi is None else tick.seq_hi


def _order(window: Sequence[Tick], rows: Iterable[R]) -> list[tuple[Position, R]]:
    xmaxes = [t.snapshot.xmax for t in window]
    last = len(window) - 1
    placed = []
    for r in rows:
        # No tick with xmax <= xid can see it; the first one after usually does.
        i = min(bisect.bisect_right(xmaxes, r.xid), last)
        tick = window[i] if window[i].snapshot.visible(r.xid) else first_visible_tick(window, r.xid, i)
        placed.append((Position(tick.id, r.seq), r))
    placed.sort(key=itemgetter(0))
    return placed


@dataclass(frozen=True)
class NeedTicks:
    """Request: ticks ``first..last`` inclusive, ascending and contiguous."""

    first: int
    last: int


@dataclass(frozen=True)
class NeedRows:
    """Request: the first ``limit`` rows in seq order after ``after_seq``
    whose xid is visible in tick ``end`` and not in tick ``start``."""

    start: Tick
    end: Tick
    limit: int
    after_seq: int = 0


Request = NeedTicks | NeedRows


def read_step(pos: Position, head: int, limit: int, tick_window: int) -> Generator[Request, Any, Planned[Any]]:
    """One read of a stream from ``pos`` towards tick ``head``, sans I/O.

    The generator yields :class:`NeedTicks` / :class:`NeedRows` requests; the
    caller performs each and sends back the result (a list of :class:`Tick`
    or of rows). Its return value is the :class:`Planned` delivery, whose
    ``end`` is never None and always beyond ``pos`` when ``pos`` is before
    ``head``.
    """
    if not pos.complete:
        prev, cur = yield NeedTicks(pos.tick - 1, pos.tick)
        rows = yield NeedRows(prev, cur, limit + 1, pos.seq)
        return plan_interval(pos.tick, rows, limit)
    last = min(head, pos.tick + tick_window)
    ticks = yield NeedTicks(pos.tick, last)
    start, window = ticks[0], ticks[1:]
    rows = yield NeedRows(start, window[-1], limit + 1)
    planned: Planned[Any] = plan_window(window, rows, limit)
    if planned.end is not None:
        return planned
    # Nothing settled: the first tick may hold more rows than fit. Typically
    # a large transaction that was running across many ticks fills the fetch
    # with rows of a later tick: the ticks before the first one that sees any
    # fetched row hold none of them, so read those intervals without them, in
    # one go.
    blocker = min(first_visible_tick(window, r.xid).id for r in rows)
    before = [t for t in window if t.id < blocker]
    if before:
        rows = yield NeedRows(start, before[-1], limit + 1)
        planned = plan_window(before, rows, limit)
        if planned.end is not None:
            return planned
    first = window[0]
    rows = yield NeedRows(start, first, limit + 1)
    return plan_interval(first.id, rows, limit)
