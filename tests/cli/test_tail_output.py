"""What ``pgfeed tail`` prints: rows as ``pgfeed.rows`` renders them, reset markers,
and a quiet exit when the reader of its output goes away."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from typing import Any

import psycopg
from helpers import PGFEED, JsonLines, pgfeed_process, run_cli

import pgfeed
from pgfeed import admin, rows

Conn = psycopg.Connection[Any]


def test_jsonl_lines_are_the_library_rendering(pgfeed_dsn: str, stream: str, pgfeed_conn: Conn) -> None:
    with pgfeed_conn.transaction():
        pgfeed.append_many(pgfeed_conn, stream, [{"id": 1}, [1, "two"], None], keys=["k", None, ""])
    printed = run_cli(pgfeed_dsn, "tail", stream, "--no-follow")
    assert printed.exit_code == 0, printed.output
    with pgfeed.Reader(pgfeed_dsn) as reader:
        delivered = [row for batch in reader.subscribe(stream, since="earliest", until="now") for row in batch]
    assert printed.stdout.splitlines() == [rows.row_to_jsonl(row) for row in delivered]
    assert rows.to_json(delivered[0]) == {
        "stream": stream,
        "position": delivered[0].token,
        "created_at": delivered[0].created_at.isoformat(),
        "key": "k",
        "payload": {"id": 1},
    }


def test_piped_into_head_on_a_quiet_stream_exits_at_once(pgfeed_dsn: str, stream: str, pgfeed_conn: Conn) -> None:
    """head exits after its two lines; no row ever comes again, yet tail must notice and end, quietly."""
    with pgfeed_conn.transaction():
        pgfeed.append_many(pgfeed_conn, stream, [{"id": 1}, {"id": 2}])
    pipeline = subprocess.Popen(
        ["bash", "-o", "pipefail", "-c", f'"$0" --dsn "$1" tail {stream} | head -n 2', PGFEED, pgfeed_dsn],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # so that a hung tail can be killed with the shell
    )
    try:
        stdout, stderr = pipeline.communicate(timeout=30)
    finally:
        if pipeline.poll() is None:
            os.killpg(pipeline.pid, signal.SIGKILL)
    assert [line.count('"id":') for line in stdout.splitlines()] == [1, 1]
    assert stderr == ""
    assert pipeline.returncode == 0  # with pipefail: tail exited 0 too


def test_a_reset_is_a_marker_line_before_the_rows(pgfeed_dsn: str, stream: str, pgfeed_conn: Conn) -> None:
    """The stream is dropped and recreated under a running tail."""
    pgfeed.append(pgfeed_conn, stream, {"n": 1})
    proc = pgfeed_process("--dsn", pgfeed_dsn, "tail", stream)
    lines = JsonLines(proc)
    try:
        assert [line["payload"] for line in lines.take(1)] == [{"n": 1}]
        admin.drop_stream(pgfeed_conn, stream)
        admin.create_stream(pgfeed_conn, stream)
        pgfeed.append(pgfeed_conn, stream, {"n": 2})
        marker, row = lines.take(2, timeout=30)
        assert set(marker) == {"stream", "reset", "reason"}
        assert marker["stream"] == stream
        assert marker["reset"] is True
        assert "recreated" in marker["reason"]
        assert row["payload"] == {"n": 2}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        proc.kill()


def test_a_captured_truncate_is_marked_in_both_formats(pgfeed_dsn: str, stream: str, pgfeed_conn: Conn) -> None:
    pgfeed_conn.execute('CREATE TABLE "Items" (id int PRIMARY KEY)')
    admin.capture(pgfeed_conn, "public", "Items", stream)
    pgfeed_conn.execute('INSERT INTO "Items" VALUES (1)')
    pgfeed_conn.execute('TRUNCATE "Items"')
    lines = [json.loads(line) for line in run_cli(pgfeed_dsn, "tail", stream, "--no-follow").stdout.splitlines()]
    assert ["truncate" in line for line in lines] == [False, True], lines
    assert lines[1]["truncate"] == 'public."Items"'
    assert lines[1]["payload"] == {"op": "truncate", "table": 'public."Items"'}
    text = run_cli(pgfeed_dsn, "tail", stream, "--no-follow", "--format", "pretty").stdout.splitlines()
    assert len(text) == 2, text
    assert text[1].endswith(f'@{lines[1]["position"]}  -- public."Items" truncated: every row of it above is gone')
