-- pgfeed 0006: what `pgfeed status`, `pgfeed check` and the daemon's metrics
-- read, and an opt-in consumer heartbeat.
--
-- * Saved consumer positions gain a heartbeat: seen_at (and seen_by, the
--   session that sent it), set by pgfeed.consumer_heartbeat_v2(consumer,
--   stream). updated_at moves only when the position moves, so without it a
--   dead consumer looks like a live one on a quiet stream. A process calls it
--   every N seconds (`pgfeed run` does); a role that only reads needs EXECUTE
--   on it, and nothing else new: it updates the caller's own row of
--   pgfeed.positions, under its row-level security.
-- * status_*_v2: read-only reports of the ticker, the streams and every
--   saved consumer of every role. SECURITY DEFINER because a monitoring
--   role must see all roles' positions (row-level security hides them) and
--   count rows without reading payloads: they return aggregates only, never
--   a payload or a key. EXECUTE goes to pg_monitor (PostgreSQL's built-in
--   monitoring role, which also lets the caller see other sessions in
--   pg_stat_activity, as the holdback report needs) besides the owner.
--   jit is off for them: planned on per-stream estimates, a report of a few
--   streams would spend most of a second compiling.
--
-- Lag is counted in rows after a saved position, with the same two ordered
-- scans as a reader's interval reads (see _insert_tick_v2 for why a closed
-- snapshot and its seq_lo bound them): rows appended after the tick's seq_lo
-- that it does not see, and rows of transactions it listed as running.

ALTER TABLE pgfeed.positions ADD COLUMN seen_at timestamptz;
ALTER TABLE pgfeed.positions ADD COLUMN seen_by text;
COMMENT ON COLUMN pgfeed.positions.seen_at IS
    'Last heartbeat of the consumer (pgfeed.consumer_heartbeat_v2); NULL: it sends none.';
COMMENT ON COLUMN pgfeed.positions.seen_by IS
    'The session that sent the last heartbeat: application_name, client address, backend pid.';

-- The caller's own consumer says it is alive. False when the consumer has no
-- saved position yet (nothing to attach the heartbeat to).
CREATE FUNCTION pgfeed.consumer_heartbeat_v2(consumer text, stream text) RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    UPDATE pgfeed.positions p
       SET seen_at = now(),
           seen_by = format('%s @%s pid %s', coalesce(nullif(current_setting('application_name'), ''), '-'),
                            coalesce(host(inet_client_addr()), 'local'), pg_backend_pid())
     WHERE p.owner = current_user AND p.consumer = consumer_heartbeat_v2.consumer
       AND p.stream = consumer_heartbeat_v2.stream;
    RETURN FOUND;
END $$;
REVOKE ALL ON FUNCTION pgfeed.consumer_heartbeat_v2(text, text) FROM PUBLIC;

-- Rows of stream sid after position (tick_id, after_seq) — after_seq NULL:
-- the complete position "tick_id" — among the rows committed as the caller
-- sees them: how many, and when the oldest was appended. No row when the
-- tick (or, for a partial position, the tick before it) is gone.
CREATE FUNCTION pgfeed._rows_after_v2(sid bigint, tick_id bigint, after_seq bigint)
RETURNS TABLE (row_count bigint, oldest timestamptz)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    b_snap pg_snapshot;
    b_lo   bigint;
    b_hi   bigint;
    a_snap pg_snapshot;
    a_lo   bigint;
    n      bigint;
    o      timestamptz;
    n2     bigint;
    o2     timestamptz;
BEGIN
    SELECT t.snap, t.seq_lo, t.seq_hi INTO b_snap, b_lo, b_hi FROM pgfeed.ticks t WHERE t.id = tick_id;
    IF b_snap IS NULL THEN
        RETURN;
    END IF;
    IF b_lo IS NULL THEN  -- a tick of the previous release: no seq bound, scan the stream
        SELECT count(*), min(e.created_at) INTO n, o FROM pgfeed.events e
         WHERE e.stream_id = sid AND NOT pg_visible_in_snapshot(e.xid, b_snap);
    ELSE
        SELECT count(*), min(u.created_at) INTO n, o FROM (
            SELECT e.created_at FROM pgfeed.events e
             WHERE e.stream_id = sid AND e.seq > b_lo AND NOT pg_visible_in_snapshot(e.xid, b_snap)
            UNION ALL
            SELECT e.created_at FROM pgfeed.events e
             WHERE e.stream_id = sid AND e.xid = ANY (ARRAY(SELECT pg_snapshot_xip(b_snap))) AND e.seq <= b_lo
        ) u;
    END IF;
    IF after_seq IS NOT NULL THEN
        -- Inside interval tick_id: its rows after after_seq come too.
        SELECT t.snap, t.seq_lo INTO a_snap, a_lo FROM pgfeed.ticks t WHERE t.id = tick_id - 1;
        IF a_snap IS NULL THEN
            RETURN;
        END IF;
        SELECT count(*), min(r.created_at) INTO n2, o2
          FROM pgfeed.interval_rows_v2(sid, a_snap, a_lo, b_snap, b_hi, after_seq, 2147483647) r;
        n := n + n2;
        o := least(o, o2);
    END IF;
    RETURN QUERY SELECT n, o;
