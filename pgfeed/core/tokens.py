"""Commit tokens (read-your-writes without a write) and the check that
position tokens carry. Pure, no I/O.

Position tokens
---------------
A position token printed by pgfeed carries a check: ``TICK[.SEQ]~CHECK``
(:class:`~pgfeed.core.positions.PositionToken`). :func:`token_check` hashes
what makes the token mean one point of one history: the stream's incarnation
(its id and the tick that created it) and the fingerprint of tick ``TICK``
(``pgfeed.ticks.fp``: id, snapshot, seq bounds, time, term, cluster). A
reader recomputes it from the database before it starts from the token or
waits for it; a token of another stream, of an earlier incarnation of this
one, or of a history the database no longer has (a lagging standby promoted,
a restore) does not match and is refused.

Commit tokens
-------------

A writer cannot know, at COMMIT, which tick will first cover its
transaction: ticks are taken later, by the ticker. So the token names what
the writer does know, and a reader resolves it against the shared ticks:

* ``x<xid>`` — the writer's transaction (``SELECT pgfeed.commit_token()``
  inside it). It is covered by every tick whose snapshot sees ``xid`` as ended.
* ``s<xmin>:<xmax>:<xip>`` — a snapshot taken after COMMIT
  (:func:`pgfeed.commit_token`): every transaction that had ended by then,
  the writer's included. It is covered by every tick that sees all of those as ended.

Coverage is monotonic in the tick id (a tick sees everything the previous one
saw), so every process resolves a token to the same first covering tick ``n``,
and waiting for a commit token is waiting for position ``n``: tokens stay
totally ordered and mean the same prefix everywhere.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from pgfeed.core.positions import CHECK_DIGITS, Snapshot, Tick


def token_check(stream_id: int, created_tick: int, fp: int) -> str:
    """The check of a position token at a tick whose fingerprint is ``fp``,
    on the incarnation of a stream with id ``stream_id`` created at tick
    ``created_tick``: :data:`~pgfeed.core.positions.CHECK_DIGITS` lowercase
    hex digits. An integrity check against mix-ups (one wrong token in 16
    million passes), not a secret."""
    data = f"{stream_id}:{created_tick}:{fp}".encode()
    return hashlib.blake2b(data, digest_size=CHECK_DIGITS // 2, person=b"pgfeed-token").hexdigest()


@dataclass(frozen=True)
class CommitToken:
    """A point that is covered once a tick sees every transaction it names as ended."""

    xid: int | None = None
    snapshot: Snapshot | None = None

    @classmethod
    def parse(cls, text: str) -> CommitToken | None:
        """``x<xid>`` or ``s<snapshot>``; None for any other text (a position token, or garbage)."""
        if not isinstance(text, str) or len(text) < 2:
            return None
        body = text.strip()[1:]
        if text.startswith("x") and body.isascii() and body.isdigit() and len(body) <= 19:
            return cls(xid=int(body))
        if text.startswith("s"):
            try:
                return cls(snapshot=Snapshot.parse(body))
            except ValueError:
                return None
        return None

    def covered_by(self, snap: Snapshot) -> bool:
        """Whether a tick with snapshot ``snap`` sees everything this token names."""
        if self.xid is not None:
            return snap.visible(self.xid)
        assert self.snapshot is not None
        token = self.snapshot
        # Every xid below token.xmax that had ended at the token (not in its
        # xip) must have ended in snap: snap reaches that far, and whatever it
        # still runs below that was running at the token too.
        return snap.xmax >= token.xmax and all(x in token.xip for x in snap.xip if x < token.xmax)

    @property
    def newest_xid(self) -> int:
        """The highest xid this token needs ended (to refuse tokens from the future)."""
        if self.xid is not None:
            return self.xid
        assert self.snapshot is not None
        return self.snapshot.xmax - 1

    def __str__(self) -> str:
        if self.xid is not None:
            return f"x{self.xid}"
        return f"s{self.snapshot}"


def first_covering(ticks: Sequence[Tick], token: CommitToken) -> Tick | None:
    """The first of ``ticks`` (ascending, consecutive) that covers ``token``;
    None if none does. Binary search: coverage is monotonic along ticks."""
    if not ticks or not token.covered_by(ticks[-1].snapshot):
        return None
    lo, hi = 0, len(ticks) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if token.covered_by(ticks[mid].snapshot):
            hi = mid
        else:
            lo = mid + 1
    return ticks[lo]
