-- Every statement pgfeed's Python sends, by name (see pgfeed/queries.py).
--
-- A query starts at its "-- name:" line; the comment lines right after it say
-- what it does. %s and %(name)s are psycopg parameters (in a query run with
-- parameters a literal percent sign is %%). {} placeholders are filled in
-- Python through pgfeed.queries.template: with identifiers (sql.Identifier),
-- a literal (sql.Literal), or the session_columns fragment. The functions
-- called here are defined by pgfeed/migrations/; their _vN suffix is bumped
-- on any change, so that a process of the previous release keeps working
-- during a rolling upgrade.


-- ==== The reader (pgfeed/store.py) ====

-- name: read_live
-- What a woken reader learns in one read-only round trip: ticks from the
-- known head on, the newest tick, the followed streams' incarnations, and
-- the rows from the known head to the newest tick for streams standing at
-- the known head.
SELECT * FROM pgfeed.read_live_v4(%s, %s::text[], %s::bigint[], %s::integer)

-- name: fetch_ticks
-- Ticks first..last inclusive, ascending.
SELECT id, snap::text, seq_lo, seq_hi, fp FROM pgfeed.ticks WHERE id >= %s AND id <= %s ORDER BY id

-- name: fetch_rows
-- One round trip: the stream's floor and the interval's rows in seq order
-- (pgfeed.interval_rows_v2). The floor is read in the same snapshot as the
-- rows: if a prune committed before that snapshot the floor says so; if
-- after, the rows are whole.
SELECT r.*, f.floor_tick
  FROM (SELECT floor_tick FROM pgfeed.streams WHERE id = %(sid)s) f
  LEFT JOIN LATERAL pgfeed.interval_rows_v2(
      %(sid)s, %(a)s::pg_snapshot, %(a_lo)s, %(b)s::pg_snapshot, %(b_hi)s, %(after)s, %(limit)s) r ON true

-- name: load_position
-- The position this role saved for a consumer on a stream.
SELECT token, tick_fp FROM pgfeed.positions WHERE owner = current_user AND consumer = %s AND stream = %s

-- name: save_position
-- Upsert this role's saved position of a consumer on a stream.
INSERT INTO pgfeed.positions (consumer, stream, token, tick_fp) VALUES (%s, %s, %s, %s)
 ON CONFLICT (owner, consumer, stream) DO UPDATE
 SET token = excluded.token, tick_fp = excluded.tick_fp, updated_at = now()

-- name: head_tick_id
-- The newest tick's id, 0 before the first tick (read-only: ticks are the
-- ticker's business).
SELECT coalesce(max(id), 0) FROM pgfeed.ticks

-- name: resolve_token
-- The newest tick's id if it covers a commit token, else NULL; an error for
-- a token from the future.
SELECT pgfeed.resolve_token_v2(%s)

-- name: snapshot_token
-- A commit token covering every transaction that has ended so far.
SELECT 's' || pg_current_snapshot()::text

-- name: tick_facts
-- What a position token's tick is, in one snapshot: its fingerprint, and for
-- a partial token whether the stream has a row with that seq in the tick's
-- interval (visible in tick n, not in tick n - 1), with the stream's floor.
SELECT t.id IS NOT NULL, t.fp,
       %(seq)s::bigint IS NOT NULL AND EXISTS (
           SELECT FROM pgfeed.events e JOIN pgfeed.ticks a ON a.id = t.id - 1
            WHERE e.stream_id = %(sid)s AND e.seq = %(seq)s
              AND pg_visible_in_snapshot(e.xid, t.snap) AND NOT pg_visible_in_snapshot(e.xid, a.snap)),
       (SELECT s.floor_tick FROM pgfeed.streams s WHERE s.id = %(sid)s)
  FROM (VALUES (1)) one LEFT JOIN pgfeed.ticks t ON t.id = %(tick)s


-- ==== The write side (pgfeed/writer.py) ====

-- name: append
-- Append one payload to a stream in the caller's transaction; its seq.
SELECT pgfeed.append_v2(%s, %s::jsonb, %s)

-- name: append_many
-- Append many payloads (JSON texts) in one call, all or nothing; how many.
SELECT pgfeed.append_many_v2(%s, %s::text[]::jsonb[], %s::text[])

-- name: invalidate
-- Append an invalidation of a cache's keys (NULL: the whole cache) to the
-- built-in caches stream.
SELECT pgfeed.invalidate_v2(%s, %s::text[])

