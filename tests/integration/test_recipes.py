"""The recipes of docs/embedding.md, run as written, in real server processes.

Each block of that page marked ``# file: NAME`` is copied into a directory and
the server runs it: gunicorn with 4 sync workers and ``--preload`` (readers
opened in ``post_worker_init``), uvicorn with 4 workers (an ``AsyncReader`` in
the Starlette lifespan). Concurrent clients write and read back through HTTP,
carrying each write's commit token, while the readers' backends are killed in
a loop and, when the session owns the server, PostgreSQL restarts once midway:
no 5xx, no stale read, every write applied once, every worker serves.
(Marked slow: each runs for about half a minute.)
"""

from __future__ import annotations

import importlib.util
import json
import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgfeed.testing import TestServer

DOC = Path(__file__).parents[2] / "docs" / "embedding.md"
READER_APP_NAME = "pgfeed-recipe-reader"
WORKERS = 4
CLIENTS = 8
ROUNDS = 20  # per client: a write, then reads of it with its token
READS = 2
KEYS = 3
KILL_EVERY = 0.5  # seconds between rounds of killing: paces the load, synchronises nothing


def recipe_files() -> dict[str, str]:
    """The ``# file: NAME`` code blocks of docs/embedding.md."""
    blocks = re.findall(r"```python\n# file: (\S+)\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    return dict(blocks)


@pytest.fixture
def app_dir(tmp_path: Path, pgfeed_conn: psycopg.Connection[Any]) -> Path:
    for name, text in recipe_files().items():
        (tmp_path / name).write_text(text)
    pgfeed_conn.execute("CREATE TABLE items (id int PRIMARY KEY, version int NOT NULL)")
    pgfeed_conn.execute("INSERT INTO items SELECT g, 0 FROM generate_series(1, 3) g")
    return tmp_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Lines:
    """A process's stderr, read on a thread, so that waiting for a line can time out."""

    def __init__(self, stream: Any) -> None:
        self.seen: list[str] = []
        self._lines: queue.Queue[str] = queue.Queue()

        def pump() -> None:
            for line in stream:
                self._lines.put(line)

        threading.Thread(target=pump, daemon=True).start()

    def so_far(self) -> list[str]:
        """Every line read until now."""
        while not self._lines.empty():
            self.seen.append(self._lines.get_nowait())
        return self.seen

    def wait_for(self, pattern: str, count: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        found = sum(bool(re.search(pattern, line)) for line in self.seen)
        while found < count:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"{count} lines matching {pattern!r} did not come: {self.seen[-20:]}") from None
            self.seen.append(line)
            found += bool(re.search(pattern, line))


@pytest.fixture
def run_server(app_dir: Path, pgfeed_dsn: str) -> Iterator[Any]:
    started: list[subprocess.Popen[str]] = []

    def run(*command: str, ready: str) -> tuple[str, Lines]:
        port = free_port()
        env = {
            **os.environ,
            "APP_DSN": pgfeed_dsn,
            "APP_READER_DSN": f"{pgfeed_dsn} application_name={READER_APP_NAME}",
            "PYTHONPATH": str(app_dir),
        }
        args = [a.replace("{port}", str(port)) for a in command]
        proc = subprocess.Popen(
            args, cwd=app_dir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        started.append(proc)
        lines = Lines(proc.stderr)
        lines.wait_for(ready, WORKERS)  # each worker says it has opened its reader
        return f"http://127.0.0.1:{port}", lines

    yield run
    for proc in started:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def request(url: str, method: str = "GET") -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)  # noqa: S310  # http, ours
    try:
        with urllib.request.urlopen(req, timeout=90) as response:  # noqa: S310  # the URL is built above
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, {"error": exc.read().decode(errors="replace")[-300:]}


def kill_reader_backends(dsn: str) -> int | None:
    """Terminate every backend of the apps' readers (and their embedded ticker's):
    how many, or None while the server cannot be reached (restarting)."""
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
            row = conn.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                " AND (application_name = %s OR pid = (SELECT backend_pid FROM pgfeed.ticker))",
                (READER_APP_NAME,),
            ).fetchone()
    except psycopg.OperationalError:
        return None
    assert row is not None
    return int(row[0])


