"""The pytest plugin is opt-in, starts nothing until a fixture asks, and says in
one line what is wrong with a setting. Runs pytest on a throwaway project; no server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = """
def test_without_a_server():
    pass


def test_with_a_server(pgfeed_dsn):
    pass
"""


def run_pytest(project: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PGFEED_", "PYTEST_"))}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:randomly", *args],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=120,
        env={**clean, "PGFEED_TEST_NO_DOCKER": "1", **env},
    )


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "test_app.py").write_text(TESTS)
    return tmp_path


def test_installing_pgfeed_does_not_load_the_plugin(project: Path) -> None:
    done = run_pytest(project, "test_app.py")
    assert "fixture 'pgfeed_dsn' not found" in done.stdout, (
        f"loaded unasked (a stale install? reinstall):\n{done.stdout}"
    )
    assert not [line for line in done.stdout.splitlines() if line.startswith("pgfeed")], done.stdout


@pytest.mark.parametrize("how", ["conftest", "-p"])
def test_the_header_starts_nothing(project: Path, how: str) -> None:
    """A bad setting does not matter to a run whose tests need no server: nothing looked at it."""
    if how == "conftest":
        (project / "conftest.py").write_text('pytest_plugins = ["pgfeed.testing"]\n')
    args = ["-p", "pgfeed.testing"] if how == "-p" else []
    done = run_pytest(project, *args, "test_app.py::test_without_a_server", PGFEED_TEST_PG_BIN="/nonexistent")
    assert done.returncode == 0, done.stdout
    header = [line for line in done.stdout.splitlines() if line.startswith("pgfeed:")]
    assert header == [
        "pgfeed: PostgreSQL starts when a test needs it, from local server binaries (PGFEED_TEST_PG_BIN=/nonexistent)"
    ]


def test_a_bad_binary_directory_is_one_line_naming_the_variable(project: Path) -> None:
    done = run_pytest(project, "-p", "pgfeed.testing", "-rE", PGFEED_TEST_PG_BIN="/nonexistent")
    assert done.returncode == 1, done.stdout
    assert "1 passed, 1 error" in done.stdout, done.stdout
    assert "Traceback" not in done.stdout, done.stdout
    (error,) = [line for line in done.stdout.splitlines() if line.startswith("pgfeed test server:")]
    assert error == (
        "pgfeed test server: PGFEED_TEST_PG_BIN=/nonexistent holds no initdb and pg_ctl: set it to the bin "
        "directory of a PostgreSQL installation (e.g. /usr/lib/postgresql/16/bin), or unset it to use the first "
        "one found"
    ), done.stdout
