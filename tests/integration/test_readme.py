"""Every ```python example of README.md runs as it stands and ends.

Each runs in a fresh interpreter against a real server, given only what the
README says it assumes: ``dsn``, a migrated database with stream ``orders``
and the example tables. A Django example also gets the settings a Django
project has (``DATABASES`` pointing at that database).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
from helpers import DJANGO_SETTINGS

from pgfeed import admin

README = Path(__file__).parents[2] / "README.md"
EXAMPLES = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.DOTALL | re.MULTILINE)

#: What the README says each example is given.
PRELUDE = "import sys\ndsn = sys.argv[1]\n"


def example_id(code: str) -> str:
    first = code.splitlines()[0]
    return re.sub(r"\W+", "-", first.lstrip("# ")).strip("-")[:40]


@pytest.fixture
def example_db(pgfeed_dsn: str, pgfeed_conn: psycopg.Connection[Any]) -> str:
    """The database the README's examples assume."""
    admin.create_stream(pgfeed_conn, "orders")
    for table, column, value in (
        ("orders", "status", "new"),
        ("users", "name", "Ada"),
        ("shop_orders", "status", "new"),
    ):
        pgfeed_conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, {column} text)")
        pgfeed_conn.execute(f"INSERT INTO {table} VALUES (42, %s)", (value,))  # noqa: S608  # the names above
    return pgfeed_dsn


def test_the_readme_has_its_examples() -> None:
    assert len(EXAMPLES) >= 8
    assert any("AsyncReader" in code for code in EXAMPLES)


@pytest.mark.parametrize("code", EXAMPLES, ids=[example_id(code) for code in EXAMPLES])
def test_a_readme_example_runs_and_ends(example_db: str, pgfeed_conn: psycopg.Connection[Any], code: str) -> None:
    program = PRELUDE + (DJANGO_SETTINGS if "django" in code else "") + code
    done = subprocess.run(
        [sys.executable, "-c", program, example_db], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    if "pgfeed.commit_token()" in code:  # the driver examples: their append committed
        (count,) = pgfeed_conn.execute("SELECT count(*) FROM pgfeed.events WHERE key = '42'").fetchone() or (0,)
        assert count == 1