class Load:
    """What the clients saw: failures (5xx, stale reads), who served, writes applied."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.failures: list[str] = []
        self.writes = 0
        self.reads = 0
        self.served: set[int] = set()
        self.halfway = threading.Event()

    def client(self, base: str, n: int) -> None:
        for i in range(ROUNDS):
            key = 1 + (n + i) % KEYS
            status, wrote = request(f"{base}/items?key={key}", "POST")
            if status != 200:
                self.fail(f"client {n} write {i}: HTTP {status} {wrote}")
                continue
            with self.lock:
                self.writes += 1
                self.served.add(wrote["pid"])
                if self.writes >= CLIENTS * ROUNDS // 2:
                    self.halfway.set()
            for _ in range(READS):  # each read may land on any worker
                status, read = request(f"{base}/items?key={key}&after={wrote['token']}")
                if status != 200:
                    self.fail(f"client {n} read {i}: HTTP {status} {read}")
                    continue
                if read["version"] < wrote["version"]:
                    self.fail(f"client {n} read {i}: stale version {read['version']} < {wrote['version']}")
                with self.lock:
                    self.reads += 1
                    self.served.add(read["pid"])

    def fail(self, what: str) -> None:
        with self.lock:
            self.failures.append(what)


def exercise(base: str, dsn: str, server: TestServer, lines: Lines) -> None:
    """CLIENTS threads write and read back with the write's token through HTTP
    while the readers' backends are killed every KILL_EVERY seconds and, once
    half the writes are done, the server restarts (if this session owns it)."""
    load = Load()
    clients = [threading.Thread(target=load.client, args=(base, n), daemon=True) for n in range(CLIENTS)]
    for t in clients:
        t.start()
    killed: list[int | None] = []
    restarted = False
    while any(t.is_alive() for t in clients):
        killed.append(kill_reader_backends(dsn))
        if load.halfway.is_set() and not restarted and server.can_restart:
            server.restart("fast")
            restarted = True
        paced = time.monotonic() + KILL_EVERY
        for t in clients:
            t.join(max(paced - time.monotonic(), 0.0))
    assert load.failures == [], (load.failures[:10], [line for line in lines.so_far() if "rror" in line][-20:])
    rounds = [k for k in killed if k]
    assert len(rounds) >= 4, f"backends killed at each round: {killed}"
    assert restarted or not server.can_restart
    assert load.writes == CLIENTS * ROUNDS
    assert load.reads == CLIENTS * ROUNDS * READS
    assert len(load.served) == WORKERS, f"requests served by {load.served}: every worker should have served"
    with psycopg.connect(dsn) as conn:
        final = dict(conn.execute("SELECT id, version FROM items").fetchall())
    assert sum(final.values()) == load.writes  # each write applied once, retries included
    print(f"{load.writes} writes, {load.reads} reads; backends killed per round: {killed}; restarted: {restarted}")


@pytest.mark.slow
@pytest.mark.restart
@pytest.mark.skipif(shutil.which("gunicorn", path=str(Path(sys.executable).parent)) is None, reason="no gunicorn")
def test_gunicorn_sync_workers_with_preload(run_server: Any, pgfeed_dsn: str, pgfeed_server: TestServer) -> None:
    gunicorn = str(Path(sys.executable).with_name("gunicorn"))
    base, lines = run_server(
        gunicorn, "-c", "gunicorn.conf.py", "--bind", "127.0.0.1:{port}", "wsgi_app:app", ready="pgfeed reader opened"
    )
    exercise(base, pgfeed_dsn, pgfeed_server, lines)
    assert not [line for line in lines.so_far() if "ForkedReader" in line or "Traceback" in line]


@pytest.mark.slow
@pytest.mark.restart
@pytest.mark.skipif(shutil.which("uvicorn", path=str(Path(sys.executable).parent)) is None, reason="no uvicorn")
def test_uvicorn_workers_with_a_starlette_lifespan(run_server: Any, pgfeed_dsn: str, pgfeed_server: TestServer) -> None:
    uvicorn = str(Path(sys.executable).with_name("uvicorn"))
    base, lines = run_server(
        uvicorn,
        "asgi_app:app",
        "--workers",
        str(WORKERS),
        "--port",
        "{port}",
        "--host",
        "127.0.0.1",
        ready="Application startup complete",
    )
    exercise(base, pgfeed_dsn, pgfeed_server, lines)
    assert not [line for line in lines.so_far() if "Traceback" in line]


#: Celery's prefork pool, without a broker: the main process imports the app
#: (its Reader unopened) and forks a child, which gets Celery's real
#: worker_process_init signal and runs the task locally, as a pool process
#: would; a write commits between two runs of the task.
CELERY_POOL_PROCESS = """
import json
import os

import psycopg
from celery.signals import worker_process_init, worker_process_shutdown

import celery_app
import pgfeed


def write(conn):
    with conn.transaction():
        version = conn.execute("UPDATE items SET version = version + 1 WHERE id = 1 RETURNING version").fetchone()[0]
        pgfeed.invalidate(conn, "items", ["1"])
    return version, str(pgfeed.commit_token(conn))


read_fd, write_fd = os.pipe()
pid = os.fork()
if pid == 0:
    try:
        worker_process_init.send(sender=None)
        with psycopg.connect(os.environ["APP_DSN"], autocommit=True) as conn:
            seen = []
            for _ in range(2):  # the second run's cached value must be dropped by the second write
                version, token = write(conn)
                seen.append((version, celery_app.report.apply(args=(1, token)).get(timeout=30)))
        worker_process_shutdown.send(sender=None, pid=os.getpid(), exitcode=0)
        os.write(write_fd, json.dumps({"seen": seen, "closed": celery_app.reader.position("caches") is None}).encode())
    finally:
        os._exit(0)
os.close(write_fd)
report = os.read(read_fd, 65536).decode()
os.waitpid(pid, 0)
print(json.dumps({"child": json.loads(report), "parent_opened": celery_app.items is not None}))
"""


@pytest.mark.skipif(importlib.util.find_spec("celery") is None, reason="no celery")
def test_celery_worker_process_init_opens_the_reader_in_the_forked_child(app_dir: Path, pgfeed_dsn: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", CELERY_POOL_PROCESS],
        cwd=app_dir,
        env={**os.environ, "APP_DSN": pgfeed_dsn, "PYTHONPATH": str(app_dir)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["child"]["seen"] == [[1, 1], [2, 2]], result  # each run saw its write, the cache invalidated
    assert result["child"]["closed"] is True  # by worker_process_shutdown
    assert result["parent_opened"] is False  # the main process never opened a reader
    assert "Traceback" not in done.stderr


def test_the_recipes_page_has_the_files_the_tests_run() -> None:
    assert set(recipe_files()) == {"wsgi_app.py", "gunicorn.conf.py", "asgi_app.py", "celery_app.py"}
