"""Server CPU per tick: what one tick costs the database, statement by statement.

Three connections take turns, ``N`` times: a writer appends rows (1, then 10
per tick) with ``pgfeed.append_v2``; a ticker holding the lease calls
``tick_v2`` (the daemon's statement); a reader calls ``read_live_v4`` from
its known head (a woken reader's one round trip, prefetching the new rows).
Then the ticker calls ``tick_v2`` ``N`` times with nothing new (the check an
active ticker makes between ticks). The ticker's and reader's connections
use generic plans, as pgfeed's do. Each backend's own CPU (utime + stime
from /proc, so the server must run on this machine) is divided by ``N``.
Nothing else runs, so the figures are the statements' cost, not a share of
a busy machine: what the database pays per tick for the ticker and for each
reader process, whatever the host's Python does.
"""

from __future__ import annotations

from typing import Any

import psycopg

from bench import harness as h
from pgfeed.queries import query

BODY = '{"n": 1, "user": "user@example.org", "body": "' + h.BODY + '"}'


def measure(dsn: str, ticks: int, rows_per_tick: int) -> dict[str, float]:
    """Microseconds of server CPU per tick for the writer, ticker and reader
    backends, and per empty check."""
    from pgfeed import admin

    conns = [psycopg.connect(dsn, autocommit=True) for _ in range(3)]
    try:
        writer, ticker, reader = conns
        for c in conns:
            c.prepare_threshold = 0
        for c in (ticker, reader):  # as the ticker's and the readers' connections are set up
            c.execute(query("set_generic_plans"))
        stream = f"tc{rows_per_tick}"
        admin.create_stream(writer, stream)
        row = ticker.execute("SELECT term FROM pgfeed.ticker_claim_v2('bench tickcost', 'daemon', 600000)").fetchone()
        assert row is not None, "the lease is held elsewhere"
        term = int(row[0])
        pids = {name: int(c.info.backend_pid) for name, c in zip(("writer", "ticker", "reader"), conns, strict=True)}
        head = ticker.execute("SELECT max(id) FROM pgfeed.ticks").fetchone()
        known = int(head[0]) if head else 0

        def one() -> None:
            nonlocal known
            for _ in range(rows_per_tick):
                writer.execute("SELECT pgfeed.append_v2(%s, %s::jsonb)", (stream, BODY))
            tick = ticker.execute("SELECT id FROM pgfeed.tick_v2(%s)", (term,)).fetchone()
            assert tick is not None, "no tick after an append"
            reader.execute(
                "SELECT * FROM pgfeed.read_live_v4(%s, %s::text[], %s::bigint[], %s::integer)",
                (known, [stream], [known], 1000),
            ).fetchall()
            known = int(tick[0])

        for _ in range(min(100, ticks)):  # warm up: plans, caches
            one()
        before = {name: h.process_cpu(pid) for name, pid in pids.items()}
        for _ in range(ticks):
            one()
        out = {name: (h.process_cpu(pid) - before[name]) / ticks * 1e6 for name, pid in pids.items()}
        t0 = h.process_cpu(pids["ticker"])
        for _ in range(ticks):
            ticker.execute("SELECT id FROM pgfeed.tick_v2(%s)", (term,)).fetchall()
        out["empty_check"] = (h.process_cpu(pids["ticker"]) - t0) / ticks * 1e6
        ticker.execute("SELECT pgfeed.ticker_resign_v2(%s)", (term,))
        return out
    finally:
        for c in conns:
            c.close()


def run(ctx: h.Ctx) -> h.Section:
    n = ctx.cfg.tickcost_ticks
    sec = h.Section("tickcost", "Server CPU per tick")
    data: dict[str, Any] = {}
    rows = []
    with ctx.server.database("tickcost") as db:
        if h.server_cpu(db.dsn) is None:
            sec.note("Not measured: the server does not run on this machine (/proc cannot see its backends).")
            return sec
        for per_tick in (1, 10):
            got = measure(db.dsn, n, per_tick)
            data[f"{per_tick} rows/tick"] = got
            ctx.log(f"  {per_tick:2} rows/tick: " + ", ".join(f"{k} {v:.0f} us" for k, v in got.items()))
            rows.append(
                [
                    f"{per_tick} row{'s' if per_tick > 1 else ''} a tick",
                    h.fmt(got["writer"] / per_tick),
                    h.fmt(got["ticker"]),
                    h.fmt(got["reader"]),
                    h.fmt(got["empty_check"]),
                ]
            )
    sec.table(
        ["load", "writer: an append, us", "ticker: a tick, us", "a reader's live read, us", "an empty check, us"],
        rows,
    )
    sec.note(
        f"{n} ticks per load, one backend each, nothing else running; server CPU from /proc (utime + stime). "
        "An append includes its commit (fsync on). A reader's read is what each reader process costs the server "
        "per tick it wakes for; an empty check is what an active ticker costs between ticks."
    )
    sec.data = data
    return sec