-- name: commit_token
-- A snapshot token covering everything committed so far, this connection's
-- last transaction included.
SELECT pgfeed.commit_token_v2()


-- ==== Sessions (pgfeed/ticker.py, pgfeed/reader.py, pgfeed/listener.py) ====

-- name: set_synchronous_commit_on
-- A tick (a saved position) is durable before anyone is told of it.
SET synchronous_commit = on

-- name: set_read_committed_default
-- pgfeed's functions that take a tick need READ COMMITTED, whatever the
-- server's default isolation.
SET default_transaction_isolation = 'read committed'

-- name: set_statement_timeout
-- Cut a statement that hangs (a lock, a half-open link); {} is milliseconds.
SET statement_timeout = {}

-- name: set_application_name_ticker
-- How `pgfeed status` recognises the ticker's own connection.
SET application_name = 'pgfeed ticker'

-- name: set_generic_plans
-- The reader's and the ticker's statements run with the same plan whatever
-- their parameters (the plpgsql functions' own statements included).
SET plan_cache_mode = force_generic_plan

-- name: listen
-- LISTEN on channel {} (an identifier).
LISTEN {}

-- name: notify_self
-- The listener's probe: a NOTIFY to its own channel proves the connection answers.
SELECT pg_notify(%s, '')


-- ==== The ticker (pgfeed/ticker.py) ====

-- name: ticker_claim
-- Claim the ticker lease (holder, kind, lease ms): the new term, or no row
-- while another candidate holds it.
SELECT term FROM pgfeed.ticker_claim_v2(%s, %s, %s)

-- name: ticker_renew
-- Renew the lease of a term (term, lease ms): false once another took it.
SELECT pgfeed.ticker_renew_v2(%s, %s)

-- name: ticker_resign
-- Give up the lease of a term, so that another candidate takes over at once.
SELECT pgfeed.ticker_resign_v2(%s)

-- name: tick
-- Take a tick if some row became visible (no row otherwise); refused with
-- SQLSTATE PF001 when the term was superseded. The only place pgfeed's
-- Python takes a tick.
SELECT id FROM pgfeed.tick_v2(%s)

-- name: await_change
-- Wait in the server (timeout ms, checking every poll ms) until some row may
-- have become visible since the newest tick: true, or false at the timeout.
SELECT pgfeed.await_change_v4(%s, %s)


-- ==== Operations (pgfeed/daemon.py, pgfeed/retention.py, pgfeed/repair.py) ====

-- name: has_ticker_schema
-- Whether the schema is migrated far enough for the ticker.
SELECT to_regclass('pgfeed.ticker') IS NOT NULL

-- name: prune
-- Delete the events and ticks older than an interval (protect_consumers,
-- dry_run): the new floor, what was deleted, whether a consumer held it back.
SELECT * FROM pgfeed.prune_v2(%s, %s, %s)

-- name: history_break
-- Why this database's ticks cannot be continued (a restore into another
-- cluster), or NULL.
SELECT pgfeed._history_break_v3()

-- name: restore_state
-- The repair's view of a restored database: why ticks cannot continue, the
-- newest tick's xmax and the server's.
SELECT pgfeed._history_break_v3(),
       (SELECT pg_snapshot_xmax(t.snap)::text::bigint FROM pgfeed.ticks t ORDER BY t.id DESC LIMIT 1),
       pg_snapshot_xmax(pg_current_snapshot())::text::bigint

-- name: repair_count
-- How many rows the repair would move (repair_restamp_v3's dry run: it
-- counts them under the tick lock and changes nothing).
SELECT pgfeed.repair_restamp_v3(true)

-- name: set_synchronous_commit_off
-- Burning transaction ids need not wait for the disk.
SET synchronous_commit = off

-- name: advance_xids
-- Burn transaction ids until the server's pass the given xid8 (as text).
CALL pgfeed.advance_xids_v3(%s::text::xid8)

-- name: reset_synchronous_commit
-- Back to the session's default.
RESET synchronous_commit

-- name: repair_restamp
-- Give the rows the restored ticks wrongly count as delivered this
-- transaction's id; how many.
SELECT pgfeed.repair_restamp_v3(false)


-- ==== Stream administration (pgfeed/admin.py) ====

-- name: stream_id
-- The id of a stream, by name (no row: no such stream).
SELECT id FROM pgfeed.streams WHERE name = %s

-- name: set_transaction_read_committed
-- create_stream_v2 takes a tick: READ COMMITTED whatever the session's default.
SET TRANSACTION ISOLATION LEVEL READ COMMITTED

