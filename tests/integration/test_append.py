"""Appending: SQL, Python (sync and async), CLI; payload rules; wake-ups. All against a real server."""

import json
from collections.abc import Callable, Iterator
from contextlib import suppress
from typing import Any

import psycopg
import pytest
from click.testing import Result
from helpers import one_line_error
from psycopg.rows import dict_row

import pgfeed
from pgfeed import admin
from pgfeed.errors import InvalidStreamName, PayloadError, UnknownStream, UsageError

Run = Callable[..., Result]
Conn = psycopg.Connection[Any]
LIMIT = 1048576

#: One of each kind of JSON value: every one is a valid payload.
JSON_VALUES = ['{"id": 1}', "[1, 2, 3]", '"text"', "42", "3.5", "-0.0", "true", "false", "null", "{}", "[]", '""']


@pytest.fixture
def orders(pgfeed_conn: Conn) -> int:
    """Stream ``orders`` with the default limit and notify mode; its id."""
    return admin.create_stream(pgfeed_conn, "orders")


class CallerFailed(Exception):
    """Raised inside a transaction block to make psycopg roll it back."""


def rows(conn: Conn, stream: str = "orders") -> list[tuple[Any, ...]]:
    """(payload, key, xid) of a stream's rows in append order."""
    return conn.execute(
        "SELECT e.payload, e.key, e.xid::text FROM pgfeed.events e JOIN pgfeed.streams s ON s.id = e.stream_id"
        " WHERE s.name = %s ORDER BY e.seq",
        (stream,),
    ).fetchall()


def payloads(conn: Conn, stream: str = "orders") -> list[Any]:
    return [r[0] for r in rows(conn, stream)]


def xid_groups(conn: Conn, stream: str = "orders") -> list[int]:
    """How many rows each transaction wrote, in append order."""
    sizes: list[int] = []
    last = None
    for _, _, xid in rows(conn, stream):
        if xid != last:
            sizes.append(0)
            last = xid
        sizes[-1] += 1
    return sizes


def padded(conn: Conn, size: int) -> dict[str, str]:
    """A payload whose ``pg_column_size`` as jsonb is exactly ``size``."""
    n = size
    for _ in range(5):
        value = {"pad": "x" * n}
        row = conn.execute("SELECT pg_column_size(%s::jsonb)", (json.dumps(value),)).fetchone()
        assert row is not None
        if row[0] == size:
            return value
        n += size - row[0]
    raise AssertionError(f"cannot build a payload of {size} bytes")


# -- SQL ------------------------------------------------------------------------


def test_sql_append_exists_iff_the_transaction_commits(pgfeed_dsn: str, pgfeed_conn: Conn, orders: int) -> None:
    with psycopg.connect(pgfeed_dsn) as conn:  # not autocommit: a transaction opens at the first statement
        seq = conn.execute("""SELECT pgfeed.append('orders', '{"id": 1}'::jsonb)""").fetchone()
        assert seq is not None
        assert isinstance(seq[0], int)
        assert payloads(pgfeed_conn) == []  # not visible to others before commit
        conn.rollback()
        assert payloads(pgfeed_conn) == []

        conn.execute("""SELECT pgfeed.append('orders', '{"id": 2}'::jsonb)""")
        conn.commit()
        assert payloads(pgfeed_conn) == [{"id": 2}]

        conn.execute("""SELECT pgfeed.append('orders', '{"id": 3}'::jsonb)""")
        conn.execute("SAVEPOINT s")
        conn.execute("""SELECT pgfeed.append('orders', '{"id": 4}'::jsonb)""")
        conn.execute("ROLLBACK TO SAVEPOINT s")
        conn.execute("""SELECT pgfeed.append('orders', '{"id": 5}'::jsonb, 'k5')""")
        conn.commit()
    assert payloads(pgfeed_conn) == [{"id": 2}, {"id": 3}, {"id": 5}]
    assert [r[1] for r in rows(pgfeed_conn)] == [None, None, "k5"]
    assert xid_groups(pgfeed_conn) == [1, 2]


