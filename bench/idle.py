"""Idle: ``pgfeed daemon`` and 20 reader processes, nothing written.

After every reader has subscribed and a settling pause, nothing is written
for 60 s (5 s with ``--quick``). Reported: ticks written (target 0) and the
load the feed puts on an idle server: top-level statements/s from
``pg_stat_statements`` when the server has it loaded, and transactions/s of
the database from ``pg_stat_database`` (xact_commit + xact_rollback) as the
proxy for queries/s that works everywhere (each of pgfeed's idle queries is
one autocommit statement, so the two agree closely). Target <= 50/s.
"""

from __future__ import annotations

import time

import psycopg

from bench import harness as h

SETTLE = 4.0


def run(ctx: h.Ctx) -> h.Section:
    from pgfeed import admin

    cfg = ctx.cfg
    n = cfg.idle_readers
    sec = h.Section("idle", f"Idle: daemon + {n} readers, nothing written for {cfg.idle_seconds:g} s")
    with ctx.server.database("idle", count_statements=True) as db:
        with psycopg.connect(db.dsn, autocommit=True) as conn:
            admin.create_stream(conn, "idle")
        with h.Procs() as procs:
            daemon = h.start_daemon(procs, db.dsn)
            readers = h.start_readers(procs, db.dsn, "idle", n)
            time.sleep(SETTLE)
            h.reset_statements(db)
            before = h.counters(db)
            time.sleep(cfg.idle_seconds)
            after = h.counters(db)
            top = h.top_statements(db)
            h.stop_readers(procs, readers)
            procs.stop(daemon)
    r = h.rates(before, after)
    sec.table(
        ["seconds", "ticks written", "rows in pgfeed.ticks (before, after)", "statements/s", "transactions/s"],
        [
            [
                h.fmt(r.seconds, 1),
                str(r.ticks),
                f"{before.tick_rows}, {after.tick_rows}",
                h.fmt(r.statements_per_s, 1),
                h.fmt(r.xacts_per_s, 1),
            ]
        ],
    )
    if top:
        sec.table(
            ["most frequent statements (pg_stat_statements)", "calls/s"],
            [[f"`{q.replace('|', '/')}`", h.fmt(c / r.seconds, 2)] for q, c in top],
            align=["---", "---:"],
        )
    else:
        sec.note("pg_stat_statements is not loaded on this server: statements/s is n/a, transactions/s stands in.")
    per_s = r.statements_per_s if r.statements_per_s is not None else r.xacts_per_s
    source = "statements/s" if r.statements_per_s is not None else "transactions/s (proxy)"
    sec.targets.append(h.Target(f"idle: ticks written in {r.seconds:.0f} s", str(r.ticks), "0", r.ticks == 0))
    sec.targets.append(
        h.Target(f"idle: server load from daemon + {n} readers", f"{per_s:.1f} {source}", "<= 50/s", per_s <= 50)
    )
    sec.data = {
        "seconds": r.seconds,
        "ticks": r.ticks,
        "statements_per_s": r.statements_per_s,
        "xacts_per_s": r.xacts_per_s,
        "top": top,
    }
    return sec
