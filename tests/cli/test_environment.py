"""Every option can come from ``PGFEED_<COMMAND>_<OPTION>`` (the command path joined by _)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from typing import Any

import click
import psycopg
import pytest
from helpers import PGFEED, Run, one_line_error, run_cli
from pgfeed_cli.main import cli

import pgfeed

Conn = psycopg.Connection[Any]


def options(command: click.Command, ctx: click.Context) -> Iterator[tuple[click.Context, click.Option]]:
    """Every option of ``command`` and its subcommands, with a context as click builds it."""
    for param in command.params:
        if isinstance(param, click.Option) and param.name not in ("help", "version"):
            yield ctx, param
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from options(sub, click.Context(sub, info_name=name, parent=ctx))


def env_name(ctx: click.Context, option: click.Option) -> str:
    flag = next(o for o in option.opts if o.startswith("--"))
    return "_".join(["PGFEED", *ctx.command_path.split()[1:], flag[2:]]).upper().replace("-", "_")


def test_every_option_reads_the_variable_named_after_its_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    root = click.Context(cli, info_name="pgfeed", auto_envvar_prefix="PGFEED")
    seen = set()
    for ctx, option in options(cli, root):
        name = env_name(ctx, option)
        seen.add(name)
        assert option.name is not None
        # click's own choice, the Python name (PGFEED_TAIL_SINCE for --from), is not read.
        monkeypatch.setenv(f"{ctx.auto_envvar_prefix}_{option.name.upper()}", "python-name")
        monkeypatch.setenv(name, "from-env")
        expected = None if name == "PGFEED_STREAM_DROP_YES" else "from-env"  # a confirmation must be typed
        assert option.resolve_envvar_value(ctx) == expected, name
    assert {"PGFEED_DSN", "PGFEED_TAIL_FROM", "PGFEED_TAIL_FORMAT", "PGFEED_STREAM_CREATE_NOTIFY"} <= seen
    assert {
        "PGFEED_MIGRATE_DRY_RUN",
        "PGFEED_GRANT_WRITER_STREAM",
        "PGFEED_PRUNE_OLDER_THAN",
        "PGFEED_DEMO_RATE",
    } <= seen


def test_tail_format_from_and_follow_from_the_environment(pgfeed_dsn: str, stream: str, pgfeed_conn: Conn) -> None:
    """The names the README documents (they were silently ignored)."""
    pgfeed.append(pgfeed_conn, stream, {"n": 1})
    pgfeed.append(pgfeed_conn, stream, {"n": 2}, key="k")
    first = run_cli(pgfeed_dsn, "tail", stream, "--limit", "1")
    after_first = json.loads(first.stdout)["position"]
    env = {
        **os.environ,
        "PGFEED_DSN": pgfeed_dsn,
        "PGFEED_TAIL_FORMAT": "pretty",
        "PGFEED_TAIL_FROM": after_first,
        "PGFEED_TAIL_FOLLOW": "false",
    }
    out = subprocess.run([PGFEED, "tail", stream], capture_output=True, text=True, timeout=30, env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 1
    assert lines[0].endswith('[k]  {"n": 2}')  # pretty, and only the row after the token


def test_an_option_of_a_nested_command_from_the_environment(pgfeed_cmd: Run, pgfeed_conn: Conn) -> None:
    env = {"PGFEED_STREAM_CREATE_NOTIFY": "poll", "PGFEED_STREAM_CREATE_MAX_PAYLOAD_BYTES": "100"}
    result = pgfeed_cmd("stream", "create", "quiet", env=env)
    assert result.exit_code == 0, result.output
    row = pgfeed_conn.execute("SELECT notify_mode, max_payload_bytes FROM pgfeed.streams WHERE name = 'quiet'")
    assert row.fetchone() == ("poll", 100)
    # The command line wins over the environment.
    assert pgfeed_cmd("stream", "create", "loud", "--notify", "immediate", env=env).exit_code == 0
    row = pgfeed_conn.execute("SELECT notify_mode FROM pgfeed.streams WHERE name = 'loud'")
    assert row.fetchone() == ("immediate",)


def test_an_option_of_a_group_from_the_environment(pgfeed_cmd: Run) -> None:
    result = pgfeed_cmd("migrate", env={"PGFEED_MIGRATE_STATUS": "1"})
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("applied  0001_")


def test_a_bad_value_in_the_environment_is_a_usage_error(pgfeed_cmd: Run, stream: str) -> None:
    result = pgfeed_cmd("tail", stream, env={"PGFEED_TAIL_FORMAT": "xml"})
    assert "invalid value for '--format'" in one_line_error(result, code=2)
    result = pgfeed_cmd("tail", stream, env={"PGFEED_TAIL_FROM": "banana"})
    assert "malformed position token 'banana'" in one_line_error(result, code=2)


def test_a_drop_is_never_confirmed_by_the_environment(pgfeed_cmd: Run, pgfeed_conn: Conn, stream: str) -> None:
    result = pgfeed_cmd("stream", "drop", stream, env={"PGFEED_STREAM_DROP_YES": "1"})
    assert "--yes" in one_line_error(result, code=2)
    assert pgfeed_conn.execute("SELECT count(*) FROM pgfeed.streams WHERE name = %s", (stream,)).fetchone() == (1,)
