"""Helpers shared by the tests that run the real ``pgfeed`` command.

``tests/`` is on ``sys.path`` (it has no ``__init__.py``), so a test imports
these with ``from helpers import ...``.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from click.testing import CliRunner, Result
from pgfeed_cli.main import cli

#: A Django project's settings, as a program's first lines: DATABASES["default"]
#: is the database of libpq connection string ``dsn`` (a variable set before).
DJANGO_SETTINGS = """
import django
from django.conf import settings
from psycopg import conninfo

params = conninfo.conninfo_to_dict(dsn)
settings.configure(
    DATABASES={
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": params["dbname"],
            "USER": params.get("user", ""),
            "PASSWORD": params.get("password", ""),
            "HOST": params.get("host", ""),
            "PORT": params.get("port", ""),
        }
    }
)
django.setup()
"""

#: The installed console script, the way users run it (next to this interpreter).
PGFEED = str(Path(sys.executable).with_name("pgfeed"))

Run = Callable[..., Result]


def run_cli(dsn: str, *args: str, input: str | bytes | None = None, env: dict[str, str] | None = None) -> Result:
    """The CLI in this process (click's CliRunner) against ``dsn``: ``run_cli(dsn, "stream", "list")``."""
    return CliRunner().invoke(cli, ["--dsn", dsn, *args], input=input, env=env)


def pgfeed_process(*args: str, **popen: Any) -> subprocess.Popen[str]:
    """The real ``pgfeed`` command in its own process, text pipes for stdout and stderr."""
    assert Path(PGFEED).exists(), f"the pgfeed console script is missing next to {sys.executable}"
    return subprocess.Popen([PGFEED, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def one_line_error(result: Result | subprocess.CompletedProcess[str], code: int | None = None) -> str:
    """The single stderr line of a failed command, asserting there is exactly one,
    no output and no traceback (and the exit code, when given)."""
    if isinstance(result, Result):
        exit_code, stdout, stderr = result.exit_code, result.stdout, result.stderr
    else:
        exit_code, stdout, stderr = result.returncode, result.stdout, result.stderr
    assert exit_code != 0, stdout
    if code is not None:
        assert exit_code == code, (exit_code, stderr)
    assert stdout == ""
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("pgfeed: error: "), lines[0]
    return lines[0]


class JsonLines:
    """The JSON lines a process prints, read on a thread so that waiting for them can time out."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        stdout = proc.stdout
        self._lines: queue.Queue[str] = queue.Queue()

        def pump() -> None:
            for line in stdout:
                self._lines.put(line)

        threading.Thread(target=pump, daemon=True).start()

    def take(self, n: int, timeout: float = 15) -> list[dict[str, Any]]:
        """The next ``n`` lines, failing (not hanging) if they do not come in time."""
        got: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while len(got) < n:
            try:
                got.append(json.loads(self._lines.get(timeout=max(0.0, deadline - time.monotonic()))))
            except queue.Empty:
                raise AssertionError(f"only {len(got)} of {n} lines arrived: {got[-3:]}") from None
        return got
