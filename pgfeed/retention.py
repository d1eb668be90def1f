"""Pruning: delete old events and ticks, and raise each stream's floor."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import psycopg

from pgfeed.errors import UsageError, translate
from pgfeed.execute import tuples
from pgfeed.queries import query


@dataclass(frozen=True)
class PruneResult:
    """What one prune did."""

    floor_tick: int
    ticks_deleted: int
    events_deleted: int
    #: True when a saved consumer position kept the cut earlier than asked.
    held_by_consumers: bool = False


def prune(
    conn: psycopg.Connection[Any],
    older_than_seconds: float,
    *,
    protect_consumers: bool = True,
    dry_run: bool = False,
) -> PruneResult:
    """Delete every event committed before the newest tick older than
    ``older_than_seconds``, and the ticks before it.

    The cut never passes what a saved consumer position still needs unless
    ``protect_consumers`` is False; readers whose position is older than the
    new floor then reset (their ``on_reset`` callbacks fire) instead of
    silently skipping what was deleted. ``dry_run`` only counts.
    """
    if older_than_seconds < 0:
        raise UsageError("the retention must not be negative")
    try:
        with conn.transaction():
            row = tuples(
                conn,
                query("prune"),
                (timedelta(seconds=older_than_seconds), protect_consumers, dry_run),
            ).fetchone()
    except psycopg.Error as exc:
        raise translate(exc, "pruning") from None
    assert row is not None
    return PruneResult(int(row[0]), int(row[1]), int(row[2]), bool(row[3]))
