"""Every error of the ``pgfeed`` command is one line; exit 2 for usage errors, 1 otherwise."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner
from helpers import PGFEED, Run, one_line_error, run_cli
from pgfeed_cli.main import cli
from psycopg.conninfo import make_conninfo

from pgfeed import admin

Conn = psycopg.Connection[Any]

USAGE_ERRORS = [
    (["bogus"], None, "no such command 'bogus'; try 'pgfeed --help'"),
    (["tail", "orders", "--frm", "x"], None, "no such option '--frm'"),
    (["tail"], None, "missing argument 'STREAM'; try 'pgfeed tail --help'"),
    (["tail", "orders", "--format", "xml"], None, "invalid value for '--format'"),
    (["stream", "create", "x", "--max-payload-bytes", "0"], None, "try 'pgfeed stream create --help'"),
    (["tail", "orders", "--from", "banana"], None, "malformed position token 'banana'"),
    (["tail", "orders", "--from", "3~XYZ"], None, "expected TICK, TICK.SEQ, TICK~CHECK or TICK.SEQ~CHECK"),
    (["tail", "Bad-Name"], None, "invalid stream name 'Bad-Name'"),
    (["grant", "writer", "someone", "--stream", "Bad-Name"], None, "invalid stream name 'Bad-Name'"),
    (["append", "orders", "{"], None, "invalid JSON on the JSON argument"),
    (["append", "orders", "-"], '{"n": 1}\n{"n": \n', "invalid JSON on line 2"),
    (["append", "orders", "-"], b'"caf\xe9"\n', "line 1 is not UTF-8"),
    (["stream", "drop", "orders"], None, "repeat with --yes to confirm"),
    (["prune", "--older-than", "soon"], None, "invalid duration 'soon'"),
    (["capture", "a.b.c", "--stream", "orders"], None, "invalid table name 'a.b.c'"),
    (["capture", "t", "--stream", "orders", "--ops", "insert,upsert"], None, "invalid operations 'insert,upsert'"),
    (["capture", "t", "--stream", "orders", "--columns", "a,,b"], None, "invalid column list"),
]


@pytest.mark.parametrize(("args", "stdin", "message"), USAGE_ERRORS)
def test_usage_errors_exit_2(
    pgfeed_cmd: Run, stream: str, args: list[str], stdin: str | bytes | None, message: str
) -> None:
    line = one_line_error(pgfeed_cmd(*args, input=stdin), code=2)
    assert message in line


def test_nothing_is_written_after_a_usage_error(pgfeed_cmd: Run, pgfeed_conn: Conn, stream: str) -> None:
    one_line_error(pgfeed_cmd("append", "orders", "-", input='{"n": 1}\n{"n": \n'), code=2)
    one_line_error(pgfeed_cmd("stream", "drop", "orders"), code=2)
    assert pgfeed_conn.execute("SELECT count(*) FROM pgfeed.streams WHERE name = 'orders'").fetchone() == (1,)
    assert pgfeed_conn.execute("SELECT payload FROM pgfeed.events").fetchall() == [({"n": 1},)]


@pytest.mark.parametrize(
    ("dsn", "message"),
    [
        ("nonsense", "malformed DSN"),  # refused before connecting
        ("host=/nonexistent port=abc", "malformed DSN"),  # refused by libpq when connecting
    ],
)
def test_a_malformed_dsn_is_a_usage_error(dsn: str, message: str) -> None:
    result = CliRunner().invoke(cli, ["--dsn", dsn, "stream", "list"])
    assert message in one_line_error(result, code=2)


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        (["tail", "nosuch", "--no-follow"], None, "unknown stream 'nosuch'"),
        (["append", "nosuch", "1"], None, "unknown stream 'nosuch'"),
        (["grant", "writer", "someone", "--stream", "nosuch"], None, "unknown stream 'nosuch'"),
        (["grant", "reader", "pgfeed_nobody"], None, "unknown role 'pgfeed_nobody'"),
        (["append", "small", json.dumps({"text": "x" * 200})], None, "exceeds the limit of 100 bytes"),
        (["append", "small", "-"], "1\n" + json.dumps({"text": "x" * 200}) + "\n", "line 2: payload of"),
        (["tail", "orders", "--from", "99999999", "--no-follow"], None, "beyond anything this database has issued"),
        (["capture", "nosuch", "--stream", "orders"], None, "unknown table public.nosuch"),
    ],
)
def test_failures_exit_1(
    pgfeed_cmd: Run, pgfeed_conn: Conn, stream: str, args: list[str], stdin: str | None, message: str
) -> None:
    admin.create_stream(pgfeed_conn, "small", max_payload_bytes=100)
    line = one_line_error(pgfeed_cmd(*args, input=stdin), code=1)
    assert message in line


def test_an_unreachable_server_exits_1() -> None:
    result = CliRunner().invoke(cli, ["--dsn", "postgresql://127.0.0.1:1/nowhere?connect_timeout=5", "stream", "list"])
    assert "127.0.0.1" in one_line_error(result, code=1)


def test_the_real_command_says_it_in_one_line(pgfeed_dsn: str) -> None:
    """click's usage errors were four lines (usage, hint, blank, error)."""
    usage = subprocess.run([PGFEED, "--dsn", pgfeed_dsn, "tail"], capture_output=True, text=True, timeout=30)
    assert one_line_error(usage, code=2) == "pgfeed: error: missing argument 'STREAM'; try 'pgfeed tail --help'"
    failure = subprocess.run(
        [PGFEED, "--dsn", pgfeed_dsn, "tail", "nosuch", "--no-follow"], capture_output=True, text=True, timeout=30
    )
    assert "unknown stream 'nosuch'" in one_line_error(failure, code=1)


