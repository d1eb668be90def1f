"""Tick volume: how many ticks a sustained 1,000 rows/s makes, and retention keeping them bounded.

Four paced writer connections append 1,000 rows/s between them for several minutes (6 s with
``--quick``) while the daemon ticks with a short retention: it runs
:func:`pgfeed.daemon.run_daemon` in a process of its own with
``DaemonOptions(retention=10, prune_every=5)`` (``pgfeed daemon --retention``
takes the age, but prunes every 60 s, which the command line does not
change). A sampler reads ``pgfeed.ticks`` (rows kept, newest id) and
``pgfeed.events`` every few seconds. Without retention the ticks table would
hold every tick written; with it, it levels off at about
``(retention + prune_every) x ticks/s``.
"""

from __future__ import annotations

import threading
import time

import psycopg

from bench import harness as h

RATE = 1000.0
#: Connections sharing the 1,000 rows/s schedule: one connection's durable
#: commit takes ~0.7 ms here, so a single one cannot hold 1,000/s once the
#: feed's processes share the 2 cores (the latency benchmark shows that case).
WRITERS = 4


def sample(dsn: str, t0: float) -> dict[str, float]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM pgfeed.ticks), (SELECT coalesce(max(id), 0) FROM pgfeed.ticks),"
            " (SELECT count(*) FROM pgfeed.events)"
        ).fetchone()
    assert row is not None
    return {"t": time.monotonic() - t0, "tick_rows": row[0], "tick_max": row[1], "event_rows": row[2]}


def run(ctx: h.Ctx) -> h.Section:
    from pgfeed import admin

    cfg = ctx.cfg
    retention, every = cfg.volume_retention, cfg.volume_prune_every
    sec = h.Section(
        "ticks",
        f"Tick volume: {cfg.volume_seconds:g} s at 1,000 rows/s, daemon retention {retention:g} s "
        f"(pruning every {every:g} s)",
    )
    samples: list[dict[str, float]] = []
    with ctx.server.database("ticks") as db:
        with psycopg.connect(db.dsn, autocommit=True) as conn:
            admin.create_stream(conn, "vol")
        stop = threading.Event()
        t0 = time.monotonic()
        period = max(1.0, min(10.0, cfg.volume_seconds / 30))

        def sampler() -> None:
            while not stop.wait(period):
                samples.append(sample(db.dsn, t0))

        first = sample(db.dsn, t0)
        thread = threading.Thread(target=sampler, daemon=True)
        with h.Procs() as procs:
            daemon = h.start_daemon(procs, db.dsn, retention=retention, prune_every=every)
            thread.start()
            w = h.run_writers(procs, db.dsn, "append", "vol", RATE, cfg.volume_seconds, WRITERS)
            time.sleep(0.5)
            last = sample(db.dsn, t0)
            stop.set()
            thread.join(15)
            procs.stop(daemon)
    elapsed = last["t"] - first["t"]
    written = int(last["tick_max"] - first["tick_max"])
    kept_max = max(s["tick_rows"] for s in [*samples, last])
    bound = (retention + every) * written / max(1e-9, elapsed)
    sec.table(
        [
            "writer rows/s",
            "ticks written",
            "ticks/s",
            "rows in pgfeed.ticks without retention",
            "with retention: at the end",
            "max seen",
            "events kept at the end (of written)",
        ],
        [
            [
                h.fmt(w["achieved_rate"]),
                f"{written:,}",
                h.fmt(written / max(1e-9, elapsed)),
                f"{written + int(first['tick_rows']):,} (every tick written)",
                f"{int(last['tick_rows']):,}",
                f"{int(kept_max):,}",
                f"{int(last['event_rows']):,} of {w['count']:,}",
            ]
        ],
    )
    series = ", ".join(f"{s['t']:.0f}s: {int(s['tick_rows'])}" for s in samples[:: max(1, len(samples) // 12)])
    sec.note(f"Rows in pgfeed.ticks over time: {series}.")
    # Bounded: at every sample after warm-up the table holds no more rows
    # than the ticks written in the last retention + prune interval (plus
    # one sampling period of slack), whatever the tick rate did meanwhile;
    # without retention it holds every tick written.
    window = retention + every + period
    checked, over = 0, []
    for s in [*samples, last]:
        older = [o for o in [first, *samples] if o["t"] <= s["t"] - window]
        if not older or s["t"] < retention + 2 * every:
            continue
        allowed = s["tick_max"] - older[-1]["tick_max"] + 2
        checked += 1
        if s["tick_rows"] > allowed:
            over.append(f"{s['t']:.0f}s: {int(s['tick_rows'])} > {int(allowed)}")
    bounded = checked > 0 and not over
    sec.note(
        f"Bounded means: at each sample, no more rows than the ticks written in the {window:g} s before it "
        f"(retention + prune interval + sampling period); {checked} samples checked"
        + (f", over at {', '.join(over)}" if over else "")
        + f". At the mean rate that is about {bound:,.0f} rows; pruning runs on a schedule, so the count saws."
    )
    sec.targets.append(
        h.Target(
            "tick volume: retention keeps pgfeed.ticks bounded",
            f"{int(last['tick_rows']):,} rows at the end (max {int(kept_max):,}) of {written:,} ticks written",
            "never more than the ticks of the last retention + prune interval",
            bounded if checked else None,
        )
    )
    sec.data = {"samples": samples, "written": written, "elapsed": elapsed, "writer": w["achieved_rate"]}
    return sec