def test_sql_append_records_xid_and_time(pgfeed_conn: Conn, orders: int) -> None:
    with pgfeed_conn.transaction():
        pgfeed_conn.execute("SELECT pgfeed.append('orders', '1'::jsonb)")
        xid = pgfeed_conn.execute("SELECT pg_current_xact_id()::text, now()").fetchone()
    assert xid is not None
    row = pgfeed_conn.execute("SELECT xid::text, created_at, stream_id FROM pgfeed.events").fetchone()
    assert row == (xid[0], xid[1], orders)


def test_sql_unknown_stream_names_the_stream(pgfeed_conn: Conn, orders: int) -> None:
    for query in (
        "SELECT pgfeed.append('nosuch', '1'::jsonb)",
        "SELECT pgfeed.append_many('nosuch', ARRAY['1'::jsonb])",
        "SELECT pgfeed.append_v1('nosuch', '1'::jsonb)",
        "SELECT pgfeed.append_many_v1('nosuch', ARRAY['1'::jsonb])",
    ):
        with pytest.raises(psycopg.errors.UndefinedObject, match="nosuch"):
            pgfeed_conn.execute(query)
    assert pgfeed_conn.execute("SELECT count(*) FROM pgfeed.events").fetchone() == (0,)


def test_sql_append_many(pgfeed_conn: Conn, orders: int) -> None:
    with pgfeed_conn.transaction():
        n = pgfeed_conn.execute(
            """SELECT pgfeed.append_many('orders', ARRAY['{"i": 1}', '{"i": 2}', '{"i": 3}']::jsonb[])"""
        ).fetchone()
        m = pgfeed_conn.execute(
            "SELECT pgfeed.append_many('orders', ARRAY['4', '5']::jsonb[], ARRAY['a', NULL])"
        ).fetchone()
    assert n == (3,)
    assert m == (2,)
    assert payloads(pgfeed_conn) == [{"i": 1}, {"i": 2}, {"i": 3}, 4, 5]
    assert [r[1] for r in rows(pgfeed_conn)] == [None, None, None, "a", None]
    assert xid_groups(pgfeed_conn) == [5]
    assert pgfeed_conn.execute("SELECT pgfeed.append_many('orders', '{}'::jsonb[])").fetchone() == (0,)
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="2 keys given for 1 payloads"):
        pgfeed_conn.execute("SELECT pgfeed.append_many('orders', ARRAY['1']::jsonb[], ARRAY['a', 'b'])")
    assert len(payloads(pgfeed_conn)) == 5


def test_sql_append_many_rolls_back_with_the_caller(pgfeed_conn: Conn, orders: int) -> None:
    with suppress(CallerFailed), pgfeed_conn.transaction():
        pgfeed_conn.execute("SELECT pgfeed.append_many('orders', ARRAY['1', '2']::jsonb[])")
        raise CallerFailed
    assert payloads(pgfeed_conn) == []


def test_sql_accepts_any_json_value(pgfeed_conn: Conn, orders: int) -> None:
    for value in JSON_VALUES:
        pgfeed_conn.execute("SELECT pgfeed.append('orders', %s::jsonb)", (value,))
        pgfeed_conn.execute("SELECT pgfeed.append_many('orders', ARRAY[%s::jsonb])", (value,))
    assert payloads(pgfeed_conn) == [json.loads(v) for v in JSON_VALUES for _ in range(2)]


def test_sql_null_payload_is_refused(pgfeed_conn: Conn, orders: int) -> None:
    with pytest.raises(psycopg.errors.NullValueNotAllowed, match="SQL NULL"):
        pgfeed_conn.execute("SELECT pgfeed.append('orders', NULL)")
    with pytest.raises(psycopg.errors.NullValueNotAllowed, match="payload 2 of 3"):
        pgfeed_conn.execute("SELECT pgfeed.append_many('orders', ARRAY['1'::jsonb, NULL, '3'::jsonb])")
    with pytest.raises(psycopg.errors.NullValueNotAllowed, match="SQL NULL"):
        pgfeed_conn.execute("SELECT pgfeed.append_many('orders', NULL)")
    assert payloads(pgfeed_conn) == []
    # JSON null is a value, not SQL NULL.
    pgfeed_conn.execute("SELECT pgfeed.append('orders', 'null'::jsonb)")
    assert payloads(pgfeed_conn) == [None]
    assert pgfeed_conn.execute("SELECT payload IS NULL FROM pgfeed.events").fetchone() == (False,)


