"""A mirror replayed from `pgfeed capture` equals its table (issue 7), against a
real server: several writer threads run random INSERT/UPDATE/DELETE, key
updates, multi-row statements, upserts and multi-statement transactions on two
captured tables (one with a composite key) while ALTER TABLE ADD/DROP/RENAME
COLUMN (the key column too) and TRUNCATE run mid-stream. The delivered events,
replayed in order into a dict, must equal the tables at the end, and per key
the values (drawn from a sequence under the row lock) must only go up."""

from __future__ import annotations

import asyncio
import random
import threading
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
from psycopg import sql
from ticking import take_tick

import pgfeed
from pgfeed import admin

Conn = psycopg.Connection[Any]

ORDERS = 'shop."Orders"'
LINES = "shop.lines"
WRITERS = 4
TRANSACTIONS = 80  # per writer
KEYS = 30

#: Errors a random workload makes on purpose (a key update onto a taken key, a
#: deadlock between multi-row statements, a statement naming a column that was
#: just renamed): the transaction rolls back and the writer goes on. Anything
#: else — a capture error above all — fails the test.
EXPECTED = (psycopg.errors.UniqueViolation, psycopg.errors.DeadlockDetected, psycopg.errors.UndefinedColumn)


@dataclass
class Schema:
    """The column names writers must use now; the DDL thread changes them."""

    key: str = "id"
    note: str = "note"
    lock: threading.Lock = field(default_factory=threading.Lock)

    def now(self) -> tuple[str, str]:
        with self.lock:
            return self.key, self.note


@dataclass
class Progress:
    """Transactions tried so far, for the DDL thread to act mid-stream (no sleeps)."""

    tried: int = 0
    done: int = 0
    cond: threading.Condition = field(default_factory=threading.Condition)

    def step(self) -> None:
        with self.cond:
            self.tried += 1
            self.cond.notify_all()

    def finished(self) -> None:
        with self.cond:
            self.done += 1
            self.cond.notify_all()

    def wait(self, tried: int) -> int:
        with self.cond:
            self.cond.wait_for(lambda: self.tried >= tried or self.done == WRITERS, timeout=120)
            return self.tried


def orders_op(conn: Conn, rnd: random.Random, schema: Schema, counts: dict[str, int]) -> None:
    key, note = schema.now()
    t = sql.SQL(ORDERS)
    k, kk = sql.Identifier(key), sql.Identifier(note)
    a = rnd.randint(1, KEYS)
    op = rnd.choice(["insert", "insert_many", "upsert", "update", "update_many", "key_update", "delete", "delete_many"])
    if op == "insert":
        q = sql.SQL("INSERT INTO {} ({}, v, {}) VALUES (%s, nextval('shop.vals'), 'i') ON CONFLICT DO NOTHING")
        conn.execute(q.format(t, k, kk), (a,))
    elif op == "insert_many":
        q = sql.SQL(
            "INSERT INTO {} ({}, v, qty) SELECT g, nextval('shop.vals'), g FROM generate_series(%s::int, %s::int) g"
            " ON CONFLICT DO NOTHING"
        )
        conn.execute(q.format(t, k), (a, a + rnd.randint(1, 4)))
    elif op == "upsert":
        q = sql.SQL(
            "INSERT INTO {t} AS o ({k}, v, qty) VALUES (%s, nextval('shop.vals'), 1)"
            " ON CONFLICT ({k}) DO UPDATE SET v = nextval('shop.vals'), qty = coalesce(o.qty, 0) + 1"
        )
        conn.execute(q.format(t=t, k=k), (a,))
    elif op == "update":
        q = sql.SQL("UPDATE {} SET v = nextval('shop.vals'), {} = %s WHERE {} = %s")
        conn.execute(q.format(t, kk, k), (f"u{rnd.randint(0, 9)}", a))
    elif op == "update_many":
        q = sql.SQL("UPDATE {} SET v = nextval('shop.vals'), qty = coalesce(qty, 0) + 1 WHERE {} BETWEEN %s AND %s")
        conn.execute(q.format(t, k), (a, a + rnd.randint(1, 5)))
    elif op == "key_update":
        q = sql.SQL("UPDATE {} SET {} = %s, v = nextval('shop.vals') WHERE {} = %s")
        conn.execute(q.format(t, k, k), (rnd.randint(1, KEYS + 10), a))
    elif op == "delete":
        conn.execute(sql.SQL("DELETE FROM {} WHERE {} = %s").format(t, k), (a,))
    else:
        conn.execute(sql.SQL("DELETE FROM {} WHERE {} BETWEEN %s AND %s").format(t, k), (a, a + 2))
    counts[op] = counts.get(op, 0) + 1