def test_debug_adds_the_traceback_and_keeps_the_line_and_code(pgfeed_dsn: str) -> None:
    out = subprocess.run(
        [PGFEED, "--debug", "--dsn", pgfeed_dsn, "tail", "nosuch", "--no-follow"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 1
    assert "Traceback (most recent call last)" in out.stderr
    assert "UnknownStream" in out.stderr
    assert out.stderr.splitlines()[-1].startswith("pgfeed: error: unknown stream 'nosuch'")


# -- permissions ------------------------------------------------------------------
def as_role(dsn: str, role: str) -> str:
    return make_conninfo(dsn, user=role)


def test_permission_errors_name_the_grant_the_command_needs(
    pgfeed_dsn: str, stream: str, make_role: Callable[[], str]
) -> None:
    reader, writer = make_role(), make_role()
    assert run_cli(pgfeed_dsn, "grant", "reader", reader).exit_code == 0
    assert run_cli(pgfeed_dsn, "grant", "writer", writer).exit_code == 0

    appending = one_line_error(run_cli(as_role(pgfeed_dsn, reader), "append", "orders", "1"), code=1)
    assert appending.startswith("pgfeed: error: permission denied")
    assert "`pgfeed append` needs the schema owner or a role granted `pgfeed grant writer`" in appending

    creating = one_line_error(run_cli(as_role(pgfeed_dsn, writer), "stream", "create", "x"), code=1)
    assert creating.startswith("pgfeed: error: permission denied")
    assert "`pgfeed stream create` needs the schema owner" in creating

    tailing = one_line_error(run_cli(as_role(pgfeed_dsn, writer), "tail", "orders", "--no-follow"), code=1)
    assert "`pgfeed tail` needs the schema owner or a role granted `pgfeed grant reader`" in tailing


def test_a_reader_can_list_streams(pgfeed_dsn: str, stream: str, make_role: Callable[[], str]) -> None:
    reader = make_role()
    assert run_cli(pgfeed_dsn, "grant", "reader", reader).exit_code == 0
    listed = run_cli(as_role(pgfeed_dsn, reader), "stream", "list", "--json")
    assert listed.exit_code == 0, listed.output
    assert [s["name"] for s in json.loads(listed.stdout)] == ["caches", "orders"]