-- name: create_stream
-- Create a stream (name, max payload bytes, notify mode); its id.
SELECT pgfeed.create_stream_v2(%s, %s, %s)

-- name: list_streams
SELECT id, name, notify_mode, max_payload_bytes FROM pgfeed.streams ORDER BY name

-- name: stream_rows
-- A stream's row count and last append time, through the parent table:
-- readers may read it, not the partitions.
SELECT count(*), max(created_at)::text FROM pgfeed.events WHERE stream_id = %s

-- name: lock_stream
-- The id of a stream about to be dropped, locked until the drop commits.
SELECT id FROM pgfeed.streams WHERE name = %s FOR UPDATE

-- name: drop_partition
-- Drop a stream's partition {} (pgfeed.events_<id>) and its rows.
DROP TABLE {}

-- name: delete_stream
DELETE FROM pgfeed.streams WHERE id = %s

-- name: role_exists
SELECT 1 FROM pg_roles WHERE rolname = %s

-- name: record_grant
-- Remember a grant (kind, stream id or NULL for all, role name) by role oid,
-- so that streams created later inherit "all streams" grants.
INSERT INTO pgfeed.role_grants (role_oid, kind, stream_id)
 SELECT oid, %s, %s FROM pg_roles WHERE rolname = %s ON CONFLICT DO NOTHING

-- name: all_stream_ids
SELECT id FROM pgfeed.streams

-- name: grant_schema_usage
-- Every grant starts here: role {} may use the pgfeed schema.
GRANT USAGE ON SCHEMA pgfeed TO {}

-- name: grant_writer_streams
GRANT SELECT ON pgfeed.streams TO {}

-- name: grant_writer_sequence
GRANT USAGE ON SEQUENCE pgfeed.event_seq TO {}

-- name: grant_writer_events
-- append_v2 inserts through the parent table; the events_append policy
-- limits it to the granted streams.
GRANT INSERT (stream_id, key, payload) ON pgfeed.events TO {}

-- name: grant_writer_role_grants
GRANT SELECT ON pgfeed.role_grants TO {}

-- name: grant_writer_functions
-- This release's write functions, then the previous release's writers',
-- during a rolling upgrade.
GRANT EXECUTE ON FUNCTION pgfeed.append_v2(text, jsonb, text),
 pgfeed.append_many_v2(text, jsonb[], text[]), pgfeed.append(text, jsonb, text),
 pgfeed.append_many(text, jsonb[], text[]), pgfeed.invalidate_v2(text, text[]),
 pgfeed.commit_token_v2(), pgfeed.commit_token(),
 pgfeed.append_v1(text, jsonb, text), pgfeed.append_many_v1(text, jsonb[], text[]),
 pgfeed.invalidate_v1(text, text[]), pgfeed.tick_v1() TO {}

-- name: grant_writer_partition
-- Let a role insert into one stream's partition: ON {partition} TO {role}.
GRANT INSERT (key, payload) ON {} TO {}

-- name: grant_reader_tables
GRANT SELECT ON pgfeed.streams, pgfeed.ticks, pgfeed.events, pgfeed.ticker TO {}

-- name: grant_reader_positions
GRANT SELECT, INSERT, UPDATE, DELETE ON pgfeed.positions TO {}

-- name: grant_reader_functions
GRANT EXECUTE ON FUNCTION pgfeed.read_live_v2(bigint, text[], bigint[], integer),
 pgfeed.read_live_v3(bigint, text[], bigint[], integer), pgfeed.read_live_v4(bigint, text[], bigint[], integer),
 pgfeed.interval_rows_v2(bigint, pg_snapshot, bigint, pg_snapshot, bigint, bigint, integer),
 pgfeed.resolve_token_v2(text), pgfeed.consumer_heartbeat_v2(text, text) TO {}

-- name: grant_ticker_lease
GRANT SELECT ON pgfeed.ticker TO {}

-- name: grant_ticker_functions
GRANT EXECUTE ON FUNCTION pgfeed.tick_v2(bigint, boolean), pgfeed.await_change_v4(integer, integer),
 pgfeed.ticker_claim_v2(text, text, integer), pgfeed.ticker_renew_v2(bigint, integer),
 pgfeed.ticker_resign_v2(bigint), pgfeed.prune_v2(interval, boolean, boolean) TO {}

