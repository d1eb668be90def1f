"""Writing from any driver: plain SQL, inside the application's own transaction.

``SELECT pgfeed.append(stream, payload::jsonb, key)`` appends; ``SELECT
pgfeed.commit_token()`` inside the same transaction is its read-your-writes
token, valid once the transaction commits. These are the README's examples for
psycopg2, SQLAlchemy Core and Django, run against the real server.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from helpers import DJANGO_SETTINGS
from psycopg import conninfo as pg_conninfo

import pgfeed
from pgfeed import admin


@pytest.fixture
def stream(pgfeed_conn: psycopg.Connection[Any]) -> str:
    admin.create_stream(pgfeed_conn, "orders")
    pgfeed_conn.execute("CREATE TABLE shop_orders (id int PRIMARY KEY, status text NOT NULL)")
    pgfeed_conn.execute("INSERT INTO shop_orders VALUES (42, 'new')")
    return "orders"


@pytest.fixture
def reader(pgfeed_dsn: str, stream: str) -> Iterator[tuple[pgfeed.Reader, list[pgfeed.Row]]]:
    """A threaded reader following ``stream`` from now, and the rows it delivered."""
    rows: list[pgfeed.Row] = []
    with pgfeed.Reader(pgfeed_dsn) as r:
        r.on(stream, lambda batch: rows.extend(batch.rows), since="now")
        yield r, rows


def test_psycopg2(
    pgfeed_dsn: str, stream: str, reader: tuple[pgfeed.Reader, list[pgfeed.Row]], pgfeed_conn: psycopg.Connection[Any]
) -> None:
    import psycopg2

    r, rows = reader
    conn = psycopg2.connect(pgfeed_dsn)
    try:
        # A rolled-back transaction appends nothing.
        with conn.cursor() as cur:
            cur.execute("SELECT pgfeed.append(%s, %s::jsonb, %s)", (stream, json.dumps({"id": "rolled back"}), None))
        conn.rollback()
        # The README's example.
        with conn, conn.cursor() as cur:  # psycopg2: `with conn` commits the transaction
            cur.execute("UPDATE shop_orders SET status = 'paid' WHERE id = %s", (42,))
            cur.execute("SELECT pgfeed.append(%s, %s::jsonb, %s)", (stream, json.dumps({"id": 42}), "42"))
            cur.execute("SELECT pgfeed.commit_token()")
            (token,) = cur.fetchone()
    finally:
        conn.close()
    assert token.startswith("x")
    r.wait_for(stream, token, timeout=15)
    assert [(row.payload, row.key) for row in rows] == [({"id": 42}, "42")]
    assert pgfeed_conn.execute("SELECT status FROM shop_orders WHERE id = 42").fetchone() == ("paid",)


@pytest.mark.parametrize("driver", ["psycopg2", "psycopg"])
def test_sqlalchemy_core(
    pgfeed_dsn: str, stream: str, reader: tuple[pgfeed.Reader, list[pgfeed.Row]], driver: str
) -> None:
    import sqlalchemy as sa

    r, rows = reader
    params = pg_conninfo.conninfo_to_dict(pgfeed_dsn)
    url = sa.URL.create(
        f"postgresql+{driver}",
        username=str(params.get("user") or "") or None,
        password=str(params.get("password") or "") or None,
        host=str(params.get("host") or "") or None,
        port=int(params["port"]) if params.get("port") else None,
        database=str(params.get("dbname") or "") or None,
    )
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:  # one transaction, committed at the end of the block
            conn.execute(
                sa.text("SELECT pgfeed.append(:stream, CAST(:payload AS jsonb), :key)"),
                {"stream": stream, "payload": json.dumps({"id": driver}), "key": None},
            )
            token = conn.execute(sa.text("SELECT pgfeed.commit_token()")).scalar_one()
    finally:
        engine.dispose()
    r.wait_for(stream, token, timeout=15)
    assert [row.payload for row in rows] == [{"id": driver}]


#: Django wants its settings once per process: the example runs in a process of its own.
DJANGO_APP = (
    "import sys\ndsn = sys.argv[1]\n"
    + DJANGO_SETTINGS
    + """
import json
from django.db import connection, transaction

with transaction.atomic():
    with connection.cursor() as cur:
        cur.execute("SELECT pgfeed.append(%s, %s::jsonb, %s)", ["orders", json.dumps({"id": "django"}), "d"])
        cur.execute("SELECT pgfeed.commit_token()")
        token = cur.fetchone()[0]
print(token)
"""
)


def test_django_connection(pgfeed_dsn: str, stream: str, reader: tuple[pgfeed.Reader, list[pgfeed.Row]]) -> None:
    r, rows = reader
    out = subprocess.run(
        [sys.executable, "-c", DJANGO_APP, pgfeed_dsn],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    assert token.startswith("x")
    r.wait_for(stream, token, timeout=15)
    assert [(row.payload, row.key) for row in rows] == [({"id": "django"}, "d")]


def test_a_token_taken_after_commit_in_sql_covers_writes_made_without_pgfeed(
    pgfeed_dsn: str, stream: str, reader: tuple[pgfeed.Reader, list[pgfeed.Row]]
) -> None:
    """After COMMIT, in a session that appended through SQL, commit_token() is a
    snapshot token: still enough for read-your-writes."""
    import psycopg2

    r, rows = reader
    conn = psycopg2.connect(pgfeed_dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pgfeed.append(%s, %s::jsonb)", (stream, json.dumps({"id": "autocommit"})))
            cur.execute("SELECT pgfeed.commit_token()")
            (token,) = cur.fetchone()
    finally:
        conn.close()
    assert token.startswith("s")
    r.wait_for(stream, token, timeout=15)
    assert [row.payload for row in rows] == [{"id": "autocommit"}]
