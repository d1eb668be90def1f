"""pgfeed.Cache: fills cannot race invalidations, resets clear, read-your-writes through tokens."""

from __future__ import annotations

import asyncio
import os
import queue
import threading
import time
from typing import Any

import psycopg
import pytest
from test_sync_reader import in_child

import pgfeed
from pgfeed import admin
from pgfeed.errors import ForkedReader, ReaderClosed


@pytest.fixture
def items(pgfeed_conn: psycopg.Connection[Any]) -> str:
    pgfeed_conn.execute("CREATE TABLE items (id int PRIMARY KEY, version int NOT NULL)")
    pgfeed_conn.execute("INSERT INTO items SELECT g, 0 FROM generate_series(1, 3) g")
    return "items"


def update(conn: psycopg.Connection[Any], key: int) -> tuple[int, str]:
    """Bump the row and invalidate its key in one transaction: (new version, commit token)."""
    with conn.transaction():
        row = conn.execute("UPDATE items SET version = version + 1 WHERE id = %s RETURNING version", (key,)).fetchone()
        pgfeed.invalidate(conn, "items", [str(key)])
    assert row is not None
    return int(row[0]), str(pgfeed.commit_token(conn))


def test_a_fill_that_races_an_invalidation_is_never_stored(
    pgfeed_dsn: str, items: str, pgfeed_conn: psycopg.Connection[Any]
) -> None:
    """The issue's widened fill window: every loader sleeps 20 ms between its
    SELECT and returning, while a writer thread updates and invalidates as fast
    as this process applies the invalidations. A read that starts after this
    process applied an invalidation must see at least the version that
    invalidation was for; a token read must see its write."""
    keys = (1, 2)
    writes = 400
    applied = dict.fromkeys(keys, 0)  # version whose invalidation this process has applied
    stale: list[str] = []
    lock = threading.Lock()
    done = threading.Event()
    tokens: queue.Queue[tuple[int, int, str] | None] = queue.Queue()
    local = threading.local()

    def loader(key: int) -> int:
        if not hasattr(local, "conn"):
            local.conn = psycopg.connect(pgfeed_dsn, autocommit=True)
        row = local.conn.execute("SELECT version FROM items WHERE id = %s", (key,)).fetchone()
        time.sleep(0.02)  # the fill window, widened
        return int(row[0])

    with pgfeed.Reader(pgfeed_dsn) as reader:
        cache = reader.cache("items")

        def plain_reads(n: int) -> None:
            while not done.is_set():
                key = keys[n % len(keys)]
                n += 1
                with lock:
                    floor = applied[key]
                got = cache.get(key, loader)
                assert got is not None
                if got < floor:
                    with lock:
                        stale.append(f"plain read of {key}: {got} < {floor}")
                time.sleep(0.001)  # pacing, not synchronisation: hits would otherwise starve the reader's thread

        token_reads: list[int] = []

        def token_read() -> None:
            while (item := tokens.get()) is not None:
                key, version, token = item
                got = cache.get(key, loader, after=token)  # waits until the invalidation is applied here
                token_reads.append(version)
                if got is None or got < version:
                    with lock:
                        stale.append(f"token read of {key}: {got} < {version}")

        threads = [threading.Thread(target=plain_reads, args=(n,)) for n in range(4)]
        threads += [threading.Thread(target=token_read) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            with psycopg.connect(pgfeed_dsn, autocommit=True) as writer:
                for i in range(writes):
                    key = keys[i % len(keys)]
                    version, token = update(writer, key)
                    tokens.put((key, version, token))
                    reader.wait_for("caches", token, timeout=10)
                    with lock:
                        applied[key] = version
        finally:
            for _ in range(2):
                tokens.put(None)
            done.set()
            for t in threads:
                t.join(30)
        # Settled: what the cache holds is what the table holds.
        final = dict(pgfeed_conn.execute("SELECT id, version FROM items").fetchall())
        for key in keys:
            assert cache.get(key, loader) == final[key]
    assert len(token_reads) == writes
    assert stale == []
    assert final == {1: writes // 2, 2: writes // 2, 3: 0}


def test_a_fill_started_before_an_invalidation_is_returned_but_not_stored(
    pgfeed_dsn: str, items: str, pgfeed_conn: psycopg.Connection[Any]
) -> None:
    """The race made deterministic: the loader itself commits an update and
    waits until its invalidation has been applied, then returns the old row."""
    with pgfeed.Reader(pgfeed_dsn) as reader:
        cache = reader.cache("items")

        def loader(key: str) -> int:
            row = pgfeed_conn.execute("SELECT version FROM items WHERE id = %s", (int(key),)).fetchone()
            assert row is not None
            _, token = update(pgfeed_conn, int(key))
            reader.wait_for("caches", token, timeout=10)
            return int(row[0])

        assert cache.get(1, loader) == 0  # the caller gets what it loaded...
        assert 1 not in cache  # ...but the stale value is not kept
        assert cache.get(1, lambda k: 99) == 99  # the next read fills again
        assert cache[1] == 99
        _, token = update(pgfeed_conn, 1)
        assert cache.get(1, after=token) is None  # invalidated: gone
        assert len(cache) == 0


async def test_the_async_cache_invalidates_serves_tokens_and_clears_on_reset(
    pgfeed_dsn: str, items: str, pgfeed_conn: psycopg.Connection[Any]
) -> None:
    loads: list[object] = []

    async def loader(key: str) -> int:
        loads.append(key)
        cur = await aconn.execute("SELECT version FROM items WHERE id = %s", (int(key),))
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])

    async with await psycopg.AsyncConnection.connect(pgfeed_dsn, autocommit=True) as aconn:
        async with pgfeed.AsyncReader(pgfeed_dsn) as reader:
            cache = await reader.cache("items")
            other = await reader.cache("other")
            assert await cache.get(1, loader) == 0
            assert await cache.get(1, loader) == 0
            assert await cache.get(2, loader) == 0
            assert await other.get(1, lambda k: "x") == "x"
            assert loads == [1, 2]
            version, token = await asyncio.to_thread(update, pgfeed_conn, 1)
            assert await cache.get(1, loader, after=token) == version
            assert loads == [1, 2, 1]
            assert sorted(cache.keys()) == ["1", "2"]
            assert "1" in other  # another cache name is not touched
            # The whole cache: keys=None.
            with pgfeed_conn.transaction():
                pgfeed.invalidate(pgfeed_conn, "items", None)
            await reader.wait_for("caches", pgfeed.commit_token(pgfeed_conn), timeout=10)
            assert len(cache) == 0
            assert len(other) == 1
            # A reset of the caches stream (dropped and recreated) clears every cache.
            await cache.get(3, loader)
            assert len(cache) == 1
            admin.drop_stream(pgfeed_conn, "caches")
            admin.create_stream(pgfeed_conn, "caches")
            with pgfeed_conn.transaction():  # a row of the new incarnation, delivered after the reset
                pgfeed.invalidate(pgfeed_conn, "unrelated", ["x"])
            await reader.wait_for("caches", pgfeed.commit_token(pgfeed_conn), timeout=15)
            assert len(cache) == 0
            assert len(other) == 0
        with pytest.raises(ReaderClosed, match="make a new cache"):
            await cache.get(1, loader)


