"""The database replaced under pgfeed: a logical restore into a fresh cluster
(pg_dump / pg_restore: the transaction ids start again lower), a physical
restore (a base backup started as a new server) and pg_upgrade to newer
majors (both keep the transaction ids)."""

from __future__ import annotations

import asyncio
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from ticking import PGFEED, daemon, wait_for_leader

import pgfeed
from pgfeed import admin
from pgfeed.testing import TestServerError, _bin_version, find_pg_bin

from .servers import Server, bin_dirs, either, pg_bin, pg_upgrade, restore_base_backup, servers, tool
from .workload import Follower, Writers, assert_in_order, end_marker, stored_rows

pytestmark = pytest.mark.timeout(180)

STREAM = "orders"
Id = tuple[str, int, int]


def _newest_tick(dsn: str) -> tuple[int, int]:
    """(id, snapshot xmax) of the newest tick."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT id, pg_snapshot_xmax(snap)::text::bigint FROM pgfeed.ticks ORDER BY id DESC LIMIT 1"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


# -- pg_dump / pg_restore into a fresh cluster -------------------------------


@dataclass
class Restored:
    old_rows: int = 0
    source_xmax: int = 0
    target_xmax: int = 0
    saved: str = ""
    newest_before: int = 0
    newest_after: int = 0
    daemon_exit: int | None = None
    daemon_stderr: str = ""
    new_rows: list[Id] = field(default_factory=list)
    wait_for: str = ""  # what a reader's wait_for did with the last new row's commit token
    held_at_return: bool = False
    followers: dict[str, Follower] = field(default_factory=dict)
    refusals: dict[str, str] = field(default_factory=dict)  # reader -> the error that refused it

    def report(self) -> str:
        lines = [
            f"dump/restore: {self.old_rows} rows restored; source xids up to {self.source_xmax}, the fresh "
            f"cluster's at {self.target_xmax}; newest tick {self.newest_before} before, {self.newest_after} after "
            f"{len(self.new_rows)} new commits; daemon exit {self.daemon_exit}, its last stderr line: "
            f"{self.daemon_stderr.strip().splitlines()[-1] if self.daemon_stderr.strip() else '(none)'}",
            f"  wait_for(last new commit) on the resumed reader: {self.wait_for} "
            f"(row held then: {self.held_at_return})",
        ]
        new = set(self.new_rows)
        for f in self.followers.values():
            lines.append(f"  {f.summary()}; new rows held {len(new & set(f.ids))} of {len(new)}")
        return "\n".join(lines)


@dataclass
class Dumped:
    path: Path
    saved: str  # a follower's position at the end of the source's history
    rows: list[Id]
    newest: int  # the newest tick's id and snapshot xmax
    xmax: int


async def _dumped_feed(made: list[Server], bin_dir: Path, tmp: Path) -> Dumped:
    """A cluster that has lived a little (xids burnt), a stream written by 4
    writers and followed to its end, dumped with pg_dump -Fc; then stopped."""
    source = Server(bin_dir, "source")
    made.append(source)
    source.init()
    src = source.create_database("feed")
    with psycopg.connect(src, autocommit=True) as conn:
        admin.create_stream(conn, STREAM)
    source.burn_xids(3000, "feed")
    with daemon(src):
        writers = Writers(src, STREAM, "old", count=4, per_writer=10).start()
        await asyncio.to_thread(writers.join)
        follower = await Follower("source", src, STREAM).start()
        try:
            await follower.wait_for(end_marker(src, STREAM))
            saved = follower.token  # with its check: it must stay valid on the restored copy
        finally:
            await follower.close()
    newest, xmax = _newest_tick(src)
    dump = tmp / "feed.dump"
    done = tool(bin_dir, "pg_dump", "-Fc", "-h", "127.0.0.1", "-p", str(source.port), "-U", "postgres",
                "-d", "feed", "-f", str(dump))  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = sorted(stored_rows(src, STREAM))
    source.stop()
    return Dumped(dump, saved, rows, newest, xmax)


async def _dump_restore(bin_dir: Path, tmp: Path) -> Restored:
    out = Restored()
    with servers() as made:
        dumped = await _dumped_feed(made, bin_dir, tmp)
        dump, out.saved, out.old_rows = dumped.path, dumped.saved, len(dumped.rows)
        out.newest_before, out.source_xmax = dumped.newest, dumped.xmax

        target = Server(bin_dir, "fresh")
        made.append(target)
        target.init()
        dst = target.create_database("feed", migrated=False)
        done = tool(bin_dir, "pg_restore", "-h", "127.0.0.1", "-p", str(target.port), "-U", "postgres",
                    "-d", "feed", "--exit-on-error", str(dump))  # fmt: skip
        assert done.returncode == 0, done.stderr
        out.target_xmax = target.xmax("feed")
        assert out.target_xmax < out.source_xmax, "the fresh cluster's xids are not behind the restored ticks"
        assert len(stored_rows(dst, STREAM)) == out.old_rows

        for name, since in (("resumed", out.saved), ("earliest", "earliest")):
            try:
                out.followers[name] = await Follower(name, dst, STREAM, since=since).start()
            except pgfeed.PgfeedError as exc:
                out.refusals[name] = str(exc)
        try:
            with daemon(dst, wait=False) as proc:
                token = None
                with psycopg.connect(dst, autocommit=True) as conn:
                    for i in range(30):
                        with conn.transaction():
                            pgfeed.append(conn, STREAM, {"phase": "new", "w": 0, "i": i})
                        out.new_rows.append(("new", 0, i))
                        token = pgfeed.commit_token(conn)
                try:
                    out.daemon_exit = await asyncio.to_thread(proc.wait, 30)
                finally:
                    assert proc.stderr is not None
                    out.daemon_stderr = proc.stderr.read() if proc.poll() is not None else "(still running)"
            out.newest_after = _newest_tick(dst)[0]
            async with pgfeed.AsyncReader(dst, ticker="off") as reader:
                try:
                    await reader.subscribe(STREAM, "earliest")
                    pos = await reader.wait_for(STREAM, str(token), timeout=5)
                    out.wait_for = f"returned {pos}"
                except (AssertionError, pgfeed.PgfeedError) as exc:
                    out.wait_for = f"{type(exc).__name__}: {exc}"
        finally:
            for f in out.followers.values():
                await f.close()
    return out


@pytest.fixture(scope="module")
def restored(tmp_path_factory: pytest.TempPathFactory) -> Restored:
    bin_dir = pg_bin("pg_dump", "pg_restore")
    out = asyncio.run(_dump_restore(bin_dir, tmp_path_factory.mktemp("dump")))
    print("\n" + out.report())
    return out


def test_the_daemon_refuses_to_tick_on_a_restored_database_in_one_line(restored: Restored) -> None:
    assert restored.daemon_exit not in (None, 0), restored.daemon_stderr
    assert "Traceback" not in restored.daemon_stderr
    errors = [line for line in restored.daemon_stderr.splitlines() if line.startswith("pgfeed: error: ")]
    assert len(errors) == 1, restored.daemon_stderr
    assert restored.daemon_stderr.strip().splitlines()[-1] == errors[0]
    assert "refusing to tick" in errors[0], errors[0]
    assert "behind the newest tick" in errors[0], errors[0]
    assert restored.newest_after == restored.newest_before, "a tick was written on snapshots that went back"


def test_readers_on_the_restored_database_refuse_it_in_one_line(restored: Restored) -> None:
    """Its new xids are below the restored ticks', so nothing a reader would
    deliver or confirm there could be trusted: readers refuse, loudly, and
    nothing is delivered out of order (the database needs a repair first)."""
    assert set(restored.refusals) == {"resumed", "earliest"}, restored.refusals
    for reason in restored.refusals.values():
        assert "behind its newest tick" in reason, reason
        assert "\n" not in reason


def test_wait_for_on_a_restored_database_does_not_return_before_the_row_is_delivered(restored: Restored) -> None:
    assert not restored.wait_for.startswith("returned"), f"wait_for {restored.wait_for}"
    assert "behind its newest tick" in restored.wait_for, restored.wait_for


# -- the repair: continue a restored database with no row skipped -----------


@dataclass
class Repaired:
    dry_run: str = ""
    refused_after_xids_passed: str = ""
    check_before_repair: tuple[int, str] = (0, "")
    repairs: list[str] = field(default_factory=list)
    window: dict[str, list[Id]] = field(default_factory=dict)
    old: list[Id] = field(default_factory=list)
    followers: dict[str, Follower] = field(default_factory=dict)


def _pgfeed(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PGFEED, "--dsn", dsn, *args], capture_output=True, text=True, timeout=120)


def _daemon_refusal(dsn: str) -> str:
    """Run the daemon; it must exit at once with one error line (returned)."""
    with daemon(dsn, wait=False) as proc:
        code = proc.wait(30)
        assert proc.stderr is not None
        stderr = proc.stderr.read()
    assert code not in (None, 0), stderr
    assert "Traceback" not in stderr, stderr
    return stderr.strip().splitlines()[-1]


async def _restore_and_repair(bin_dir: Path, tmp: Path) -> Repaired:
    """Two databases restored from one dump into a fresh cluster whose xids
    are behind; rows appended to both before anything is repaired. The first
    repair advances the cluster's xids (step 1) and moves its rows; the second
    database, whose xids have now passed its ticks', must still be refused
    (its window rows would be skipped) until its own repair moves them."""
    out = Repaired()
    with servers() as made:
        dumped = await _dumped_feed(made, bin_dir, tmp)
        dump, saved, out.old = dumped.path, dumped.saved, dumped.rows

        target = Server(bin_dir, "fresh")
        made.append(target)
        target.init()
        dsns = {}
        for name in ("one", "two"):
            dsns[name] = target.create_database(name, migrated=False)
            done = tool(bin_dir, "pg_restore", "-h", "127.0.0.1", "-p", str(target.port), "-U", "postgres",
                        "-d", name, "--exit-on-error", str(dump))  # fmt: skip
            assert done.returncode == 0, done.stderr
            out.window[name] = []
            with psycopg.connect(dsns[name], autocommit=True) as conn:
                for i in range(20 if name == "one" else 7):
                    with conn.transaction():
                        pgfeed.append(conn, STREAM, {"phase": f"window-{name}", "w": 0, "i": i})
                    out.window[name].append((f"window-{name}", 0, i))
        assert target.xmax() < _newest_tick(dsns["one"])[1], "the fresh cluster's xids are not behind"

        dry = _pgfeed(dsns["one"], "repair", "--after-restore", "--dry-run")
        assert dry.returncode == 0, dry.stderr
        out.dry_run = dry.stdout.strip()
        for name in ("one", "two"):
            if name == "two":
                assert target.xmax() > _newest_tick(dsns["two"])[1], "the first repair did not advance the xids"
                out.refused_after_xids_passed = _daemon_refusal(dsns["two"])
                checked = _pgfeed(dsns["two"], "check")
                out.check_before_repair = (checked.returncode, checked.stdout + checked.stderr)
            done = _pgfeed(dsns[name], "repair", "--after-restore")
            assert done.returncode == 0, done.stderr
            out.repairs.append(done.stdout.strip())
            again = _pgfeed(dsns[name], "repair", "--after-restore")
            assert again.stdout.strip().startswith("nothing to repair"), again.stdout + again.stderr
            with daemon(dsns[name]):
                for f_name, since in (("earliest", "earliest"), ("resumed", saved)):
                    f = await Follower(f"{name}-{f_name}", dsns[name], STREAM, since=since).start()
                    out.followers[f"{name}-{f_name}"] = f
                    try:
                        await f.wait_for(end_marker(dsns[name], STREAM))
                    finally:
                        await f.close()
    return out


async def test_repair_after_restore_delivers_every_row_appended_before_it_after_the_restored_history(
    tmp_path: Path,
) -> None:
    bin_dir = pg_bin("pg_dump", "pg_restore")
    out = await _restore_and_repair(bin_dir, tmp_path)
    assert out.dry_run.startswith("would repair: "), out.dry_run
    assert "would advance" in out.dry_run, out.dry_run
    assert "move 20 rows" in out.dry_run, out.dry_run
    assert out.repairs[0].startswith("repaired: advanced "), out.repairs
    assert out.repairs[0].endswith("moved 20 rows to the next tick"), out.repairs
    # The xids passed the second database's ticks; its window rows are still
    # there, so the ticker still refuses (it no longer lifts by itself).
    assert out.refused_after_xids_passed.startswith("pgfeed: error: "), out.refused_after_xids_passed
    assert "7 rows were appended" in out.refused_after_xids_passed, out.refused_after_xids_passed
    assert "pgfeed repair --after-restore" in out.refused_after_xids_passed
    code, said = out.check_before_repair
    assert code == 1, said
    assert said.startswith("pgfeed: error: unhealthy: ticker refuses to tick: 7 rows were appended"), said
    assert out.repairs[1] == "repaired: moved 7 rows to the next tick", out.repairs
    for name in ("one", "two"):
        window = out.window[name]
        earliest, resumed = out.followers[f"{name}-earliest"], out.followers[f"{name}-resumed"]
        for f in (earliest, resumed):
            assert f.reset_batches == 0, f.summary()
            assert_in_order(f)
            assert len(set(f.ids)) == len(f.ids), f"{f.name}: a row twice"
        # The whole restored history, then what was appended before the repair, in append order.
        assert sorted(earliest.ids[: len(out.old)]) == out.old, earliest.summary()
        assert earliest.ids[len(out.old) :] == window, earliest.summary()
        assert resumed.ids == window, resumed.summary()


# -- capture after a logical restore ------------------------------------------


def test_a_capture_whose_columns_a_restore_renumbered_fails_loudly(tmp_path: Path) -> None:
    """pg_dump renumbers the columns of a table that had dropped ones; the
    capture's attribute numbers then name other columns. The write must fail
    in one line naming the capture, never append a wrong key."""
    bin_dir = pg_bin("pg_dump", "pg_restore")
    with servers() as made:
        server = Server(bin_dir, "one")
        made.append(server)
        server.init()
        src = server.create_database("shop")
        with psycopg.connect(src, autocommit=True) as conn:
            conn.execute("CREATE TABLE items (junk int, id int PRIMARY KEY, v text)")
            conn.execute("ALTER TABLE items DROP COLUMN junk")
            admin.create_stream(conn, "items")
            admin.capture(conn, "public", "items", "items")
            conn.execute("INSERT INTO items VALUES (1, 'a')")
        dump = tmp_path / "shop.dump"
        done = tool(bin_dir, "pg_dump", "-Fc", "-h", "127.0.0.1", "-p", str(server.port), "-U", "postgres",
                    "-d", "shop", "-f", str(dump))  # fmt: skip
        assert done.returncode == 0, done.stderr
        dst = server.create_database("copy", migrated=False)
        done = tool(bin_dir, "pg_restore", "-h", "127.0.0.1", "-p", str(server.port), "-U", "postgres",
                    "-d", "copy", "--exit-on-error", str(dump))  # fmt: skip
        assert done.returncode == 0, done.stderr
        with psycopg.connect(dst, autocommit=True) as conn:
            numbers = conn.execute(
                "SELECT attname, attnum FROM pg_attribute WHERE attrelid = 'items'::regclass AND attnum > 0"
            ).fetchall()
            assert dict(numbers) == {"id": 1, "v": 2}, numbers  # renumbered: the capture said id is 2
            before = conn.execute("SELECT count(*) FROM pgfeed.events").fetchone()
            with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState) as caught:
                conn.execute("INSERT INTO items VALUES (2, 'b')")
            message = caught.value.diag.message_primary or ""
            assert message.startswith("pgfeed: capture of public.items into stream 'items': column id is now"), message
            assert "run pgfeed capture again" in message, message
            assert conn.execute("SELECT count(*) FROM pgfeed.events").fetchone() == before
            # Capturing again resolves the columns anew: events are right again.
            admin.capture(conn, "public", "items", "items")
            conn.execute("UPDATE items SET v = 'a2' WHERE id = 1")
            (payload,) = conn.execute("SELECT payload FROM pgfeed.events ORDER BY seq DESC LIMIT 1").fetchone()
            assert payload["key"] == {"id": 1}, payload
            assert payload["row"] == {"id": 1, "v": "a2"}, payload
            assert "old_key" not in payload, payload


# -- a physical restore and pg_upgrade keep the transaction ids --------------


@dataclass
class Continued:
    """A feed carried over to a replacement server with the same history."""

    before: list[Id] = field(default_factory=list)
    after: list[Id] = field(default_factory=list)
    stored: list[Id] = field(default_factory=list)
    saved: str = ""
    followers: dict[str, Follower] = field(default_factory=dict)
    version: str = ""

    def report(self, what: str) -> str:
        lines = [
            f"{what}: {len(self.before)} rows before, {len(self.after)} after; new server {self.version} holds "
            f"{len(self.stored)}; resumed from {self.saved}"
        ]
        lines += [f"  {f.summary()}" for f in self.followers.values()]
        return "\n".join(lines)


async def _carry_over(source: Server, replacement: Server, replace: Any) -> Continued:
    """Feed on ``source``; ``replace()`` makes ``replacement`` its successor;
    the feed goes on there. A live follower connects through a DSN listing
    both servers; a reader resumes from the token it had reached."""
    out = Continued()
    src = source.create_database("feed")
    with psycopg.connect(src, autocommit=True) as conn:
        admin.create_stream(conn, STREAM)
    dst = replacement.dsn("feed")
    both = either(source, replacement, "feed")
    live = await Follower("live", both, STREAM).start()
    out.followers["live"] = live
    try:
        with daemon(src):
            writers = Writers(src, STREAM, "before", count=4, per_writer=20).start()
            await asyncio.to_thread(writers.join)
            assert not writers.errors
            out.before = writers.committed
            await live.wait_for(end_marker(src, STREAM))
            out.saved = live.token  # with its check: it must stay valid on the successor
            assert "~" in out.saved
        await asyncio.to_thread(replace)
        out.version = str(replacement.query("SHOW server_version")[0][0])
        with daemon(dst, wait=False):
            await asyncio.to_thread(wait_for_leader, dst, kind="daemon")
            writers = Writers(dst, STREAM, "after", count=4, per_writer=20).start()
            await asyncio.to_thread(writers.join)
            assert not writers.errors
            out.after = writers.committed
            resumed = await Follower("resumed", dst, STREAM, since=out.saved).start()
            out.followers["resumed"] = resumed
            token = end_marker(dst, STREAM)
            await live.wait_for(token)
            await resumed.wait_for(token)
        out.stored = stored_rows(dst, STREAM)
    finally:
        for f in out.followers.values():
            await f.close()
    return out


def _check_continued(out: Continued) -> None:
    live, resumed = out.followers["live"], out.followers["resumed"]
    assert sorted(out.stored) == sorted(out.before + out.after)
    assert live.reset_batches == 0, live.summary()
    assert resumed.reset_batches == 0, resumed.summary()
    assert sorted(live.ids) == sorted(out.stored), live.summary()
    assert len(live.delivered) == len(out.stored), "the live follower delivered rows twice"
    assert sorted(resumed.ids) == sorted(out.after), resumed.summary()  # exactly the rows after the token
    assert_in_order(live)
    assert_in_order(resumed)
    tail = [(r.position, r.xid, r.seq) for r in live.rows if r.payload["phase"] == "after"]
    assert [(r.position, r.xid, r.seq) for r in resumed.rows] == tail


async def test_a_base_backup_restored_as_a_new_server_continues_the_feed_with_no_reset() -> None:
    bin_dir = pg_bin("pg_basebackup")
    with servers() as made:
        source = Server(bin_dir, "source")
        restored = Server(bin_dir, "restored")
        made += [source, restored]
        source.init()

        def replace() -> None:
            restore_base_backup(source, restored)
            source.stop()

        out = await _carry_over(source, restored, replace)
    print("\n" + out.report("base backup"))
    _check_continued(out)


def _upgrade_targets() -> list[str]:
    """Majors newer than the local binaries the tests use (collected without starting anything)."""
    try:
        found = find_pg_bin()
    except TestServerError:
        found = None
    old = _bin_version(found) if found is not None else ""
    newer = [v for v in bin_dirs() if v.isdigit() and old.isdigit() and int(v) > int(old)]
    return sorted(newer, key=int) or ["none"]


@pytest.mark.parametrize("target", _upgrade_targets())
async def test_pg_upgrade_to_a_newer_major_continues_the_feed_with_no_reset(target: str) -> None:
    bin_dir = pg_bin("pg_basebackup")
    old_major = _bin_version(bin_dir)
    newer = {v: p for v, p in bin_dirs().items() if v.isdigit() and old_major.isdigit() and int(v) > int(old_major)}
    if target not in newer:
        pytest.skip(f"pg_upgrade needs a PostgreSQL newer than {old_major} ({bin_dir}); found none locally")
    if not (newer[target] / "pg_upgrade").exists():
        pytest.skip(f"no pg_upgrade in {newer[target]}")
    with servers() as made:
        source = Server(bin_dir, f"pg{old_major}")
        upgraded = Server(newer[target], f"pg{target}")
        made += [source, upgraded]
        source.init()
        out = await _carry_over(source, upgraded, lambda: pg_upgrade(source, upgraded))
    print("\n" + out.report(f"pg_upgrade {old_major} -> {target}"))
    assert out.version.split(".")[0] == target
    _check_continued(out)