# -- payload size -----------------------------------------------------------------


def test_default_limit_is_one_mebibyte_of_jsonb(pgfeed_conn: Conn, orders: int) -> None:
    at_limit = padded(pgfeed_conn, LIMIT)
    over = padded(pgfeed_conn, LIMIT + 1)
    assert pgfeed.append(pgfeed_conn, "orders", at_limit) > 0
    with pytest.raises(PayloadError) as err:
        pgfeed.append(pgfeed_conn, "orders", over)
    assert str(err.value) == f"payload of {LIMIT + 1} bytes exceeds the limit of {LIMIT} bytes for stream 'orders'"
    with pytest.raises(psycopg.errors.ProgramLimitExceeded, match=f"{LIMIT + 1} bytes exceeds the limit of {LIMIT}"):
        pgfeed_conn.execute("SELECT pgfeed.append('orders', %s::jsonb)", (json.dumps(over),))
    assert len(payloads(pgfeed_conn)) == 1


def test_append_many_refuses_the_whole_call_for_one_oversize_payload(pgfeed_conn: Conn) -> None:
    admin.create_stream(pgfeed_conn, "small", max_payload_bytes=100)
    ok = padded(pgfeed_conn, 100)
    big = padded(pgfeed_conn, 101)
    with pytest.raises(PayloadError, match=r"payload 3 of 4 \(101 bytes\) exceeds the limit of 100 bytes"):
        pgfeed.append_many(pgfeed_conn, "small", [ok, ok, big, ok])
    with pgfeed_conn.transaction():
        pgfeed.append(pgfeed_conn, "small", ok)
        savepoint_failed = False
        try:
            with pgfeed_conn.transaction():
                pgfeed.append_many(pgfeed_conn, "small", [ok, big])
        except PayloadError:
            savepoint_failed = True
        assert savepoint_failed
    assert payloads(pgfeed_conn, "small") == [ok]


def test_append_and_append_many_measure_alike(pgfeed_conn: Conn) -> None:
    # 127-131 bytes: where an array element switches from a 1-byte to a 4-byte header.
    for limit in [60, 126, 127, 128, 129, 130, 131, 300]:
        stream = f"small_{limit}"
        admin.create_stream(pgfeed_conn, stream, max_payload_bytes=limit)
        fits = padded(pgfeed_conn, limit)
        over = padded(pgfeed_conn, limit + 1)
        pgfeed.append(pgfeed_conn, stream, fits)
        pgfeed.append_many(pgfeed_conn, stream, [fits, fits])
        with pytest.raises(PayloadError, match=f"payload of {limit + 1} bytes"):
            pgfeed.append(pgfeed_conn, stream, over)
        with pytest.raises(PayloadError, match=f"payload 2 of 2 \\({limit + 1} bytes\\)"):
            pgfeed.append_many(pgfeed_conn, stream, [fits, over])
        assert len(payloads(pgfeed_conn, stream)) == 3


def test_a_refused_payload_aborts_the_callers_transaction(pgfeed_conn: Conn) -> None:
    admin.create_stream(pgfeed_conn, "small", max_payload_bytes=100)
    big = padded(pgfeed_conn, 200)

    def append_both() -> None:
        with pgfeed_conn.transaction():
            pgfeed.append(pgfeed_conn, "small", {"fits": True})
            pgfeed.append(pgfeed_conn, "small", big)

    with pytest.raises(PayloadError):
        append_both()
    assert payloads(pgfeed_conn, "small") == []


def test_per_stream_limit_through_the_cli(pgfeed_cmd: Run, pgfeed_conn: Conn) -> None:
    assert pgfeed_cmd("stream", "create", "small", "--max-payload-bytes", "100").exit_code == 0
    ok = json.dumps(padded(pgfeed_conn, 100))
    big = json.dumps(padded(pgfeed_conn, 101))
    assert pgfeed_cmd("append", "small", ok).exit_code == 0
    refused = pgfeed_cmd("append", "small", big)
    assert refused.exit_code == 1  # well-formed, refused by the server
    line = one_line_error(refused)
    assert "101 bytes" in line
    assert "limit of 100 bytes" in line
    assert "'small'" in line
    assert payloads(pgfeed_conn, "small") == [json.loads(ok)]


