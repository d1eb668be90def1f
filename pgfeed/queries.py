"""Every statement pgfeed sends, by name: ``pgfeed/queries.sql``, read and
parsed once, on first use (importing pgfeed reads no file).

The file is a list of named queries (procrastinate's layout)::

    -- name: head_tick_id
    -- The newest tick's id (0 before the first tick).
    SELECT coalesce(max(id), 0) FROM pgfeed.ticks

A ``-- name:`` line starts a query; the comment lines right after it say what
it does and are not sent; the rest, up to the next name, is the statement
(comment lines at its end, such as the next section's heading, are not sent).
Run one with ``conn.execute(query("head_tick_id"), params)``. A statement
whose identifiers (role, table, channel names) are only known at run time
has ``{}`` placeholders: fill them with ``template(name).format(sql.Identifier(...))``.
Call both with a literal name: ``tests/unit/test_queries.py`` checks that each
name used exists and that each query in the file is used.
"""

from __future__ import annotations

import functools
import re
from importlib import resources

from psycopg import sql

#: The file's name inside the ``pgfeed`` package.
QUERIES_FILE = "queries.sql"

_NAME = re.compile(r"^-- name: ([a-z][a-z0-9_]*)[ \t]*$", re.MULTILINE)
_DOC = re.compile(r"\A(?:--(?: .*)?\n)*")
_TRAILING = re.compile(r"(?:\n[ \t]*(?:--.*)?)+\Z")


def parse(text: str) -> dict[str, str]:
    """The named queries of ``text`` (a ``.sql`` file's content), in file order;
    ValueError for a duplicated name, an empty query, or a statement before the
    first name (comments and blank lines there are the file's header)."""
    parts = _NAME.split(text)
    header = "\n".join(line for line in parts[0].splitlines() if not line.startswith("--"))
    if header.strip():
        raise ValueError(f"SQL before the first '-- name:' line: {header.strip()[:60]!r}")
    found: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        # Not sent: the comments right after the name, and comment lines
        # after the statement (the next section's heading).
        statement = _TRAILING.sub("", _DOC.sub("", body.lstrip("\n"), count=1).strip()).strip()
        if name in found:
            raise ValueError(f"query {name!r} is defined twice")
        if not statement:
            raise ValueError(f"query {name!r} has no statement")
        found[name] = statement
    return found


@functools.cache
def _queries() -> dict[str, str]:
    return parse(resources.files("pgfeed").joinpath(QUERIES_FILE).read_text(encoding="utf-8"))


def names() -> list[str]:
    """Every query name in the file, in file order."""
    return list(_queries())


def query(name: str) -> str:
    """The statement named ``name``, to execute with its parameters as is."""
    try:
        return _queries()[name]
    except KeyError:
        raise LookupError(f"no query named {name!r} in pgfeed/{QUERIES_FILE}") from None


def template(name: str) -> sql.SQL:
    """The statement named ``name`` as a :class:`psycopg.sql.SQL` whose ``{}``
    placeholders the caller fills with identifiers or literals (``.format(...)``)."""
    return sql.SQL(query(name))