def lines_op(conn: Conn, rnd: random.Random, counts: dict[str, int]) -> None:
    o, n = rnd.randint(1, KEYS // 3), rnd.randint(1, 3)
    op = rnd.choice(["l_upsert", "l_insert_many", "l_update", "l_key_update", "l_delete"])
    if op == "l_upsert":
        conn.execute(
            "INSERT INTO shop.lines (order_id, n, v) VALUES (%s, %s, nextval('shop.vals'))"
            " ON CONFLICT (order_id, n) DO UPDATE SET v = nextval('shop.vals')",
            (o, n),
        )
    elif op == "l_insert_many":
        conn.execute(
            "INSERT INTO shop.lines (order_id, n, v) SELECT %s, g, nextval('shop.vals') FROM generate_series(1, 3) g"
            " ON CONFLICT DO NOTHING",
            (o,),
        )
    elif op == "l_update":
        conn.execute("UPDATE shop.lines SET v = nextval('shop.vals') WHERE order_id = %s", (o,))
    elif op == "l_key_update":  # one column of the composite key
        conn.execute(
            "UPDATE shop.lines SET n = %s, v = nextval('shop.vals') WHERE order_id = %s AND n = %s",
            (rnd.randint(1, 3), o, n),
        )
    else:
        conn.execute("DELETE FROM shop.lines WHERE order_id = %s AND n = %s", (o, n))
    counts[op] = counts.get(op, 0) + 1


def writer(dsn: str, seed: int, schema: Schema, progress: Progress, counts: dict[str, int], errors: list[str]) -> None:
    rnd = random.Random(seed)
    try:
        with psycopg.connect(dsn, options="-c deadlock_timeout=20ms") as conn:
            for _ in range(TRANSACTIONS):
                mine: dict[str, int] = {}
                try:
                    for _ in range(rnd.choice([1, 1, 2, 3])):  # multi-statement transactions
                        if rnd.random() < 0.7:
                            orders_op(conn, rnd, schema, mine)
                        else:
                            lines_op(conn, rnd, mine)
                    conn.commit()
                    for op, n in mine.items():
                        counts[op] = counts.get(op, 0) + n
                except EXPECTED:
                    conn.rollback()
                progress.step()
    except BaseException as exc:  # reported by the test
        errors.append(f"writer {seed}: {type(exc).__name__}: {exc}")
    finally:
        progress.finished()


#: (after this many transactions, SQL, how a mirror row of that table changes)
DDL: list[tuple[int, str, str, tuple[str, ...]]] = [
    (30, ORDERS, 'ALTER TABLE shop."Orders" ADD COLUMN extra int DEFAULT 5', ("default", "extra", "5")),
    (70, ORDERS, 'TRUNCATE shop."Orders"', ()),
    (110, ORDERS, 'ALTER TABLE shop."Orders" RENAME COLUMN note TO remark', ("rename", "note", "remark")),
    (150, LINES, "ALTER TABLE shop.lines DROP COLUMN qty", ("drop", "qty")),
    (180, ORDERS, 'ALTER TABLE shop."Orders" RENAME COLUMN id TO order_no', ("rename", "id", "order_no")),
    (210, LINES, "TRUNCATE shop.lines", ()),
    (250, ORDERS, 'ALTER TABLE shop."Orders" DROP COLUMN extra', ("drop", "extra")),
]


def run_ddl(dsn: str, schema: Schema, progress: Progress, at: list[int], errors: list[str]) -> None:
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            for threshold, _, statement, _change in DDL:
                at.append(progress.wait(threshold))
                for _attempt in range(20):  # the DDL's lock can deadlock with a writer's: again
                    try:
                        conn.execute(statement.encode())
                        break
                    except psycopg.errors.DeadlockDetected:
                        continue
                else:
                    raise AssertionError(f"{statement}: deadlocked 20 times")
                with schema.lock:
                    if "RENAME COLUMN id" in statement:
                        schema.key = "order_no"
                    elif "RENAME COLUMN note" in statement:
                        schema.note = "remark"
    except BaseException as exc:
        errors.append(f"ddl: {type(exc).__name__}: {exc}")


async def delivered(dsn: str, stream: str) -> list[pgfeed.Row]:
    async with pgfeed.AsyncReader(dsn, ticker="off") as reader:
        sub = await reader.subscribe(stream, "earliest", until="now")
        return [r async for b in sub for r in b.rows]


def mirror_key(table: str, key: dict[str, Any]) -> tuple[Any, ...]:
    """A key that survives renaming the (single) key column of Orders: the values, by column name."""
    return (table, *(v for _, v in sorted(key.items())))


@dataclass
class Mirror:
    rows: dict[tuple[Any, ...], dict[str, Any]] = field(default_factory=dict)
    seen: dict[str, int] = field(default_factory=dict)

    def apply(self, e: dict[str, Any]) -> None:
        op, table = e["op"], e["table"]
        self.seen[op] = self.seen.get(op, 0) + 1
        if op == "truncate":
            assert set(e) == {"op", "table"}
            for k in [k for k in self.rows if k[0] == table]:
                del self.rows[k]
            return
        k = mirror_key(table, e["key"])
        if op == "insert":
            assert k not in self.rows, ("insert of a key the mirror holds", e)
            self.rows[k] = e["row"]
        elif op == "delete":
            assert k in self.rows, ("delete of a key the mirror lacks", e)
            assert self.rows.pop(k)["v"] == e["row"]["v"], ("delete of another version", e)
        elif "old_key" in e:
            self.seen["key_update"] = self.seen.get("key_update", 0) + 1
            assert e["old_key"] != e["key"]
            old = mirror_key(table, e["old_key"])
            assert old in self.rows, ("key update from a key the mirror lacks", e)
            assert k not in self.rows, ("key update onto a key the mirror holds", e)
            assert e["row"]["v"] > self.rows.pop(old)["v"], ("value went backwards", e)
            self.rows[k] = e["row"]
        else:
            assert k in self.rows, ("update of a key the mirror lacks", e)
            assert e["row"]["v"] > self.rows[k]["v"], ("value went backwards", e)
            self.rows[k] = e["row"]


def reshape(rows: dict[tuple[Any, ...], dict[str, Any]]) -> None:
    """Apply the DDL to the mirror's rows that no event has rewritten since
    (what a consumer does with its own copy when it applies the same migration)."""
    for _, table, _, change in DDL:
        for k, row in rows.items():
            if k[0] != table or not change:
                continue
            if change[0] == "default":
                row.setdefault(change[1], int(change[2]))
            elif change[0] == "rename" and change[1] in row:
                row[change[2]] = row.pop(change[1])
            elif change[0] == "drop":
                row.pop(change[1], None)


def table_rows(conn: Conn) -> dict[tuple[Any, ...], dict[str, Any]]:
    got: dict[tuple[Any, ...], dict[str, Any]] = {}
    for (row,) in conn.execute('SELECT to_jsonb(t) FROM shop."Orders" t').fetchall():
        got[(ORDERS, row["order_no"])] = row
    for (row,) in conn.execute("SELECT to_jsonb(t) FROM shop.lines t").fetchall():
        got[(LINES, row["n"], row["order_id"])] = row
    return got


def run_workload(dsn: str, seed: int) -> None:
    """Writers and the DDL thread, to the end; checks they did what the test needs."""
    schema, progress = Schema(), Progress()
    counts: list[dict[str, int]] = [{} for _ in range(WRITERS)]
    errors: list[str] = []
    at: list[int] = []
    threads = [
        threading.Thread(target=writer, args=(dsn, seed * 100 + i, schema, progress, counts[i], errors))
        for i in range(WRITERS)
    ]
    ddl = threading.Thread(target=run_ddl, args=(dsn, schema, progress, at, errors))
    for t in [*threads, ddl]:
        t.start()
    for t in [*threads, ddl]:
        t.join(300)
        assert not t.is_alive()
    assert errors == []
    assert len(at) == len(DDL)
    assert at[-1] < WRITERS * TRANSACTIONS, f"the DDL must run while writers write: {at}"
    committed: dict[str, int] = {}
    for c in counts:
        for op, n in c.items():
            committed[op] = committed.get(op, 0) + n
    for op in ("insert", "insert_many", "upsert", "update_many", "key_update", "delete_many", "l_key_update"):
        assert committed.get(op, 0) > 0, (op, committed)


def check_mirror(conn: Conn, rows: list[pgfeed.Row]) -> None:
    mirror = Mirror()
    for r in rows:
        assert r.payload["table"] in (ORDERS, LINES)
        mirror.apply(r.payload)
    assert mirror.seen["truncate"] == 2
    assert mirror.seen.get("key_update", 0) > 0
    reshape(mirror.rows)
    table = table_rows(conn)
    assert table, "the workload must leave rows to compare"
    assert mirror.rows == table


@pytest.fixture
def captured(pgfeed_conn: Conn) -> str:
    pgfeed_conn.execute("CREATE SCHEMA shop")
    pgfeed_conn.execute("CREATE SEQUENCE shop.vals")
    pgfeed_conn.execute('CREATE TABLE shop."Orders" (id int PRIMARY KEY, v bigint NOT NULL, note text, qty int)')
    pgfeed_conn.execute(
        "CREATE TABLE shop.lines (order_id int, n int, v bigint NOT NULL, qty int, PRIMARY KEY (order_id, n))"
    )
    admin.create_stream(pgfeed_conn, "mirror")
    admin.capture(pgfeed_conn, "shop", "Orders", "mirror")
    admin.capture(pgfeed_conn, "shop", "lines", "mirror")
    return "mirror"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_mirror_replayed_from_capture_equals_the_tables(
    pgfeed_dsn: str, pgfeed_conn: Conn, captured: str, seed: int
) -> None:
    run_workload(pgfeed_dsn, seed)
    take_tick(pgfeed_conn)
    check_mirror(pgfeed_conn, asyncio.run(delivered(pgfeed_dsn, captured)))


def test_a_mirror_following_live_with_the_embedded_ticker(pgfeed_dsn: str, pgfeed_conn: Conn, captured: str) -> None:
    """The same while a reader follows: its embedded ticker ticks at arbitrary moments."""

    async def follow() -> list[pgfeed.Row]:
        got: list[pgfeed.Row] = []
        async with pgfeed.AsyncReader(pgfeed_dsn) as reader:
            await reader.on(captured, lambda batch: got.extend(batch.rows), since="earliest")
            await asyncio.to_thread(run_workload, pgfeed_dsn, 7)
            with psycopg.connect(pgfeed_dsn, autocommit=True) as conn:
                token = pgfeed.commit_token(conn)
            await reader.wait_for(captured, token, timeout=60)
        return got

    rows = asyncio.run(follow())
    ticks = {r.token.split(".")[0] for r in rows}
    assert len(ticks) > 3, "the ticker must have cut the workload into several ticks"
    check_mirror(pgfeed_conn, rows)