# -- Python, sync -----------------------------------------------------------------


def test_python_append_in_the_callers_transaction(pgfeed_dsn: str, pgfeed_conn: Conn, orders: int) -> None:
    with psycopg.connect(pgfeed_dsn) as conn:
        seq = pgfeed.append(conn, "orders", {"id": 1})
        assert isinstance(seq, int)
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS  # nothing committed for us
        assert payloads(pgfeed_conn) == []
        conn.rollback()
        assert payloads(pgfeed_conn) == []
        second = pgfeed.append(conn, "orders", {"id": 2}, key="k")
        assert second > seq
        conn.commit()
    assert rows(pgfeed_conn)[0][:2] == ({"id": 2}, "k")


def test_python_append_with_autocommit_and_savepoints(pgfeed_conn: Conn, orders: int) -> None:
    with pgfeed_conn.transaction():
        pgfeed.append(pgfeed_conn, "orders", 1)
        with suppress(CallerFailed), pgfeed_conn.transaction():  # a savepoint
            pgfeed.append(pgfeed_conn, "orders", 2)
            raise CallerFailed
        pgfeed.append(pgfeed_conn, "orders", 3)
    pgfeed.append(pgfeed_conn, "orders", 4)  # autocommit: its own transaction
    assert payloads(pgfeed_conn) == [1, 3, 4]
    assert xid_groups(pgfeed_conn) == [2, 1]


def test_python_unknown_stream_aborts_the_transaction(pgfeed_conn: Conn, orders: int) -> None:
    def append_both() -> None:
        with pgfeed_conn.transaction():
            pgfeed.append(pgfeed_conn, "orders", 1)
            pgfeed.append(pgfeed_conn, "nosuch", 2)

    with pytest.raises(UnknownStream, match="'nosuch'"):
        append_both()
    assert payloads(pgfeed_conn) == []
    with pytest.raises(UnknownStream, match="'nosuch'"):
        pgfeed.append_many(pgfeed_conn, "nosuch", [1])


PYTHON_JSON = [json.loads(v) for v in JSON_VALUES] + [None, 10**30, -(2**70), "ünïcødé ✓", {"n": {"e": [{}]}}]
NOT_JSON = [float("nan"), float("inf"), {"x": object()}, {1j: 2}, b"bytes", "\ud800", {1, 2}]


def test_python_accepts_any_json_value(pgfeed_conn: Conn, orders: int) -> None:
    for value in PYTHON_JSON:
        pgfeed.append(pgfeed_conn, "orders", value)
        pgfeed.append_many(pgfeed_conn, "orders", [value])
    assert payloads(pgfeed_conn) == [v for v in PYTHON_JSON for _ in range(2)]


def test_python_refuses_what_is_not_json(pgfeed_conn: Conn, orders: int) -> None:
    for value in NOT_JSON:
        with pytest.raises(PayloadError, match="not JSON"):
            pgfeed.append(pgfeed_conn, "orders", value)
        with pytest.raises(PayloadError, match="not JSON"):
            pgfeed.append_many(pgfeed_conn, "orders", [1, value])
    assert payloads(pgfeed_conn) == []


def test_python_payload_the_server_cannot_store(pgfeed_conn: Conn, orders: int) -> None:
    with pytest.raises(PayloadError, match="cannot store"):
        pgfeed.append(pgfeed_conn, "orders", {"nul": "a\x00b"})
    assert payloads(pgfeed_conn) == []


def test_python_bad_arguments_fail_before_the_server(pgfeed_conn: Conn, orders: int) -> None:
    with pytest.raises(InvalidStreamName):
        pgfeed.append(pgfeed_conn, "Orders", 1)
    with pytest.raises(InvalidStreamName):
        pgfeed.append_many(pgfeed_conn, "x; DROP TABLE pgfeed.streams", [1])
    with pytest.raises(UsageError, match="invalid key"):
        pgfeed.append(pgfeed_conn, "orders", 1, key=5)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="2 keys given for 1 payloads"):
        pgfeed.append_many(pgfeed_conn, "orders", [1], ["a", "b"])
    with pytest.raises(UsageError, match="sequence"):
        pgfeed.append_many(pgfeed_conn, "orders", "abc")
    assert payloads(pgfeed_conn) == []


