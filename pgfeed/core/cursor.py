"""Where one subscription stands in its stream: the decisions of a
subscription without its I/O.

A :class:`Cursor` keeps two positions apart:

* ``fetch``, how far the subscription has *read* (batches may wait on its
  queue, read ahead of the consumer);
* ``delivered``, how far the consumer has *taken*: it moves only when the
  consumer takes the batch after one (or an empty read finds nothing queued),
  so ``position()`` and ``wait_for`` speak of delivery, never of read-ahead.

It also holds the rules that decide where a subscription starts (``since``,
``until``), when continuity is lost (the stream was dropped and recreated, or
pruned past the position, or the database's history changed: a *reset*), and
where ``until`` cuts a read. Every reset bumps ``epoch``: a batch read before
it must not be delivered after it.

Pure: :mod:`pgfeed.subscription` does the waiting, reading and queueing and
asks this module what follows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

from pgfeed.core.positions import Planned, Position, PositionToken, RowLike, Tick, plan_window
from pgfeed.core.tickcache import Prefetched
from pgfeed.core.tokens import CommitToken, token_check
from pgfeed.errors import FutureToken, TokenError

#: The reset reason when a prune removed rows the position still needs.
PRUNED = "the position is older than what the stream still holds (pruned)"
#: The reset reason when the starting position predates the stream's incarnation.
OLDER_INCARNATION = "the starting position is older than this stream's current incarnation"
#: The reset reason when the stream was dropped and created again.
RECREATED = "the stream was dropped and recreated"

R = TypeVar("R")
Row = TypeVar("Row", bound=RowLike)


@dataclass(frozen=True)
class StreamMeta:
    """The current incarnation of a stream and how much of it is retained."""

    id: int
    created_tick: int
    floor_tick: int = 0
    notify_mode: str = "ticker"

    @property
    def first_tick(self) -> int:
        """The oldest position the stream can still be read from."""
        return max(self.created_tick, self.floor_tick)


class Interrupted(Exception):
    """A read that cannot be trusted (pruned or dropped meanwhile); retried after a fresh tick."""


def pruned_past(pos: Position, meta: StreamMeta) -> bool:
    """Whether a prune removed rows that reading on from ``pos`` needs: the
    intervals up to the floor are gone, so a complete position must be at the
    floor or later, and a partial one (inside interval n) after it."""
    return pos.tick < meta.floor_tick or (not pos.complete and pos.tick <= meta.floor_tick)


#: Where a subscription starts or stops, as given: ``"earliest"``, ``"now"``,
#: a position token (text, or parsed with its check) or a position.
Spec = str | Position | PositionToken


def named_token(spec: Spec, head: int, what: str) -> PositionToken | None:
    """The position token ``spec`` names (a :class:`Position` as a bare
    token), None for ``"earliest"`` and ``"now"``. :class:`TokenError` for
    anything else, :class:`FutureToken` beyond the newest tick ``head``."""
    if isinstance(spec, PositionToken):
        named = spec
    elif isinstance(spec, Position):
        named = PositionToken(spec)
    elif spec in ("earliest", "now"):
        return None
    elif isinstance(spec, str):
        named = PositionToken.parse(spec)
    else:
        raise TokenError(f"invalid {what} {spec!r}: expected 'earliest', 'now' or a position token")
    if named.position.tick > head:
        raise FutureToken(f"position {named.position} is beyond anything this database has issued (newest tick {head})")
    return named


def parse_spec(spec: Spec, head: int, meta: StreamMeta, what: str) -> Position:
    """``since``/``until`` as a position: ``"earliest"`` (the oldest position
    the stream still holds), ``"now"`` (the newest tick ``head``) or a token.
    :class:`TokenError` for anything else, :class:`FutureToken` beyond ``head``."""
    named = named_token(spec, head, what)
    if named is not None:
        return named.position
    return Position(meta.first_tick) if spec == "earliest" else Position(head)


@dataclass(frozen=True)
class TickFacts:
    """What the database holds of the tick a position token names, read in
    one snapshot (``pgfeed.store.tick_facts``)."""

    #: Tick ``n`` is still in ``pgfeed.ticks`` (not pruned).
    exists: bool
    #: Its fingerprint (None: no such tick, or taken before migration 0007).
    fp: int | None = None
    #: For a partial token ``n.seq``: the stream has a row with that seq in interval ``n``.
    names_row: bool = False
    #: The stream's floor as of that read.
    floor_tick: int = 0


def needs_proof(token: PositionToken) -> bool:
    """Whether the database must be asked about ``token``: it carries a check,
    or it names a row (a partial token)."""
    return token.check is not None or not token.position.complete


def prove_token(stream: str, token: PositionToken, meta: StreamMeta, facts: TickFacts) -> None:
    """Refuse (:class:`TokenError`, one line) a token that does not name a
    point of this incarnation of ``stream`` in this database's history:

    * its check differs from the one computed from the stream's incarnation
      and tick ``n``'s fingerprint (another stream, an earlier incarnation,
      another history: a lagging standby promoted, a restore);
    * a partial token ``n.seq`` (checked or bare) whose seq is no row of the
      stream that became visible in tick ``n``.

    A token whose tick is gone (pruned) or that predates the incarnation is
    not refused: the cursor resets instead, as it always did. A bare
    complete token cannot be checked at all."""
    pos = token.position
    if _check_differs(token, meta, facts):
        raise TokenError(
            f"position token {str(token)!r} does not belong to stream {stream!r} on this database: it "
            "was taken on another stream, on an earlier incarnation of this one, or on a database whose history "
            "has changed since (failover to a standby that lagged, a restore); resume from 'earliest' or from a "
            "token of this stream"
        )
    if _names_no_row(pos, meta, facts):
        raise TokenError(
            f"position token {str(token)!r} names no row of stream {stream!r}: no row with seq "
            f"{pos.seq} became visible in tick {pos.tick}; resume from {pos.tick - 1} to read tick {pos.tick} "
            "whole, or from a token pgfeed printed for this stream"
        )


def saved_position_distrusted(pos: Position, saved_fp: int | None, meta: StreamMeta, facts: TickFacts) -> str | None:
    """Why a consumer's saved position ``pos`` cannot be resumed from (the
    reset reason), or None. Saved by pgfeed itself, it is never refused (the
    consumer could never start again): the subscription resets instead,
    delivering the stream again from its first tick (repeat, never skip).
    ``saved_fp`` is the fingerprint of tick ``pos.tick`` as the consumer saw
    it (None: saved before migration 0007, or not known then)."""
    if facts.exists and saved_fp is not None and facts.fp is not None and facts.fp != saved_fp:
        return (
            f"the database's history changed since this consumer saved its position {pos} (tick {pos.tick} is "
            "not the tick it saw: failover to a standby that lagged, or a restore)"
        )
    if _names_no_row(pos, meta, facts):
        return f"the saved position {pos} names no row of the stream (the database's history changed since?)"
    return None


def _check_differs(token: PositionToken, meta: StreamMeta, facts: TickFacts) -> bool:
    """``token`` has a check, its tick exists, and the check is not this
    incarnation's at that tick's fingerprint."""
    if token.check is None or not facts.exists:
        return False
    return facts.fp is None or token_check(meta.id, meta.created_tick, facts.fp) != token.check


def _names_no_row(pos: Position, meta: StreamMeta, facts: TickFacts) -> bool:
    """``pos`` is partial and no row of the stream has its seq in its tick;
    not asked of a position the cursor resets from anyway (its tick pruned,
    or older than the incarnation)."""
    if pos.complete or not facts.exists or pos.tick < meta.created_tick:
        return False
    if pruned_past(pos, replace(meta, floor_tick=max(meta.floor_tick, facts.floor_tick))):
        return False
    return not facts.names_row


def check_spec(text: str) -> str:
    """``text`` unchanged if it can say where a subscription starts or stops:
    ``"earliest"``, ``"now"``, a commit token or a position token (with or
    without its check); else :class:`TokenError` naming the accepted forms.
    For command-line options, before anything connects (a token's check is
    verified only by the reader)."""
    if text not in ("earliest", "now") and CommitToken.parse(text) is None:
        PositionToken.parse(text)
    return text


def newest_named(*specs: object) -> int | None:
    """The newest tick named by positions among ``specs`` (None if none is a
    position): the reader must know a head at least that new to check them."""
    ticks = [s.tick for s in specs if isinstance(s, Position)]
    return max(ticks) if ticks else None


def plan_prefetched(
    pos: Position, found: tuple[Sequence[Tick], Prefetched[Row]] | None, limit: int
) -> Planned[Row] | None:
    """The delivery from rows prefetched with a newer tick (see
    :meth:`TickCache.prefetched_for`: the ticks after ``pos`` up to that
    tick, and the first ``limit + 1`` rows between), planned as a range read
    over that window of ticks would be; None when nothing is prefetched or no tick of
    the window fits in one batch (read them the usual way).
    :class:`Interrupted` when a prune reached ``pos`` before they were read."""
    if found is None:
        return None
    window, prefetched = found
    if prefetched.floor > pos.tick:
        raise Interrupted(f"the stream was pruned up to tick {prefetched.floor}")
    planned = plan_window(window, prefetched.rows, limit)
    return planned if planned.end is not None else None


class Cursor:
    """The read-ahead and delivered positions of one subscription, and its resets.

    ``on_delivered`` is called whenever ``delivered`` moves forward.
    """

    def __init__(self, stream: str, on_delivered: Callable[[], None] = lambda: None) -> None:
        self.stream = stream
        self._on_delivered = on_delivered
        self.fetch: Position | None = None  # read ahead up to here
        self.delivered: Position | None = None  # taken by the consumer up to here
        self.until: Position | None = None
        self.meta: StreamMeta | None = None  # None while the stream is missing
        #: Why continuity was lost, until the batch that says so is queued.
        self.pending_reset: str | None = None
        self.epoch = 0  # bumped by every reset: a read begun before it is discarded
        self._queued: list[Position] = []  # ends of the batches queued, not yet acknowledged
        self._handed: Position | None = None  # the end of the batch the consumer holds
        self._idle_target: Position | None = None  # an empty read's end, once the queue is taken

    # -- where it starts -------------------------------------------------
    def start(self, since: Spec, until: Spec | None, head: int, meta: StreamMeta, distrust: str | None = None) -> None:
        """Start at ``since`` (a reset when it predates the stream's
        incarnation or its retained rows, or with reason ``distrust`` when
        the caller cannot trust it) and stop at ``until``."""
        self.meta = meta
        start = parse_spec(since, head, meta, "since")
        if distrust is not None:
            self.pending_reset = distrust
            start = Position(meta.first_tick)
        elif start.tick < meta.created_tick:
            self.pending_reset = OLDER_INCARNATION
            start = Position(meta.first_tick)
        elif pruned_past(start, meta):
            self.pending_reset = PRUNED
            start = Position(meta.first_tick)
        self.fetch = start
        self.delivered = start
        if until is not None:
            self.until = parse_spec(until, head, meta, "until")

    # -- what the newest tick says -------------------------------------------
    @property
    def finished(self) -> bool:
        """Whether everything up to ``until`` has been read."""
        return self.until is not None and self.fetch is not None and self.fetch >= self.until

    def has_work(self, head: int) -> bool:
        """Whether there is something past the read position at tick ``head``,
        or a reset to deliver."""
        pos = self.fetch
        if pos is None:
            return False
        return self.pending_reset is not None or not pos.complete or head > pos.tick

    def at_head(self, head: int) -> bool:
        """Whether everything up to tick ``head`` has been read."""
        return self.fetch is not None and self.fetch.complete and self.fetch.tick >= head

    def stands_at(self, known: int | None) -> bool:
        """Whether this cursor read up to exactly the head ``known``: the next
        read of the newest tick may carry its next interval's rows (prefetch)."""
        return known is not None and self.fetch == Position(known)

    def lose_stream(self) -> bool:
        """The stream is missing (dropped); True the first time it is noticed."""
        was_known, self.meta = self.meta is not None, None
        return was_known

    def follow(self, meta: StreamMeta) -> str | None:
        """Follow the stream's current incarnation; the reset reason when it was
        recreated or pruned past the read position (the cursor is then reset)."""
        assert self.fetch is not None
        reason = None
        if self.meta is None or meta.id != self.meta.id:
            reason = RECREATED
        elif pruned_past(self.fetch, meta):
            reason = PRUNED
        if reason is not None:
            self.reset(meta, reason)
        self.meta = meta
        return reason

    def history_changed(self, reason: str) -> bool:
        """The database is not the history that was read: reset (True) unless
        nothing was read yet, or everything up to ``until`` was (the
        subscription has ended: nothing would announce the reset, and
        draining its queue would drop its end)."""
        if self.meta is None or self.fetch is None or self.finished:
            return False
        self.reset(self.meta, reason)
        return True

    def reset(self, meta: StreamMeta, reason: str) -> None:
        """Continuity is lost: forget what was read ahead and restart at the
        stream's first tick. No delivered position until the consumer has
        taken the reset batch: ``wait_for`` must not return before the
        consumer knows of the break."""
        self.epoch += 1
        self.pending_reset = reason
        self.fetch = Position(meta.first_tick)
        self.forget_queued()
        self.delivered = None

    # -- a read and its batch ----------------------------------------------
    def cut(self, planned: Planned[R]) -> tuple[list[tuple[Position, R]], Position]:
        """The rows of ``planned`` up to ``until`` and where reading ends."""
        end = planned.end
        assert end is not None
        if self.until is not None and end > self.until:
            return [(p, r) for p, r in planned.rows if p <= self.until], self.until
        return planned.rows, end

    def read(self, end: Position, has_rows: bool) -> bool:
        """A read reached ``end``: True when it makes a batch to queue (rows,
        or a reset to announce). An empty read moves ``delivered`` at once,
        or once the consumer has taken every queued batch."""
        self.fetch = end
        if has_rows or self.pending_reset is not None:
            return True
        if self._queued or self._handed is not None:
            self._idle_target = end
        else:
            self._advance(end)
        return False

    def queue(self, end: Position) -> tuple[int, str | None]:
        """A batch ending at ``end`` is queued: its epoch, and the reset
        reason it announces (taken: the next batch announces none)."""
        reason, self.pending_reset = self.pending_reset, None
        self._queued.append(end)
        return self.epoch, reason

    def take(self, epoch: int, end: Position) -> bool:
        """The consumer takes the batch ending at ``end`` read in ``epoch``;
        False for a batch read before a reset (drop it)."""
        if epoch != self.epoch:
            return False
        self._handed = end
        return True

    def ack(self) -> None:
        """The consumer is done with the batch it holds (it asked for the next)."""
        if self._handed is None:
            return
        end, self._handed = self._handed, None
        self._queued.remove(end)
        self._advance(end)
        if not self._queued and self._idle_target is not None:
            self._advance(self._idle_target)
            self._idle_target = None

    def forget_queued(self) -> None:
        """The queue was emptied: no batch is awaiting acknowledgement."""
        self._queued.clear()
        self._idle_target = None
        self._handed = None

    def _advance(self, pos: Position) -> None:
        if self.delivered is None or pos > self.delivered:
            self.delivered = pos
            self._on_delivered()
