"""``pgfeed dsn``, ``pgfeed psql`` and ``pgfeed server status|stop``: the
connection pgfeed uses, and the embedded PostgreSQL behind it."""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from pgfeed import connect

#: ``pgfeed server status`` when the embedded server does not run (as ``pg_ctl status``).
NOT_RUNNING = 3


@click.command("dsn")
@click.pass_obj
def dsn_cmd(obj: Any) -> None:
    """Print the DSN pgfeed would use (--dsn, PGFEED_DSN, libpq's environment,
    else the embedded server, started if needed): `psql "$(pgfeed dsn)"`."""
    click.echo(connect.spelled_out(connect.resolve(obj.dsn_option)))


@click.command(
    "psql", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False, "help_option_names": []}
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_obj
def psql_cmd(obj: Any, args: tuple[str, ...]) -> None:
    """Run psql on the database pgfeed uses; ARGS go to psql unchanged
    (`pgfeed psql -c 'TABLE pgfeed.streams'`)."""
    dsn = connect.spelled_out(connect.resolve(obj.dsn_option))
    psql = connect.psql_path()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(psql, [psql, "-d", dsn, *args])  # noqa: S606  # psql replaces this process, as `exec psql` would


@click.group("server")
def server_cmd() -> None:
    """The embedded PostgreSQL ($PGFEED_HOME/pgdata, default
    ~/.local/share/pgfeed/pgdata), started on demand by any command that
    needs it and left running."""


@server_cmd.command("status")
def server_status() -> None:
    """Say whether the embedded server runs, its pid, user, version and DSN;
    exit 3 when it does not run."""
    status = connect.embedded_status()
    if not status.initialised:
        click.echo(f"not running: no embedded server yet ({status.data_dir} holds none)")
        raise click.exceptions.Exit(NOT_RUNNING)
    if not status.running:
        click.echo(f"not running: PostgreSQL {status.version} in {status.data_dir}, owned by {status.owner}")
        raise click.exceptions.Exit(NOT_RUNNING)
    click.echo(f"running: PostgreSQL {status.version}, pid {status.pid}, user {status.owner}")
    click.echo(f"data directory: {status.data_dir}")
    click.echo(f"dsn: {status.dsn}")


@server_cmd.command("stop")
def server_stop() -> None:
    """Stop the embedded server (sessions are disconnected). As root, it is
    stopped as the unprivileged user that runs it. Nothing to do if it does
    not run."""
    stopped = connect.stop_embedded()
    if stopped is None:
        click.echo(f"not running: {connect.embedded_data_dir()}")
        return
    click.echo(f"stopped the embedded PostgreSQL (pid {stopped.pid}) in {stopped.data_dir}")