def test_python_append_many(pgfeed_conn: Conn, orders: int) -> None:
    with pgfeed_conn.transaction():
        assert pgfeed.append_many(pgfeed_conn, "orders", [{"i": i} for i in range(500)]) == 500
        assert pgfeed.append_many(pgfeed_conn, "orders", ["a", "b"], keys=["ka", None]) == 2
        assert pgfeed.append_many(pgfeed_conn, "orders", []) == 0
    got = rows(pgfeed_conn)
    assert [r[0] for r in got] == [{"i": i} for i in range(500)] + ["a", "b"]
    assert [r[1] for r in got[-2:]] == ["ka", None]
    assert xid_groups(pgfeed_conn) == [502]


def test_invalidate(pgfeed_conn: Conn) -> None:
    with pgfeed_conn.transaction():
        pgfeed.invalidate(pgfeed_conn, "cache", ["k1", "k2"])
        pgfeed.invalidate(pgfeed_conn, "cache", None)
    got = rows(pgfeed_conn, "caches")
    assert [(r[0], r[1]) for r in got] == [
        ({"cache": "cache", "keys": ["k1", "k2"]}, "cache"),
        ({"cache": "cache", "keys": None}, "cache"),
    ]
    with pytest.raises(UsageError, match="sequence of strings"):
        pgfeed.invalidate(pgfeed_conn, "cache", "k1")
    with pytest.raises(UsageError, match="cache name"):
        pgfeed.invalidate(pgfeed_conn, "", ["k"])
    with suppress(CallerFailed), pgfeed_conn.transaction():
        pgfeed.invalidate(pgfeed_conn, "cache", ["k3"])
        raise CallerFailed
    assert len(rows(pgfeed_conn, "caches")) == 2


# -- Python, async ----------------------------------------------------------------


async def test_async_append_in_the_callers_transaction(pgfeed_dsn: str, pgfeed_conn: Conn, orders: int) -> None:
    async with await psycopg.AsyncConnection.connect(pgfeed_dsn) as conn:
        seq = await pgfeed.append(conn, "orders", {"id": 1})
        assert isinstance(seq, int)
        assert payloads(pgfeed_conn) == []
        await conn.rollback()
        await pgfeed.append(conn, "orders", {"id": 2}, key="k")
        assert await pgfeed.append_many(conn, "orders", [{"id": 3}, {"id": 4}]) == 2
        await pgfeed.invalidate(conn, "users", ["u1"])
        await pgfeed.invalidate(conn, "users", None)
        assert payloads(pgfeed_conn) == []
        await conn.commit()
    assert payloads(pgfeed_conn) == [{"id": 2}, {"id": 3}, {"id": 4}]
    assert xid_groups(pgfeed_conn) == [3]
    assert payloads(pgfeed_conn, "caches") == [{"cache": "users", "keys": ["u1"]}, {"cache": "users", "keys": None}]


async def test_async_errors(pgfeed_dsn: str, pgfeed_conn: Conn, orders: int) -> None:
    async with await psycopg.AsyncConnection.connect(pgfeed_dsn, autocommit=True) as conn:
        with pytest.raises(UnknownStream, match="'nosuch'"):
            await pgfeed.append(conn, "nosuch", 1)
        with pytest.raises(PayloadError):
            await pgfeed.append(conn, "orders", float("nan"))
        with suppress(CallerFailed):
            async with conn.transaction():
                await pgfeed.append(conn, "orders", 1)
                raise CallerFailed
        async with conn.transaction():
            await pgfeed.append(conn, "orders", 2)
    assert payloads(pgfeed_conn) == [2]


def test_writer_refuses_other_objects() -> None:
    with pytest.raises(UsageError, match="psycopg Connection"):
        pgfeed.append(object(), "orders", 1)  # type: ignore[call-overload]


# -- CLI ----------------------------------------------------------------------


def test_cli_append_one_value(pgfeed_cmd: Run, pgfeed_conn: Conn, orders: int) -> None:
    result = pgfeed_cmd("append", "orders", '{"id": 1}')
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("s")  # a commit token taken after its transaction committed
    assert pgfeed.CommitToken.parse(result.stdout.strip()) is not None
    assert pgfeed_cmd("append", "orders", "null", "--key", "k").exit_code == 0
    assert rows(pgfeed_conn)[0][:2] == ({"id": 1}, None)
    assert rows(pgfeed_conn)[1][:2] == (None, "k")


