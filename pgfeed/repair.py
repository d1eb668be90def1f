"""Make a database restored into another cluster usable again (``pgfeed repair --after-restore``).

A dump restored into a fresh cluster carries ticks whose snapshots name the
old cluster's transaction ids. While the new cluster's ids are behind them,
every row appended there looks "long delivered" to the restored ticks, so the
ticker refuses to tick (``_history_break_v3`` says why) rather than skip such
rows. The repair, in two steps:

1. advance this cluster's transaction ids past the restored newest tick's
   (``advance_xids_v3``: one empty commit per id, synchronous_commit off);
2. once no transaction from before that point is open, give every row the
   restored ticks wrongly count as delivered the repair transaction's id
   (``repair_restamp_v3``), so that the next tick delivers them after the
   whole restored history, in append order.

The restored history stays readable as it was; tokens and saved positions of
it stay valid. See "When the database changes under you" in docs/design.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg

from pgfeed.errors import PgfeedError, UsageError, translate
from pgfeed.execute import tuples
from pgfeed.queries import query

#: The most transaction ids the repair burns by itself (about a minute); a
#: bigger gap is for pg_resetwal on the stopped server.
MAX_ADVANCE = 20_000_000


@dataclass(frozen=True)
class RepairResult:
    """What the repair found and did (``dry_run``: would do)."""

    reason: str | None  # why the history could not be continued; None: nothing to repair
    xids_behind: int  # transaction ids this cluster was behind the restored newest tick
    rows_moved: int  # rows given to the next interval
    repaired: bool


def repair_after_restore(conn: psycopg.Connection[Any], *, dry_run: bool = False) -> RepairResult:
    """Repair a database restored into another cluster; see the module docstring.

    ``conn`` must be in autocommit mode and belong to the schema owner.
    Raises :class:`PgfeedError` with a one-line reason when it cannot:
    transactions from before the repair still open, or a gap in transaction
    ids too large to burn (then: ``pg_resetwal --next-transaction-id``).
    """
    if not conn.autocommit:
        raise UsageError("repair_after_restore needs a connection in autocommit mode")
    try:
        reason, tick_xmax, server_xmax = _one(conn, query("restore_state"))
        # Counted only for a dry run: the repair itself reports the rows it moved.
        (rows,) = _one(conn, query("repair_count")) if dry_run and reason is not None else (0,)
    except psycopg.Error as exc:
        raise translate(exc, "checking the restored history") from None
    behind = max(0, int(tick_xmax or 0) - int(server_xmax))
    if reason is None:
        return RepairResult(None, behind, 0, False)
    if dry_run:
        return RepairResult(reason, behind, int(rows), False)
    if behind > MAX_ADVANCE:
        raise PgfeedError(
            f"this cluster's transaction ids are {behind:,} behind the restored newest tick's ({tick_xmax}), too "
            f"many to burn here: stop the server and run `pg_resetwal --next-transaction-id={tick_xmax % 2**32 + 1}"
            f" --epoch={tick_xmax >> 32}` on its data directory, start it, and run the repair again"
        )
    try:
        if behind:
            conn.execute(query("set_synchronous_commit_off"))
            conn.execute(query("advance_xids"), (str(tick_xmax),))
            conn.execute(query("reset_synchronous_commit"))
        with conn.transaction():
            (moved,) = _one(conn, query("repair_restamp"))
        (left,) = _one(conn, query("history_break"))
    except psycopg.Error as exc:
        raise translate(exc, "repairing the restored history") from None
    if left is not None:
        raise PgfeedError(f"the repair did not take: {left}")
    return RepairResult(reason, behind, int(moved), True)


def _one(conn: psycopg.Connection[Any], statement: str, params: tuple[Any, ...] = ()) -> tuple[Any, ...]:
    row = tuples(conn, statement, params).fetchone()
    assert row is not None
    return row
