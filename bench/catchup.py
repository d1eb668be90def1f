"""Catch-up: a fresh reader reading a backlog from "earliest", against a raw scan.

A backlog of N rows (~110 bytes of JSON each) is loaded into a stream in
transactions of 10,000 rows with a tick after each, and the same rows into
a plain table (loading is not measured). Then, in fresh processes and
alternating: an ``AsyncReader`` (default options) subscribes with
``since="earliest", until=<the last tick>`` and takes every batch; the raw
side runs ``SELECT payload FROM bench_plain ORDER BY id`` through a
server-side cursor, 1,000 rows a fetch. Both decode the JSON. Each run checks
it got every row once, in order.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg

from bench import harness as h

CHUNK = 10_000
PAYLOAD_SQL = """
CREATE FUNCTION bench_payload(g bigint) RETURNS jsonb LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object('n', g, 'user', '@user' || (g % 1000) || ':example.org', 'body', repeat('x', 80))
$$
"""


def reader_catchup(dsn: str, stream: str, until: str, expected: int) -> dict[str, Any]:
    from pgfeed import AsyncReader

    async def run() -> dict[str, Any]:
        rows, last, disorder = 0, 0, 0
        async with AsyncReader(dsn) as reader:
            t0 = time.perf_counter()
            async with await reader.subscribe(stream, since="earliest", until=until) as sub:
                async for batch in sub:
                    for row in batch.rows:
                        n = row.payload["n"]
                        disorder += n != last + 1
                        last = n
                    rows += len(batch.rows)
            seconds = time.perf_counter() - t0
        return {"rows": rows, "seconds": seconds, "in_order": disorder == 0 and rows == expected}

    return asyncio.run(run())


def raw_scan(dsn: str, expected: int) -> dict[str, Any]:
    rows, last, disorder = 0, 0, 0
    with psycopg.connect(dsn) as conn:
        t0 = time.perf_counter()
        with conn.cursor(name="scan") as cur:
            cur.execute("SELECT payload FROM bench_plain ORDER BY id")
            while batch := cur.fetchmany(1000):
                for (p,) in batch:
                    n = p["n"]
                    disorder += n != last + 1
                    last = n
                rows += len(batch)
        seconds = time.perf_counter() - t0
        conn.rollback()
    return {"rows": rows, "seconds": seconds, "in_order": disorder == 0 and rows == expected}


def load(db: Any, rows: int) -> str:
    from pgfeed import admin

    with psycopg.connect(db.dsn, autocommit=True) as conn:
        conn.execute("SET synchronous_commit = off")
        conn.execute(PAYLOAD_SQL)
        conn.execute("CREATE TABLE bench_plain (id bigserial PRIMARY KEY, payload jsonb NOT NULL)")
        sid = admin.create_stream(conn, "cu")
        tick = 0
        for lo in range(1, rows + 1, CHUNK):
            hi = min(rows, lo + CHUNK - 1)
            conn.execute(
                "INSERT INTO pgfeed.events (stream_id, payload)"
                " SELECT %s, bench_payload(g) FROM generate_series(%s::bigint, %s::bigint) g ORDER BY g",
                (sid, lo, hi),
            )
            with conn.transaction():
                # A tick, as the ticker takes them (the tests' take_tick).
                conn.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
                row = conn.execute("SELECT id FROM pgfeed._insert_tick_v2(NULL, pgfeed._seq_now_v2())").fetchone()
                assert row is not None
                tick = int(row[0])
        conn.execute(
            "INSERT INTO bench_plain (payload)"
            " SELECT bench_payload(g) FROM generate_series(1, %s::bigint) g ORDER BY g",
            (rows,),
        )
        conn.execute("VACUUM (ANALYZE) pgfeed.events, pgfeed.ticks, bench_plain")
    return str(tick)


def run(ctx: h.Ctx) -> h.Section:
    cfg = ctx.cfg
    n = cfg.catchup_rows
    sec = h.Section("catchup", f"Catch-up: a backlog of {n:,} rows from earliest")
    got: dict[str, list[dict[str, Any]]] = {"raw": [], "pgfeed": []}
    with ctx.server.database("catchup") as db:
        until = load(db, n)
        for _ in range(cfg.catchup_rounds):
            for kind in ("raw", "pgfeed"):
                with h.Procs() as procs:
                    if kind == "raw":
                        child = procs.start("raw scan", raw_scan, db.dsn, n)
                    else:
                        child = procs.start("catch-up reader", reader_catchup, db.dsn, "cu", until, n)
                    r = procs.result(child, 600)
                got[kind].append(r)
                ctx.log(f"  {kind:7} {r['rows']:,} rows in {r['seconds']:.2f} s, in order: {r['in_order']}")
    rate = {k: h.median([r["rows"] / r["seconds"] for r in v]) for k, v in got.items()}
    ok = all(r["in_order"] for v in got.values() for r in v)
    sec.table(
        ["reader", "rows/s", "ratio", "every row once, in order"],
        [
            [
                "raw `SELECT payload FROM bench_plain ORDER BY id` (server-side cursor)",
                h.fmt(rate["raw"]),
                "1",
                "yes" if ok else "no",
            ],
            [
                "`AsyncReader.subscribe(since='earliest', until=...)`",
                h.fmt(rate["pgfeed"]),
                f"{rate['pgfeed'] / rate['raw']:.2f}",
                "yes" if ok else "**no**",
            ],
        ],
    )
    sec.note(
        f"{n // CHUNK} transactions of {CHUNK:,} rows, a tick after each; median of {cfg.catchup_rounds} run(s) "
        "each, alternating."
    )
    sec.targets.append(
        h.Target(
            "catch-up from earliest vs a raw scan",
            f"{rate['pgfeed'] / rate['raw']:.2f}x",
            "report (the previous release's goal was >= 0.5x)",
            None,
        )
    )
    if not ok:
        raise RuntimeError(f"catch-up read the wrong rows: {got}")
    sec.data = {"runs": got, "rows_per_s": rate}
    return sec