def test_cli_accepts_any_json_value(pgfeed_cmd: Run, pgfeed_conn: Conn, orders: int) -> None:
    for value in JSON_VALUES:
        assert pgfeed_cmd("append", "orders", "--", value).exit_code == 0  # -- lets "-0.0" through as JSON
    result = pgfeed_cmd("append", "orders", "-", "--batch", "5", input="\n".join(JSON_VALUES))
    assert result.exit_code == 0, result.output
    assert payloads(pgfeed_conn) == [json.loads(v) for v in JSON_VALUES] * 2


def test_cli_refuses_invalid_json_argument(pgfeed_cmd: Run, pgfeed_conn: Conn, orders: int) -> None:
    for value in ["{", "{'id': 1}", "", "NaN", "[Infinity]", "-Infinity", "1 2", "[1,]", "[" * 100000]:
        result = pgfeed_cmd("append", "orders", "--", value)
        assert result.exit_code == 2, (value, result.output)
        assert "invalid JSON" in one_line_error(result)
    assert payloads(pgfeed_conn) == []


def test_cli_unknown_stream_and_bad_name(pgfeed_cmd: Run, pgfeed_conn: Conn) -> None:
    unknown = pgfeed_cmd("append", "nosuch", "1")
    assert unknown.exit_code == 1
    assert "'nosuch'" in one_line_error(unknown)
    unknown_stdin = pgfeed_cmd("append", "nosuch", "-", input="1\n")
    assert "'nosuch'" in one_line_error(unknown_stdin)
    bad = pgfeed_cmd("append", "No-Such", "1")
    assert bad.exit_code == 2
    assert "stream name" in one_line_error(bad)
    assert pgfeed_conn.execute("SELECT count(*) FROM pgfeed.events").fetchone() == (0,)


def test_cli_stdin_one_transaction_per_line(pgfeed_cmd: Run, pgfeed_conn: Conn, orders: int) -> None:
    result = pgfeed_cmd("append", "orders", "-", "--key", "k", input='{"n": 1}\n{"n": 2}\n\n  \n{"n": 3}\r\n')
    assert result.exit_code == 0, result.output
    assert result.stdout == "appended 3 rows\n"
    assert payloads(pgfeed_conn) == [{"n": 1}, {"n": 2}, {"n": 3}]
    assert [r[1] for r in rows(pgfeed_conn)] == ["k"] * 3
    assert xid_groups(pgfeed_conn) == [1, 1, 1]


def test_cli_stdin_batches(pgfeed_cmd: Run, pgfeed_conn: Conn, orders: int) -> None:
    lines = "".join(f'{{"n": {i}}}\n' for i in range(1, 6))
    result = pgfeed_cmd("append", "orders", "-", "--batch", "2", input=lines)
    assert result.exit_code == 0, result.output
    assert result.stdout == "appended 5 rows\n"
    assert payloads(pgfeed_conn) == [{"n": i} for i in range(1, 6)]
    assert xid_groups(pgfeed_conn) == [2, 2, 1]
    assert {r[1] for r in rows(pgfeed_conn)} == {None}
    keyed = pgfeed_cmd("append", "orders", "-", "--batch", "2", "--key", "", input="6\n7\n")
    assert keyed.exit_code == 0, keyed.output
    assert [r[1] for r in rows(pgfeed_conn)][-2:] == ["", ""]


def test_cli_stdin_empty(pgfeed_cmd: Run, pgfeed_conn: Conn, orders: int) -> None:
    result = pgfeed_cmd("append", "orders", "-", input="")
    assert result.exit_code == 0, result.output
    assert result.stdout == "appended 0 rows\n"


def test_cli_stdin_invalid_line_one_per_transaction(pgfeed_cmd: Run, pgfeed_conn: Conn, orders: int) -> None:
    result = pgfeed_cmd("append", "orders", "-", input='{"n": 1}\n{"n": 2}\n{"n": \n{"n": 4}\n')
    assert result.exit_code == 2
    line = one_line_error(result)
    assert "invalid JSON on line 3" in line
    assert "2 rows committed before line 3; nothing from line 3 on was written" in line
    assert result.stdout == ""
    assert payloads(pgfeed_conn) == [{"n": 1}, {"n": 2}]


