"""The schema built by applying every migration equals the one documented in
docs/schema.md: its ```catalog block is compared, line for line, with a
description generated from the catalog of a freshly migrated database.

After a migration that changes the schema, this test fails and prints the new
block: review it, then paste it into docs/schema.md (and update the prose).
Run this file directly to print the block for a database:
``python tests/integration/test_schema_doc.py DSN``.
"""

from __future__ import annotations

import difflib
import re
import sys
from pathlib import Path
from typing import Any

import psycopg

DOC = Path(__file__).resolve().parents[2] / "docs" / "schema.md"
BLOCK = re.compile(r"^```catalog\n(.*?)^```$", re.MULTILINE | re.DOTALL)

_TABLES = """
SELECT c.oid, c.relname, c.relkind, c.relrowsecurity, pg_get_partkeydef(c.oid)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'pgfeed' AND c.relkind IN ('r', 'p') AND NOT c.relispartition
ORDER BY c.relname
"""

_COLUMNS = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull, pg_get_expr(d.adbin, d.adrelid),
       a.attidentity, a.attgenerated
FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""

_CONSTRAINTS = """
SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint
WHERE conrelid = %s AND contype <> 'n' ORDER BY contype, conname
"""

_INDEXES = """
SELECT i.relname, pg_get_indexdef(i.oid)
FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
WHERE x.indrelid = %s AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.oid)
ORDER BY i.relname
"""

_POLICIES = """
SELECT policyname, cmd, roles::text, qual, with_check FROM pg_policies
WHERE schemaname = 'pgfeed' AND tablename = %s ORDER BY policyname
"""

_SEQUENCES = """
SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'pgfeed' AND c.relkind = 'S'
  AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = c.oid AND d.deptype IN ('a', 'i'))
ORDER BY c.relname
"""

_FUNCTIONS = """
SELECT p.proname, pg_get_function_arguments(p.oid), pg_get_function_result(p.oid), l.lanname,
       p.prosecdef, p.proconfig, p.prosrc
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace JOIN pg_language l ON l.oid = p.prolang
WHERE n.nspname = 'pgfeed'
ORDER BY p.proname, pg_get_function_identity_arguments(p.oid)
"""

_PARTITIONS = """
SELECT c.relname, pg_get_expr(c.relpartbound, c.oid),
       (SELECT pg_get_expr(d.adbin, d.adrelid) FROM pg_attrdef d JOIN pg_attribute a
            ON a.attrelid = d.adrelid AND a.attnum = d.adnum
        WHERE d.adrelid = c.oid AND a.attname = 'stream_id')
FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = 'pgfeed.events'::regclass ORDER BY c.relname
"""

_NOTIFY = re.compile(r"(?i)pg_notify\s*\((?P<channel>[^,]*),(?P<payload>[^;]*)\)\s*;")


