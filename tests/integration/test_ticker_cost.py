"""What the ticker's idle check and a commit token's resolution cost the
server: index probes, never a scan of the events (which made an idle check
take 100-200 ms once a few transactions had appended many rows each, and
could outlast the ticker's statement timeout). Counted with PostgreSQL's
own per-transaction statistics, not timed."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from psycopg import sql
from ticking import take_tick

import pgfeed
from pgfeed import admin

Conn = psycopg.Connection[Any]


def _rows_read(conn: Conn, query: str, params: tuple[Any, ...] = ()) -> tuple[int, list[tuple[Any, ...]]]:
    """Run ``query`` in a read-only transaction; how many event rows it read
    (:func:`_event_rows_read_so_far`)."""
    with conn.transaction():
        found = conn.execute(query, params).fetchall()
        read = _event_rows_read_so_far(conn)
    return read, found


def _event_rows_read_so_far(conn: Conn) -> int:
    """Event rows the current transaction read, by sequential scans and index
    fetches, in every partition."""
    (read,) = conn.execute(
        "SELECT coalesce(sum(seq_tup_read + coalesce(idx_tup_fetch, 0)), 0) FROM pg_stat_xact_user_tables"
        " WHERE schemaname = 'pgfeed' AND relname LIKE 'events%'"
    ).fetchone()  # type: ignore[misc]
    return int(read)


@pytest.mark.parametrize("plans", ["auto", "force_generic_plan"])
def test_idle_check_and_token_resolution_probe_indexes_after_bulk_appends(pgfeed_conn: Conn, plans: str) -> None:
    # Generic plans (what a long-lived session's cached plans become) must not scan either.
    pgfeed_conn.execute(sql.SQL("SET plan_cache_mode = {}").format(sql.Identifier(plans)))
    for name in ("bulk", "other"):
        admin.create_stream(pgfeed_conn, name)
    for _ in range(3):  # a few transactions of many rows each
        with pgfeed_conn.transaction():
            pgfeed.append_many(pgfeed_conn, "bulk", [{"i": i} for i in range(20_000)])
    pgfeed_conn.execute("ANALYZE pgfeed.events")
    take_tick(pgfeed_conn)
    with psycopg.connect(pgfeed_conn.info.dsn) as open_writer:  # running at the next tick: listed in its xip
        pgfeed.append(open_writer, "other", {"late": True})
        take_tick(pgfeed_conn)
        open_writer.commit()
    take_tick(pgfeed_conn)

    read, ticked = _rows_read(pgfeed_conn, "SELECT * FROM pgfeed.tick_v2(0)")
    assert ticked == []  # nothing new: no tick, no term needed
    assert read < 10  # of 60,000

    with psycopg.connect(pgfeed_conn.info.dsn, autocommit=True) as writer:
        with writer.transaction():
            pgfeed.append(writer, "other", {"n": 1})
        token = str(pgfeed.commit_token(writer))
    read, resolved = _rows_read(pgfeed_conn, "SELECT pgfeed.resolve_token_v2(%s)", (token,))
    assert resolved == [(None,)]  # its row waits for the next tick
    assert read < 10  # of 60,000
    take_tick(pgfeed_conn)
    read, resolved = _rows_read(pgfeed_conn, "SELECT pgfeed.resolve_token_v2(%s)", (token,))
    assert resolved[0][0] is not None
    assert read < 10  # of 60,000


@pytest.mark.parametrize("plans", ["auto", "force_generic_plan"])
def test_a_tick_where_the_clusters_identity_is_unknown_probes_indexes(pgfeed_conn: Conn, plans: str) -> None:
    # Where the owner may not read pg_control, ticks have no system_id and
    # every tick asks _history_break_v3 whether the history continues; it
    # counts the rows above the newest tick, which must not mean reading all
    # of them (the ticker's connection forces generic plans).
    pgfeed_conn.execute(sql.SQL("SET plan_cache_mode = {}").format(sql.Identifier(plans)))
    admin.create_stream(pgfeed_conn, "bulk")
    for _ in range(3):
        with pgfeed_conn.transaction():
            pgfeed.append_many(pgfeed_conn, "bulk", [{"i": i} for i in range(20_000)])
    pgfeed_conn.execute("ANALYZE pgfeed.events")
    take_tick(pgfeed_conn)
    pgfeed_conn.execute("UPDATE pgfeed.ticks SET system_id = NULL WHERE id = (SELECT max(id) FROM pgfeed.ticks)")
    pgfeed.append(pgfeed_conn, "bulk", {"late": True})
    for _ in range(2):  # the second with the plan cached by the first
        with pgfeed_conn.transaction():
            pgfeed_conn.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
            pgfeed_conn.execute("SELECT id FROM pgfeed._insert_tick_v2(NULL, pgfeed._seq_now_v2())")
            read = _event_rows_read_so_far(pgfeed_conn)
        assert read < 10  # of 60,001
        pgfeed_conn.execute("UPDATE pgfeed.ticks SET system_id = NULL WHERE id = (SELECT max(id) FROM pgfeed.ticks)")


@pytest.mark.parametrize("plans", ["auto", "force_generic_plan"])
def test_a_woken_readers_read_probes_the_ticks_index(pgfeed_conn: Conn, plans: str) -> None:
    # A reader's one statement per wake-up lists the ticks from its known head
    # on. With "id >= known" alone (0008), statistics gathered while the table
    # was nearly empty made a plan that reads and sorts every tick look
    # cheapest: on PostgreSQL 15 this test read 3,012 tick rows under "auto"
    # (custom plans) before 0009 bounded the range on both sides.
    admin.create_stream(pgfeed_conn, "s")
    pgfeed_conn.execute("ALTER TABLE pgfeed.ticks SET (autovacuum_enabled = off)")  # keep the statistics stale
    pgfeed_conn.execute("ANALYZE pgfeed.ticks")  # of a table with a tick or two
    pgfeed_conn.execute(
        "INSERT INTO pgfeed.ticks (id, snap, taken_at, seq_lo, seq_hi, term, system_id, fp)"
        " SELECT t.id - i, t.snap, t.taken_at, t.seq_lo, t.seq_hi, t.term, t.system_id, t.fp"
        "   FROM (SELECT * FROM pgfeed.ticks ORDER BY id LIMIT 1) t, generate_series(1, 3000) i"
    )  # older copies of the first tick: only the table's size matters here
    known = take_tick(pgfeed_conn).tick
    pgfeed.append(pgfeed_conn, "s", {"n": 1})
    take_tick(pgfeed_conn)
    pgfeed_conn.execute(sql.SQL("SET plan_cache_mode = {}").format(sql.Identifier(plans)))
    for _ in range(2):  # the second with the generic plan cached by the first
        with pgfeed_conn.transaction():
            found = pgfeed_conn.execute(
                "SELECT * FROM pgfeed.read_live_v4(%s, %s::text[], %s::bigint[], %s::integer)",
                (known, ["s"], [known], 100),
            ).fetchall()
            (read,) = pgfeed_conn.execute(
                "SELECT seq_tup_read + coalesce(idx_tup_fetch, 0) FROM pg_stat_xact_user_tables"
                " WHERE schemaname = 'pgfeed' AND relname = 'ticks'"
            ).fetchone()  # type: ignore[misc]
        assert [r[8] for r in found if r[8] is not None] == [{"n": 1}]  # the new row, prefetched
        assert [r[0] for r in found if r[2] is None and r[3] is None] == [known, known + 1]  # the ticks listed
        assert read < 100, read  # of 3,000 and more
