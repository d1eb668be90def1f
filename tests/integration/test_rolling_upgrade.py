"""Rolling upgrade: a reader of the previous release keeps delivering, exactly
once and in order, while `pgfeed migrate` installs the ticker schema and
writers of this release append through it.

The previous release is the code at PREVIOUS (git history of this checkout),
run from an exported tree in a process of its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
import uuid
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import psycopg
import pytest
from helpers import PGFEED

import pgfeed
from pgfeed.testing import TestServer, drop_database

#: The last commit of the release before the ticker (0.1, migrations 0001-0003).
PREVIOUS = "cab2b69"
REPO = Path(__file__).resolve().parents[2]

OLD_READER = """
import asyncio, json, sys
import pgfeed

async def main(dsn, stream, out):
    async with pgfeed.AsyncReader(dsn, poll_interval=0.5, probe_interval=1.0, probe_timeout=2.0) as reader:
        sub = await reader.subscribe(stream, "earliest")
        with open(out, "w") as f:
            async for batch in sub:
                for row in batch.rows:
                    f.write(json.dumps({"position": row.token, "payload": row.payload}) + "\\n")
                f.flush()
                if any(isinstance(r.payload, dict) and r.payload.get("end") for r in batch.rows):
                    return

asyncio.run(main(*sys.argv[1:4]))
"""


@pytest.fixture
def previous_release(tmp_path: Path) -> Path:
    """The previous release's pgfeed package and migrations, exported from git."""
    try:
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", PREVIOUS, "pgfeed", "migrations", "cli"],
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"the previous release ({PREVIOUS}) is not in this checkout's git history: {exc}")
    tree = tmp_path / "previous"
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(tree, filter="data")
    return tree


@pytest.fixture
def fresh_dsn(pgfeed_server: TestServer) -> Iterator[str]:
    name = f"pgfeed_upgrade_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pgfeed_server.dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield pgfeed_server.dsn_for(name)
    drop_database(pgfeed_server, name)


def old(tree: Path, *args: str, **kwargs: Any) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{tree / 'cli'}"}
    return subprocess.Popen([sys.executable, *args], env=env, text=True, cwd=tree, **kwargs)


def old_cli(tree: Path, dsn: str, *args: str) -> None:
    proc = old(tree, "-m", "pgfeed_cli", "--dsn", dsn, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_lines(path: Path, n: int, proc: subprocess.Popen[str], timeout: float = 60) -> list[dict[str, Any]]:
    """Bounded wait for the old reader to have written n lines (or to have exited)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = read_lines(path)
        if len(lines) >= n or proc.poll() is not None:
            return lines
        time.sleep(0.05)
    return read_lines(path)


def test_a_reader_of_the_previous_release_keeps_delivering_across_migrate(
    previous_release: Path, fresh_dsn: str, tmp_path: Path
) -> None:
    old_cli(previous_release, fresh_dsn, "migrate")
    old_cli(previous_release, fresh_dsn, "stream", "create", "orders")
    out = tmp_path / "old_reader.jsonl"
    reader = old(previous_release, "-c", OLD_READER, fresh_dsn, "orders", str(out), stderr=subprocess.PIPE)
    try:
        # Rows written by the previous release's writers.
        for i in range(5):
            old_cli(previous_release, fresh_dsn, "append", "orders", json.dumps({"id": f"old-{i}"}))
        assert len(wait_lines(out, 5, reader)) == 5, "the old reader must work before the upgrade"

        migrated = subprocess.run([PGFEED, "--dsn", fresh_dsn, "migrate"], capture_output=True, text=True, timeout=120)
        assert migrated.returncode == 0, migrated.stderr
        assert "0004" in migrated.stdout + migrated.stderr

        # This release's writers (append_v2, no NOTIFY) and a concurrent
        # transaction that commits out of order; no daemon runs: the old
        # reader's own ticks (tick_read_v1) carry it.
        with psycopg.connect(fresh_dsn, autocommit=True) as conn, psycopg.connect(fresh_dsn) as slow:
            pgfeed.append(slow, "orders", {"id": "slow"})
            for i in range(20):
                pgfeed.append(conn, "orders", {"id": f"new-{i}"})
            slow.commit()
            pgfeed.append(conn, "orders", {"id": "end", "end": True})
        reader.wait(60)
        assert reader.returncode == 0, reader.stderr.read() if reader.stderr else ""
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
    got = [line["payload"]["id"] for line in read_lines(out)]
    expected = [f"old-{i}" for i in range(5)] + [f"new-{i}" for i in range(20)] + ["slow", "end"]
    assert sorted(got) == sorted(expected)
    assert len(got) == len(set(got)), "nothing delivered twice"
    assert got[:5] == [f"old-{i}" for i in range(5)]
    assert got[-1] == "end"

    # And this release's reader, from earliest, sees the same rows.
    async def new_reader() -> list[str]:
        async with pgfeed.AsyncReader(fresh_dsn) as r:
            sub = await r.subscribe("orders", "earliest", until="now")
            return [row.payload["id"] async for b in sub for row in b.rows]

    import asyncio

    assert sorted(asyncio.run(new_reader())) == sorted(expected)