def test_cli_stdin_invalid_line_in_a_batch(pgfeed_cmd: Run, pgfeed_conn: Conn, orders: int) -> None:
    result = pgfeed_cmd("append", "orders", "-", "--batch", "3", input="1\n2\n3\n4\n\nNaN\n7\n")
    assert result.exit_code == 2
    line = one_line_error(result)
    assert "invalid JSON on line 6: NaN is not JSON" in line
    assert "3 rows committed before line 4; nothing from line 4 on was written" in line
    assert payloads(pgfeed_conn) == [1, 2, 3]


def test_cli_stdin_line_refused_by_the_server(pgfeed_cmd: Run, pgfeed_conn: Conn) -> None:
    admin.create_stream(pgfeed_conn, "small", max_payload_bytes=100)
    ok = json.dumps(padded(pgfeed_conn, 50))
    big = json.dumps(padded(pgfeed_conn, 150))
    result = pgfeed_cmd("append", "small", "-", input=f"{ok}\n{big}\n{ok}\n")
    assert result.exit_code == 1
    line = one_line_error(result)
    assert "line 2: payload of 150 bytes exceeds the limit of 100 bytes for stream 'small'" in line
    assert "1 rows committed before line 2; nothing from line 2 on was written" in line
    assert payloads(pgfeed_conn, "small") == [json.loads(ok)]

    batched = pgfeed_cmd("append", "small", "-", "--batch", "3", input=f"{ok}\n{ok}\n{ok}\n{ok}\n{big}\n{ok}\n")
    assert batched.exit_code == 1
    line = one_line_error(batched)
    assert "lines 4-6: payload 2 of 3 (150 bytes) exceeds the limit of 100 bytes" in line
    assert "3 rows committed before line 4; nothing from line 4 on was written" in line
    assert len(payloads(pgfeed_conn, "small")) == 4


def test_cli_stdin_line_that_is_not_utf8(pgfeed_cmd: Run, pgfeed_conn: Conn, orders: int) -> None:
    result = pgfeed_cmd("append", "orders", "-", input=b'"ok"\n"caf\xe9"\n')
    assert result.exit_code == 2
    line = one_line_error(result)
    assert "line 2 is not UTF-8" in line
    assert payloads(pgfeed_conn) == ["ok"]


def test_cli_help_documents_the_transactions(pgfeed_cmd: Run) -> None:
    text = " ".join(pgfeed_cmd("append", "--help").stdout.split())
    assert "one transaction per line" in text
    assert "every transaction committed before that line's transaction stays committed" in text
    assert "nothing of that line's transaction is written" in text


# -- wake-ups -------------------------------------------------------------------


@pytest.fixture
def listener(pgfeed_dsn: str) -> Iterator[Conn]:
    with psycopg.connect(pgfeed_dsn, autocommit=True) as conn:
        conn.execute("LISTEN pgfeed_test_done")
        yield conn


def notifications(listener: Conn, writer: Conn, streams: list[int]) -> list[tuple[str, str]]:
    """Every (channel, payload) the listener got on the streams' channels until a
    marker NOTIFY sent after everything the test committed (notifications
    arrive in commit order, so nothing earlier can come after it)."""
    writer.execute("NOTIFY pgfeed_test_done")
    got = []
    for n in listener.notifies(timeout=10):
        if n.channel == "pgfeed_test_done":
            return got
        got.append((n.channel, n.payload))
    raise AssertionError(f"no marker notification; got {got}")


def listen(listener: Conn, *stream_ids: int) -> None:
    """LISTEN on every channel a writer could notify: the previous release's
    per-stream channels and the ticker's wake-up channel."""
    for sid in stream_ids:
        listener.execute(f"LISTEN pgfeed_v1_{sid}")
    listener.execute("LISTEN pgfeed_v2_wake")


WAKE = ("pgfeed_v2_wake", "")


def test_default_streams_never_notify_from_the_writer(listener: Conn, pgfeed_conn: Conn, orders: int) -> None:
    listen(listener, orders)
    with pgfeed_conn.transaction():
        for i in range(100):
            pgfeed.append(pgfeed_conn, "orders", {"secret": i})
        pgfeed.append_many(pgfeed_conn, "orders", list(range(10)))
    pgfeed.append(pgfeed_conn, "orders", 1)
    assert notifications(listener, pgfeed_conn, [orders]) == []