END $$;
REVOKE ALL ON FUNCTION pgfeed._rows_after_v2(bigint, bigint, bigint) FROM PUBLIC;

-- The lease (live: not expired; expires_at NULL once resigned or never
-- taken), the newest tick and the tick rate over the last minute (from the
-- newest 120000 ticks: 2000/s at most), with the server's clock and xid
-- horizon (to widen pg_stat_activity's 32-bit xids).
CREATE FUNCTION pgfeed.status_ticker_v2()
RETURNS TABLE (
    now               timestamptz,
    term              bigint,
    holder            text,
    kind              text,
    backend_pid       integer,
    started_at        timestamptz,
    heartbeat_at      timestamptz,
    expires_at        timestamptz,
    live              boolean,
    head_tick         bigint,
    head_taken_at     timestamptz,
    ticks_last_minute bigint,
    server_xmax       xid8
)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off AS $$
    SELECT now(), l.term, l.holder, l.kind, l.backend_pid, l.started_at, l.heartbeat_at,
           CASE WHEN isfinite(l.expires_at) THEN l.expires_at END, l.expires_at > clock_timestamp(),
           h.id, h.taken_at,
           (SELECT count(*) FROM (SELECT t.taken_at FROM pgfeed.ticks t ORDER BY t.id DESC LIMIT 120000) r
             WHERE r.taken_at > now() - interval '1 minute'),
           pg_snapshot_xmax(pg_current_snapshot())
      FROM pgfeed.ticker l
      LEFT JOIN LATERAL (SELECT t.id, t.taken_at FROM pgfeed.ticks t ORDER BY t.id DESC LIMIT 1) h ON true
$$;
REVOKE ALL ON FUNCTION pgfeed.status_ticker_v2() FROM PUBLIC;

-- One row per stream (names NULL: all): its settings, rows kept and their
-- size on disk, rows appended within `recent` (counted among its newest
-- 100000 rows), its first and last row, the committed rows no tick covers
-- yet (pending: the ticker's backlog) and the tables captured into it.
CREATE FUNCTION pgfeed.status_streams_v2(names text[] DEFAULT NULL, recent interval DEFAULT interval '1 minute')
RETURNS TABLE (
    id                bigint,
    name              text,
    partition         oid,
    notify_mode       text,
    max_payload_bytes integer,
    created_tick      bigint,
    floor_tick        bigint,
    created_at        timestamptz,
    row_count         bigint,
    bytes             bigint,
    recent_rows       bigint,
    oldest_kept       timestamptz,
    last_append       timestamptz,
    pending_rows      bigint,
    pending_since     timestamptz,
    captures          text[]
)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off AS $$
    SELECT s.id, s.name, to_regclass(format('pgfeed.%I', 'events_' || s.id))::oid, s.notify_mode,
           s.max_payload_bytes, s.created_tick, s.floor_tick, s.created_at,
           (SELECT count(*) FROM pgfeed.events e WHERE e.stream_id = s.id),
           coalesce(pg_total_relation_size(to_regclass(format('pgfeed.%I', 'events_' || s.id))), 0),
           (SELECT count(*) FROM (SELECT e.created_at FROM pgfeed.events e WHERE e.stream_id = s.id
                                   ORDER BY e.seq DESC LIMIT 100000) r
             WHERE r.created_at >= now() - recent),
           (SELECT e.created_at FROM pgfeed.events e WHERE e.stream_id = s.id ORDER BY e.seq LIMIT 1),
           (SELECT e.created_at FROM pgfeed.events e WHERE e.stream_id = s.id ORDER BY e.seq DESC LIMIT 1),
           coalesce(p.row_count, 0), p.oldest,
           ARRAY(SELECT DISTINCT format('%I.%I', n.nspname, c.relname)
                   FROM pg_trigger t
                   JOIN pg_class c ON c.oid = t.tgrelid
                   JOIN pg_namespace n ON n.oid = c.relnamespace
                   JOIN pg_proc f ON f.oid = t.tgfoid AND f.pronamespace = 'pgfeed'::regnamespace
                  WHERE t.tgname IN ('pgfeed_capture_' || s.id, 'pgfeed_capture_' || s.id || '_truncate')
                    AND t.tgparentid = 0
                    -- A partition's own TRUNCATE trigger belongs to its captured ancestor's capture.
                    AND NOT EXISTS (SELECT 1 FROM pg_partition_ancestors(c.oid) a
                                      JOIN pg_trigger pt ON pt.tgrelid = a.relid AND pt.tgname = t.tgname
                                     WHERE a.relid <> c.oid)
                  ORDER BY 1)
      FROM pgfeed.streams s
      LEFT JOIN LATERAL pgfeed._rows_after_v2(s.id, (SELECT max(t.id) FROM pgfeed.ticks t), NULL) p ON true
     WHERE names IS NULL OR s.name = ANY (names)
     ORDER BY s.name
$$;
REVOKE ALL ON FUNCTION pgfeed.status_streams_v2(text[], interval) FROM PUBLIC;

-- Every saved consumer position of every role (names NULL: of every
-- stream), with what its stream holds now (stream_id NULL: the stream is
-- gone) and its lag: the rows after the position and when the oldest of
-- them was appended (NULL when the token or its tick cannot be read), and
-- when the position's tick was taken.
CREATE FUNCTION pgfeed.status_consumers_v2(names text[] DEFAULT NULL)
RETURNS TABLE (
    owner              name,
    consumer           text,
    stream             text,
    token              text,
    updated_at         timestamptz,
    seen_at            timestamptz,
    seen_by            text,
    stream_id          bigint,
    created_tick       bigint,
    floor_tick         bigint,
    lag_rows           bigint,
    oldest_undelivered timestamptz,
    position_taken_at  timestamptz
)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off AS $$
    SELECT p.owner, p.consumer, p.stream, p.token, p.updated_at, p.seen_at, p.seen_by,
           s.id, s.created_tick, s.floor_tick, r.row_count, r.oldest,
           (SELECT t.taken_at FROM pgfeed.ticks t WHERE t.id = v.tick)
      FROM pgfeed.positions p
      LEFT JOIN pgfeed.streams s ON s.name = p.stream
      LEFT JOIN LATERAL (
          SELECT split_part(p.token, '.', 1)::bigint AS tick, nullif(split_part(p.token, '.', 2), '')::bigint AS seq
           WHERE p.token ~ '^[0-9]{1,18}(\.[0-9]{1,18})?$') v ON true
      LEFT JOIN LATERAL pgfeed._rows_after_v2(s.id, v.tick, v.seq) r ON s.id IS NOT NULL AND v.tick IS NOT NULL
     WHERE names IS NULL OR p.stream = ANY (names)
     ORDER BY p.stream, p.consumer, p.owner
$$;
REVOKE ALL ON FUNCTION pgfeed.status_consumers_v2(text[]) FROM PUBLIC;

-- For holdback blame: for each (stream, xid) pair, the committed rows of
-- that stream written by transactions with a later xid. The caller finds
-- the open transactions that wrote to a stream in pg_locks and
-- pg_stat_activity itself (as itself: a definer would see other users'
-- sessions only as their owner may).
CREATE FUNCTION pgfeed.status_committed_after_v2(stream_ids bigint[], xids xid8[])
RETURNS TABLE (stream_id bigint, xid xid8, row_count bigint)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off AS $$
    SELECT u.sid, u.x, (SELECT count(*) FROM pgfeed.events e WHERE e.stream_id = u.sid AND e.xid > u.x)
      FROM unnest(stream_ids, xids) AS u(sid, x)
$$;
REVOKE ALL ON FUNCTION pgfeed.status_committed_after_v2(bigint[], xid8[]) FROM PUBLIC;

GRANT USAGE ON SCHEMA pgfeed TO pg_monitor;
GRANT SELECT ON pgfeed.schema_version TO pg_monitor;
GRANT EXECUTE ON FUNCTION pgfeed.status_ticker_v2(), pgfeed.status_streams_v2(text[], interval),
    pgfeed.status_consumers_v2(text[]), pgfeed.status_committed_after_v2(bigint[], xid8[]) TO pg_monitor;

-- Roles already granted `reader` may heartbeat their consumers.
DO $$
DECLARE
    g record;
BEGIN
    FOR g IN SELECT DISTINCT r.rolname FROM pgfeed.role_grants rg JOIN pg_roles r ON r.oid = rg.role_oid
              WHERE rg.kind = 'reader' LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION pgfeed.consumer_heartbeat_v2(text, text) TO %I', g.rolname);
    END LOOP;
END $$;
