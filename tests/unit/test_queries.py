"""pgfeed/queries.sql: it parses, every name the code asks for is in it, and
every query in it is used (no dead queries). No database."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from pgfeed import queries

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted([*(ROOT / "pgfeed").rglob("*.py"), *(ROOT / "cli" / "pgfeed_cli").rglob("*.py")])
LOADERS = {"query", "template"}


def _imports_the_loader(tree: ast.Module) -> bool:
    return any(
        isinstance(node, ast.ImportFrom) and node.module == "pgfeed.queries" and {a.name for a in node.names} & LOADERS
        for node in ast.walk(tree)
    )


def used_names() -> Counter[str]:
    """Each query name the code passes to ``query()`` / ``template()``, with how often."""
    used: Counter[str] = Counter()
    for path in SOURCES:
        if path.name == "queries.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        if not _imports_the_loader(tree):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in LOADERS:
                (arg,) = node.args
                where = f"{path.relative_to(ROOT)}:{node.lineno}"
                name = arg.value if isinstance(arg, ast.Constant) else None
                assert isinstance(name, str), f"{where}: the query name is not a literal string"
                used[name] += 1
    return used


def test_the_query_file_parses_with_comments_left_out() -> None:
    names = queries.names()
    assert names, "no query in pgfeed/queries.sql"
    for name in names:
        text = queries.query(name)
        assert not text.startswith("--"), f"{name}: its comment was kept"
        assert "-- name:" not in text, f"{name} swallowed the next query"


def test_every_name_used_exists() -> None:
    missing = set(used_names()) - set(queries.names())
    assert not missing, f"used in the code but not in pgfeed/queries.sql: {sorted(missing)}"


def test_every_query_is_used() -> None:
    dead = set(queries.names()) - set(used_names())
    assert not dead, f"in pgfeed/queries.sql but used nowhere: {sorted(dead)}"


def test_an_unknown_name_says_where_it_looked() -> None:
    with pytest.raises(LookupError, match=r"no query named 'nope' in pgfeed/queries\.sql"):
        queries.query("nope")


def test_importing_pgfeed_reads_no_query_file() -> None:
    code = "import pgfeed, pgfeed.queries as q, sys; sys.exit(q._queries.cache_info().currsize)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_parse_splits_names_comments_and_statements() -> None:
    text = (
        "-- header\n\n-- name: one\n-- what one does\n--\nSELECT 1\n\n-- ==== Next section ====\n\n"
        "-- name: two\nSELECT 2 -- trailing\n  , 3\n"
    )
    assert queries.parse(text) == {"one": "SELECT 1", "two": "SELECT 2 -- trailing\n  , 3"}


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("SELECT 0\n-- name: one\nSELECT 1\n", "SQL before the first"),
        ("-- name: one\nSELECT 1\n-- name: one\nSELECT 2\n", "defined twice"),
        ("-- name: one\n-- only a comment\n\n-- name: two\nSELECT 2\n", "'one' has no statement"),
    ],
)
def test_parse_refuses_a_malformed_file(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        queries.parse(text)