def test_a_sync_cache_refuses_to_serve_after_its_reader_closed(pgfeed_dsn: str) -> None:
    reader = pgfeed.Reader(pgfeed_dsn).open()
    cache = pgfeed.Cache(reader, "items")
    assert cache.get("a", lambda k: 1) == 1
    reader.close()
    with pytest.raises(ReaderClosed, match="make a new cache"):
        cache.get("a")


def refused_in_a_fork(cache: pgfeed.Cache[Any] | pgfeed.AsyncCache[Any], get: Any) -> str:
    """What a child forked from this process gets from ``cache``: it must refuse at once."""
    parent = os.getpid()

    def child() -> None:
        started = time.monotonic()
        for call in (get, lambda: "1" in cache, lambda: cache["1"]):
            with pytest.raises(ForkedReader, match=f"opened in process {parent} before a fork"):
                call()
        assert time.monotonic() - started < 1

    return in_child(child)


def test_a_cache_inherited_through_fork_refuses_at_once(pgfeed_dsn: str, items: str) -> None:
    with pgfeed.Reader(pgfeed_dsn) as reader:
        cache = reader.cache("items")
        assert cache.get("1", lambda key: "cached in the parent") == "cached in the parent"
        # The child's copy would never be invalidated: it must not serve it.
        assert refused_in_a_fork(cache, lambda: cache.get("1")) == "ok"
        assert cache.get("1") == "cached in the parent"  # the parent's cache is untouched


async def test_an_async_cache_inherited_through_fork_refuses_at_once(pgfeed_dsn: str, items: str) -> None:
    async with pgfeed.AsyncReader(pgfeed_dsn) as reader:
        cache = await reader.cache("items")
        assert await cache.get("1", lambda key: "cached in the parent") == "cached in the parent"
        # A coroutine refuses before its first await: no event loop needed in the child.
        assert refused_in_a_fork(cache, lambda: cache.get("1").send(None)) == "ok"
        assert await cache.get("1") == "cached in the parent"