-- name: captured_tables
-- (schema, table) of every table captured into a stream (its row and
-- TRUNCATE trigger names); the clones of a partitioned table's triggers on
-- its partitions are not listed. Both this release's capture function and
-- the previous release's count: their triggers keep working until the
-- table is captured again. A partition's own TRUNCATE trigger belongs to its
-- captured ancestor's capture.
SELECT DISTINCT n.nspname, c.relname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
 JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE t.tgname IN (%s, %s) AND t.tgparentid = 0
   AND t.tgfoid IN ('pgfeed.capture_v2()'::regprocedure, 'pgfeed.capture_v1()'::regprocedure)
   AND NOT EXISTS (SELECT 1 FROM pg_partition_ancestors(c.oid) a JOIN pg_trigger p
                    ON p.tgrelid = a.relid AND p.tgname = t.tgname WHERE a.relid <> c.oid)
 ORDER BY 1, 2

-- name: table_tree
-- (schema, table) of a table (oid) and, for a partitioned table, of every
-- partition below it (the same oid again), top down.
SELECT n.nspname, c.relname FROM (SELECT %s::oid AS relid, 0 AS level
  UNION SELECT relid, level FROM pg_partition_tree(%s)) t
 JOIN pg_class c ON c.oid = t.relid JOIN pg_namespace n ON n.oid = c.relnamespace ORDER BY t.level, 1, 2

-- name: capture_triggers
-- The capture triggers (row and TRUNCATE trigger names) on a table (oid)
-- and its partitions (the same oid again): name, schema, table.
SELECT t.tgname, n.nspname, c.relname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
 JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE t.tgname IN (%s, %s) AND t.tgparentid = 0
   AND (t.tgrelid = %s OR t.tgrelid IN (SELECT relid FROM pg_partition_tree(%s)))

-- name: drop_trigger
-- Drop trigger {} on table {}.
DROP TRIGGER {} ON {}

-- name: table_oid
-- The oid and relkind of schema.table.
SELECT c.oid, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = %s AND c.relname = %s

-- name: table_columns
-- The name and number of each live column of a table (oid).
SELECT attname, attnum FROM pg_attribute WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped

-- name: primary_key
-- The primary key columns of a table (oid), in key order.
SELECT a.attname FROM pg_index i JOIN pg_attribute a
 ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
 WHERE i.indrelid = %s AND i.indisprimary ORDER BY array_position(i.indkey, a.attnum)

-- name: create_capture_trigger
-- The row trigger {} of a capture: AFTER {operations} ON {table}, calling
-- pgfeed.capture_v2 with {arguments} (see pgfeed/migrations/0005_capture.sql).
CREATE TRIGGER {} AFTER {} ON {} FOR EACH ROW EXECUTE FUNCTION pgfeed.capture_v2({})

-- name: create_truncate_trigger
-- The TRUNCATE trigger {} of a capture on table {}, with the capture's
-- {arguments}. Statement triggers are not cloned to partitions, and TRUNCATE
-- of one partition fires only that partition's triggers: each has its own.
CREATE TRIGGER {} AFTER TRUNCATE ON {} FOR EACH STATEMENT EXECUTE FUNCTION pgfeed.capture_v2({})


-- ==== Status (pgfeed/status.py) and migrations (pgfeed/migrator.py) ====

-- name: has_schema_version
-- Whether pgfeed was ever installed in this database.
SELECT to_regclass('pgfeed.schema_version') IS NOT NULL

-- name: schema_version
-- The newest applied migration.
SELECT max(version) FROM pgfeed.schema_version

-- name: set_transaction_repeatable_read_only
-- The status report's numbers, read in one snapshot, agree with each other.
SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY

-- name: set_local_jit_off
-- Small reports: compiling would cost more than running.
SET LOCAL jit = off

-- name: status_ticker
SELECT * FROM pgfeed.status_ticker_v2()

-- name: status_streams
-- Every stream (names, or NULL for all) with its counts over a recent
-- window (seconds).
SELECT * FROM pgfeed.status_streams_v2(%s::text[], make_interval(secs => %s))

-- name: status_committed_after
-- Rows each (stream id, xid) pair wrote, for the open writers that hold a
-- stream back.
SELECT stream_id, xid::text, row_count FROM pgfeed.status_committed_after_v2(%s::bigint[], %s::xid8[])

-- name: status_consumers
-- Every saved consumer position (of the streams named, or NULL for all).
SELECT * FROM pgfeed.status_consumers_v2(%s::text[])

