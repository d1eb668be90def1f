"""pgfeed/core is pure: its modules import neither psycopg nor asyncio (nor
anything of pgfeed outside core/ but the error classes, which import no driver)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PGFEED = Path(__file__).resolve().parents[2] / "pgfeed"
CORE = sorted((PGFEED / "core").glob("*.py"))
ALLOWED_PGFEED = {"pgfeed.errors"}
FORBIDDEN = {"psycopg", "psycopg_pool", "asyncio", "socket", "threading", "subprocess"}


def imported(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def module_level_imports(path: Path) -> set[str]:
    """Imports run when the module is imported (not inside functions or TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_there_is_a_core_to_check() -> None:
    assert {p.stem for p in CORE} >= {
        "positions",
        "tokens",
        "backoff",
        "migrations",
        "cursor",
        "tickcache",
        "invalidation",
    }


@pytest.mark.parametrize("path", CORE, ids=lambda p: p.name)
def test_a_core_module_imports_no_driver_and_no_io(path: Path) -> None:
    for name in imported(path):
        root = name.split(".")[0]
        assert root not in FORBIDDEN, f"{path.name} imports {name}"
        if root == "pgfeed":
            assert name.startswith("pgfeed.core") or name in ALLOWED_PGFEED, f"{path.name} imports {name}"


def test_the_error_classes_import_no_driver_at_import_time() -> None:
    roots = {n.split(".")[0] for n in module_level_imports(PGFEED / "errors.py")}
    assert not roots & FORBIDDEN, roots & FORBIDDEN
