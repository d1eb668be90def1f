"""How a reader names its connections, so that ``pgfeed status`` lists the
process as a live reader and the consumers it holds as live.

Every connection of a reader carries ``application_name``
``pgfeed reader pid=<pid> <stream>,... consumer=<name>`` (see
:func:`~pgfeed.core.health.make_application_name`): the process id, the
streams it follows and its consumer when it has exactly one (a name has room
for one; with several, none is named and their heartbeats tell). The name
is given when a connection opens (libpq's ``fallback_application_name``: an
``application_name`` in the DSN or ``PGAPPNAME`` wins, and then the reader
never renames anything) and changed with one statement on a connection the
next time it is used after the streams followed changed: pooled connections
when borrowed, the listener's at its next probe. Nothing is written to any
table, so it works for roles that may only read.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgfeed import store
from pgfeed.core.health import make_application_name

KIND = "reader"


class SessionName:
    """The ``application_name`` a reader's connections should carry now."""

    def __init__(self) -> None:
        self.wanted = make_application_name(KIND)
        #: False when the user named the connections: they are never renamed.
        self.ours = True
        self._pid: int | None = None

    def start(self, conninfo: str) -> str:
        """``conninfo`` naming its connections after this process unless it (or
        the environment) names them; call :meth:`adopt` with its first connection."""
        self._pid = os.getpid()
        self.follow(())
        if "fallback_application_name" in conninfo_to_dict(conninfo):
            return conninfo
        return make_conninfo(conninfo, fallback_application_name=self.wanted)

    def adopt(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Learn from a connection made with :meth:`start`'s conninfo whether the
        name is ours to change (it is not when the user gave one)."""
        self.ours = conn.info.parameter_status("application_name") == self.wanted

    def follow(self, subscriptions: Iterable[tuple[str, str | None]]) -> None:
        """The ``(stream, consumer)`` pairs followed now: the name to carry from now on."""
        pairs = list(subscriptions)
        consumers = {consumer for _, consumer in pairs if consumer is not None}
        self.wanted = make_application_name(
            KIND,
            sorted({stream for stream, _ in pairs}),
            consumers.pop() if len(consumers) == 1 else None,
            pid=self._pid,
        )

    async def apply(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Rename ``conn`` if it carries another name than :attr:`wanted` (one statement; none when it does)."""
        if self.ours and conn.info.parameter_status("application_name") != self.wanted:
            await store.set_application_name(conn, self.wanted)