-- name: session_columns
-- Not a statement: the columns of a session ({columns} below) read from
-- pg_stat_activity a. The horizon a session holds is the older of its
-- snapshot's xmin and its own xid.
a.pid, a.datname, a.usename, a.application_name, host(a.client_addr), a.backend_start,
       a.xact_start, a.state, a.query, a.backend_xid::text, greatest(age(a.backend_xmin), age(a.backend_xid))

-- name: stream_writers
-- Open transactions holding a RowExclusiveLock on a stream's partition (the
-- partitions' oids): they wrote to it (an INSERT routed there), or are writing.
SELECT l.relation::bigint, {columns}
  FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
 WHERE l.locktype = 'relation' AND l.granted AND l.mode = 'RowExclusiveLock'
   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
   AND l.relation = ANY (%s::oid[]) AND l.pid <> pg_backend_pid()
 ORDER BY a.xact_start NULLS LAST, l.pid

-- name: pgfeed_sessions
-- pgfeed's own sessions in this database (by application_name).
SELECT {columns} FROM pg_stat_activity a
 WHERE a.datname = current_database() AND a.application_name LIKE 'pgfeed %%' AND a.pid <> pg_backend_pid()
 ORDER BY a.application_name, a.pid

-- name: xmin_sessions
-- Sessions of any database (the horizon of shared catalogs is cluster-wide)
-- holding a snapshot or an xid, in a transaction older than a threshold
-- (seconds).
SELECT {columns} FROM pg_stat_activity a
 WHERE (a.backend_xmin IS NOT NULL OR a.backend_xid IS NOT NULL) AND a.pid <> pg_backend_pid()
   AND coalesce(a.xact_start, a.backend_start) <= now() - make_interval(secs => %s)
 ORDER BY greatest(age(a.backend_xmin), age(a.backend_xid)) DESC LIMIT 10

-- name: xmin_others
-- What else holds the xmin horizon back: prepared transactions older than a
-- threshold (seconds), and replication slots.
SELECT 'prepared', gid || ' (owner ' || owner || ', database ' || database || ')', age(transaction),
       extract(epoch FROM now() - prepared)::float8
  FROM pg_prepared_xacts WHERE prepared <= now() - make_interval(secs => %s)
UNION ALL
SELECT 'slot', slot_name || CASE WHEN active THEN ' (active)' ELSE ' (inactive)' END, age(xmin), NULL
  FROM pg_replication_slots WHERE xmin IS NOT NULL

-- name: applied_migrations
SELECT version, name, checksum, applied_at::text FROM pgfeed.schema_version

-- name: try_migrate_lock
-- Take the session advisory lock held while migrating, if free.
SELECT pg_try_advisory_lock(%s)

-- name: migrate_lock
-- Wait for the lock held while migrating.
SELECT pg_advisory_lock(%s)

-- name: migrate_unlock
SELECT pg_advisory_unlock(%s)

-- name: create_schema_version
-- Create the version table; runs in the first migration's transaction, so
-- that a failed first run leaves nothing behind.
CREATE SCHEMA IF NOT EXISTS pgfeed;
CREATE TABLE pgfeed.schema_version (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    applied_by name NOT NULL DEFAULT current_user
)

-- name: record_migration
-- Record an applied migration (version, name, checksum), in its transaction.
INSERT INTO pgfeed.schema_version (version, name, checksum) VALUES (%s, %s, %s)


-- ==== Consumers run by `pgfeed run` (pgfeed/run.py), the demo (pgfeed_cli/demo) ====

-- name: consumer_heartbeats
-- A reader's named consumers (parallel arrays of consumer and stream) are
-- alive, whether or not they have rows to save (heartbeat=, `pgfeed run`).
SELECT pgfeed.consumer_heartbeat_v2(c, s) FROM unnest(%s::text[], %s::text[]) AS t(c, s)

-- name: set_application_name
-- Name this session in pg_stat_activity until it ends (a reader renames
-- its pooled connections when its subscriptions change).
SELECT set_config('application_name', %s, false)

-- name: ticker_lease
-- Who leads the ticker now, if anyone: holder, kind, term.
SELECT holder, kind, term FROM pgfeed.ticker WHERE expires_at > clock_timestamp()


-- ==== Test servers and databases (pgfeed/testing.py) ====

-- name: server_version
SHOW server_version

-- name: create_database
-- Create database {} (the migrated template of a test session).
CREATE DATABASE {}

-- name: clone_database
-- Create database {} as a copy of template database {} (one per test).
CREATE DATABASE {} TEMPLATE {}

-- name: drop_database
-- Drop database {}, disconnecting whatever still uses it.
DROP DATABASE IF EXISTS {} WITH (FORCE)