def describe(conn: psycopg.Connection[Any]) -> list[str]:
    """The pgfeed schema as the lines of docs/schema.md's ```catalog block."""
    lines: list[str] = []
    for oid, name, kind, rls, partkey in conn.execute(_TABLES).fetchall():
        head = f"table pgfeed.{name}"
        head += f" PARTITION BY {partkey}" if kind == "p" else ""
        head += " ROW LEVEL SECURITY" if rls else ""
        lines.append(head)
        for col, typ, notnull, default, identity, generated in conn.execute(_COLUMNS, (oid,)).fetchall():
            line = f"  column {col} {typ}" + (" NOT NULL" if notnull else "")
            if identity:
                line += " GENERATED " + {"a": "ALWAYS", "d": "BY DEFAULT"}[identity] + " AS IDENTITY"
            elif default is not None:
                # One line: PostgreSQL pretty-prints a CASE over several.
                line += (" GENERATED ALWAYS AS " if generated else " DEFAULT ") + " ".join(default.split())
            lines.append(line)
        for con, definition in conn.execute(_CONSTRAINTS, (oid,)).fetchall():
            lines.append(f"  constraint {con} {definition}")
        for idx, definition in conn.execute(_INDEXES, (oid,)).fetchall():
            unique = "UNIQUE " if definition.startswith("CREATE UNIQUE") else ""
            lines.append(f"  index {idx} {unique}USING {definition.split(' USING ', 1)[1]}")
        for policy, cmd, roles, using, check in conn.execute(_POLICIES, (name,)).fetchall():
            using, check = (" ".join(str(e).split()) for e in (using, check))
            lines.append(f"  policy {policy} FOR {cmd} TO {roles} USING ({using}) WITH CHECK ({check})")
    lines.append(_describe_partitions(conn))
    for (seq,) in conn.execute(_SEQUENCES).fetchall():
        lines.append(f"sequence pgfeed.{seq}")
    channels: set[str] = set()
    for name, args, result, lang, secdef, config, src in conn.execute(_FUNCTIONS).fetchall():
        line = f"function pgfeed.{name}({args}) RETURNS {result} LANGUAGE {lang}"
        line += " SECURITY DEFINER" if secdef else ""
        line += "".join(f" SET {setting}" for setting in config or [])
        lines.append(line)
        for call in _NOTIFY.finditer(src):
            channels.add(f"notify channel {call['channel'].strip()} payload {call['payload'].strip()}")
    lines.extend(sorted(channels))
    return lines


def _describe_partitions(conn: psycopg.Connection[Any]) -> str:
    """One line for the per-stream partitions, after checking that each stream
    has exactly its own ``events_<id>`` partition with ``stream_id`` defaulting to it."""
    streams = {int(sid) for (sid,) in conn.execute("SELECT id FROM pgfeed.streams").fetchall()}
    parts = conn.execute(_PARTITIONS).fetchall()
    expected = {(f"events_{sid}", f"FOR VALUES IN ('{sid}')", str(sid)) for sid in streams}
    actual = {(name, bound, default) for name, bound, default in parts}
    if actual != expected:
        return f"partitions of pgfeed.events DIFFER from one per stream: {sorted(actual ^ expected)}"
    return "partitions of pgfeed.events: events_<stream id> FOR VALUES IN (<stream id>), stream_id DEFAULT <stream id>"


def documented() -> list[str]:
    found = BLOCK.findall(DOC.read_text(encoding="utf-8"))
    assert len(found) == 1, f"{DOC} must hold exactly one ```catalog block"
    return [line for line in found[0].splitlines() if line.strip()]


def test_documented_schema_equals_the_migrated_one(pgfeed_conn: psycopg.Connection[Any]) -> None:
    actual = describe(pgfeed_conn)
    doc = documented()
    if actual != doc:
        diff = "\n".join(difflib.unified_diff(doc, actual, "docs/schema.md", "migrated database", lineterm=""))
        block = "\n".join(actual)
        raise AssertionError(
            f"docs/schema.md does not describe the migrated schema:\n{diff}\n\n"
            f"The catalog block for the migrated schema is:\n```catalog\n{block}\n```"
        )


def test_the_comparison_notices_a_changed_column(pgfeed_conn: psycopg.Connection[Any]) -> None:
    """The description is fine-grained enough to see a type change, a new column and a new function."""
    before = describe(pgfeed_conn)
    pgfeed_conn.execute("ALTER TABLE pgfeed.ticks ALTER COLUMN taken_at TYPE timestamp")
    pgfeed_conn.execute("ALTER TABLE pgfeed.streams ADD COLUMN extra int")
    pgfeed_conn.execute("CREATE FUNCTION pgfeed.extra_v1(x int) RETURNS int LANGUAGE sql AS 'SELECT x'")
    changed = set(describe(pgfeed_conn)) - set(before)
    assert changed == {
        "  column taken_at timestamp without time zone NOT NULL",
        "  column extra integer",
        "function pgfeed.extra_v1(x integer) RETURNS integer LANGUAGE sql",
    }


if __name__ == "__main__":
    with psycopg.connect(sys.argv[1]) as c:
        print("```catalog\n" + "\n".join(describe(c)) + "\n```")
