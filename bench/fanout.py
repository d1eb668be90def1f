"""Fan-out: 1, 5 and 20 reader processes on one stream at 1,000 rows/s.

Four paced writer connections share a schedule of 1,000 rows/s (default notify mode) while
``pgfeed daemon`` ticks and N ``AsyncReader`` processes (default options,
so each also campaigns for the ticker lease as ``pgfeed tail`` does) follow
the stream. Reported per case: the writer's achieved rate, ticks/s (new rows
of ``pgfeed.ticks``), the server's transactions/s in that database
(``pg_stat_database`` xact_commit + xact_rollback), top-level statements/s
(``pg_stat_statements``, when loaded), and the readers' lag from append
(the writer's stamp just before its statement) to delivery. Ticks/s must not
grow with the number of readers.
"""

from __future__ import annotations

from typing import Any

import psycopg

from bench import harness as h

RATE = 1000.0
#: Connections sharing the 1,000 rows/s schedule: one connection's durable
#: commit takes ~0.7 ms here, so a single one cannot hold 1,000/s once the
#: feed's processes share the 2 cores (the latency benchmark shows that case).
WRITERS = 4


def run(ctx: h.Ctx) -> h.Section:
    from pgfeed import admin

    cfg = ctx.cfg
    sec = h.Section("fanout", "Fan-out: reader processes on one stream at 1,000 rows/s")
    rows = []
    data: dict[str, Any] = {}
    with ctx.server.database("fanout", count_statements=True) as db:
        with psycopg.connect(db.dsn, autocommit=True) as conn:
            admin.create_stream(conn, "fan")
        for n in cfg.fanout_readers:
            with h.Procs() as procs:
                daemon = h.start_daemon(procs, db.dsn)
                readers = h.start_readers(procs, db.dsn, "fan", n)
                before = h.counters(db)
                w = h.run_writers(procs, db.dsn, "append", "fan", RATE, cfg.fanout_seconds, WRITERS)
                after = h.counters(db)
                drain = h.drain_readers(readers, w["count"], 30)
                got = h.stop_readers(procs, readers)
                procs.stop(daemon)
            r = h.rates(before, after)
            lags = [x / 1000 for g in got for x in g["lags_us"]]
            complete = sum(1 for g in got if g["rows"] == w["count"] and g["duplicates"] == 0)
            data[str(n)] = {
                "writer_rate": w["achieved_rate"],
                "ticks_per_s": r.ticks_per_s,
                "xacts_per_s": r.xacts_per_s,
                "statements_per_s": r.statements_per_s,
                "lag_p50_ms": h.pct(lags, 50),
                "lag_p99_ms": h.pct(lags, 99),
                "drain_s": drain,
                "complete_readers": complete,
            }
            ctx.log(
                f"  {n:>2} readers: writer {w['achieved_rate']:6.0f}/s, {r.ticks_per_s:6.0f} ticks/s, "
                f"{r.xacts_per_s:6.0f} xact/s, lag p50 {h.pct(lags, 50):6.2f} ms"
            )
            rows.append(
                [
                    str(n),
                    h.fmt(w["achieved_rate"]),
                    h.fmt(r.ticks_per_s),
                    h.fmt(r.xacts_per_s),
                    h.fmt(r.statements_per_s),
                    h.fmt(h.pct(lags, 50), 1),
                    h.fmt(h.pct(lags, 99), 1),
                    f"{complete}/{n}",
                ]
            )
    sec.table(
        [
            "readers",
            "writer rows/s (paced at 1,000)",
            "ticks/s",
            "server xact/s",
            "statements/s",
            "lag p50 ms",
            "lag p99 ms",
            "readers with every row once",
        ],
        rows,
    )
    sec.note(
        f"{cfg.fanout_seconds:g} s per case. Server counts are for the benchmark's database only, including the "
        "writer's own transactions (1,000/s)."
    )
    first, last = data[str(cfg.fanout_readers[0])], data[str(cfg.fanout_readers[-1])]
    sec.targets.append(
        h.Target(
            f"fan-out: writer holds 1,000 rows/s with {cfg.fanout_readers[-1]} readers",
            f"{last['writer_rate']:,.0f} rows/s",
            ">= 950 rows/s",
            last["writer_rate"] >= 950,
        )
    )
    sec.targets.append(
        h.Target(
            f"fan-out: ticks/s with {cfg.fanout_readers[-1]} readers vs {cfg.fanout_readers[0]}",
            f"{last['ticks_per_s']:,.0f} vs {first['ticks_per_s']:,.0f}",
            "does not grow with readers (within 20%)",
            last["ticks_per_s"] <= 1.2 * first["ticks_per_s"] + 5,
        )
    )
    sec.data = data
    return sec