def test_immediate_streams_wake_the_ticker_once_per_transaction(listener: Conn, pgfeed_conn: Conn) -> None:
    hot = admin.create_stream(pgfeed_conn, "hot", notify_mode="immediate")
    hot2 = admin.create_stream(pgfeed_conn, "hot2", notify_mode="immediate")
    listen(listener, hot, hot2)
    with pgfeed_conn.transaction():
        for i in range(50):
            pgfeed.append(pgfeed_conn, "hot", {"secret": i})
            pgfeed.append(pgfeed_conn, "hot2", i)
        pgfeed_conn.execute("SELECT pgfeed.append('hot', to_jsonb(g)) FROM generate_series(1, 10) g")
        pgfeed.append_many(pgfeed_conn, "hot", list(range(10)))
    assert notifications(listener, pgfeed_conn, [hot, hot2]) == [WAKE]
    for i in range(3):
        pgfeed.append(pgfeed_conn, "hot", i)
    assert notifications(listener, pgfeed_conn, [hot]) == [WAKE] * 3


def test_rolled_back_appends_do_not_notify(listener: Conn, pgfeed_conn: Conn) -> None:
    orders = admin.create_stream(pgfeed_conn, "loud", notify_mode="immediate")
    listen(listener, orders)
    with suppress(CallerFailed), pgfeed_conn.transaction():
        pgfeed.append(pgfeed_conn, "loud", 1)
        raise CallerFailed
    assert notifications(listener, pgfeed_conn, [orders]) == []


def test_poll_streams_do_not_notify(listener: Conn, pgfeed_conn: Conn) -> None:
    quiet = admin.create_stream(pgfeed_conn, "quiet", notify_mode="poll")
    listen(listener, quiet)
    with pgfeed_conn.transaction():
        pgfeed.append(pgfeed_conn, "quiet", 1)
        pgfeed.append_many(pgfeed_conn, "quiet", [2, 3])
    pgfeed.append(pgfeed_conn, "quiet", 4)
    assert notifications(listener, pgfeed_conn, [quiet]) == []
    assert payloads(pgfeed_conn, "quiet") == [1, 2, 3, 4]


def test_invalidate_does_not_notify(listener: Conn, pgfeed_conn: Conn) -> None:
    caches = admin.stream_id(pgfeed_conn, "caches")
    listen(listener, caches)
    with pgfeed_conn.transaction():
        pgfeed.invalidate(pgfeed_conn, "c", ["secret-key"])
        pgfeed.invalidate(pgfeed_conn, "c", None)
    assert notifications(listener, pgfeed_conn, [caches]) == []


# -- the caller's connection settings --------------------------------------------


def test_any_row_factory(pgfeed_dsn: str, pgfeed_conn: Conn, orders: int) -> None:
    with psycopg.connect(pgfeed_dsn, row_factory=dict_row) as conn:
        seq = pgfeed.append(conn, "orders", 1)
        assert isinstance(seq, int)
        assert pgfeed.append_many(conn, "orders", [2, 3]) == 2
        assert isinstance(pgfeed.invalidate(conn, "c", None), int)
        conn.commit()
        assert isinstance(pgfeed.commit_token(conn), pgfeed.CommitToken)
        assert admin.stream_id(conn, "orders") == orders
        assert {s.name for s in admin.list_streams(conn)} == {"caches", "orders"}
    assert payloads(pgfeed_conn) == [1, 2, 3]


async def test_any_row_factory_async(pgfeed_dsn: str, pgfeed_conn: Conn, orders: int) -> None:
    async with await psycopg.AsyncConnection.connect(pgfeed_dsn, row_factory=dict_row) as conn:
        assert isinstance(await pgfeed.append(conn, "orders", 1), int)
        assert await pgfeed.append_many(conn, "orders", [2]) == 1
        assert isinstance(await pgfeed.invalidate(conn, "c", ["k"]), int)
        await conn.commit()
        assert isinstance(await pgfeed.commit_token(conn), pgfeed.CommitToken)
    assert payloads(pgfeed_conn) == [1, 2]
