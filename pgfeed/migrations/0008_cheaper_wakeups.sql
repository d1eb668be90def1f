-- pgfeed 0008: cheaper wake-ups for readers and ticks for the server, and a
-- ticker that notices a change within a millisecond at any write rate.
--
-- * read_live_v3 prefetched the rows of the interval ending at the newest
--   tick only when that tick was exactly one past the reader's known head.
--   Under load the ticker takes ticks faster than a reader wakes (a reader
--   woken by tick N finds N+1 or N+2 already taken), so most wake-ups cost a
--   second round trip (a range read through interval_rows_v2) and a refresh
--   waited for it. read_live_v4 prefetches the whole interval (known,
--   newest] for the streams standing at the known head, when the ticks it
--   lists cover that interval (fewer than 1,000 ticks). The reader places
--   each row in the first of those ticks that sees it, exactly as a range
--   read over a window of ticks does (positions.plan_window): same rows, same
--   order.
-- * await_change_v4: when nothing changed at its last check, the ticker used
--   to sleep, backing off to its idle interval (50 ms), so a row written
--   after a quiet spell waited up to that long for its tick (the demo, at 20
--   rows/s, showed a median lag of 19 ms). It now waits in the server
--   instead: one statement per idle interval, which checks for a change
--   every millisecond and returns as soon as there is one. Writers still
--   only INSERT.
-- * Less server CPU per tick: the tick no longer calls SQL functions that
--   could not be inlined (_seq_now_v2, _system_id_v3, the fingerprint) or
--   opens a subtransaction, and read_live_v4 answers in fewer statements.
--
-- Every object of 0001-0007 keeps its signature, so readers and writers of
-- the previous releases keep working while this is installed.

CREATE FUNCTION pgfeed.read_live_v4(known bigint, streams text[], after_ticks bigint[], lim integer)
RETURNS TABLE (
    tick_id    bigint,
    tick_snap  text,
    metas      text,
    stream     text,
    xid        bigint,
    seq        bigint,
    created_at timestamptz,
    key        text,
    payload    jsonb,
    floor_tick bigint,
    seq_lo     bigint,
    seq_hi     bigint,
    server_xmax bigint,
    tick_fp    bigint
)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    head_id  bigint;
    b_snap   pg_snapshot;
    b_hi     bigint;
    head_lo  bigint;
    head_fp  bigint;
    a_snap   pg_snapshot;
    a_lo     bigint;
    s        record;
BEGIN
    IF cardinality(streams) IS DISTINCT FROM cardinality(after_ticks) THEN
        RAISE EXCEPTION 'pgfeed: % streams given with % positions', cardinality(streams), cardinality(after_ticks)
            USING ERRCODE = '22023';
    END IF;
    -- One snapshot for every statement (STABLE): the newest tick, and the
    -- known one the prefetch starts from.
    SELECT t.id, t.snap, t.seq_lo, t.seq_hi, t.fp, k.snap, k.seq_lo
      INTO head_id, b_snap, head_lo, b_hi, head_fp, a_snap, a_lo
      FROM (SELECT * FROM pgfeed.ticks ORDER BY id DESC LIMIT 1) t
      LEFT JOIN pgfeed.ticks k ON k.id = known;
    -- The ticks from the known head on, at most 1,000 (so the interval
    -- prefetched below is covered only when the newest tick is among them),
    -- then the newest tick with the streams' incarnations.
    RETURN QUERY
        (SELECT t.id, t.snap::text, NULL::text, NULL::text, NULL::bigint, NULL::bigint,
                NULL::timestamptz, NULL::text, NULL::jsonb, NULL::bigint, t.seq_lo, t.seq_hi, NULL::bigint, t.fp
           FROM pgfeed.ticks t WHERE t.id >= known ORDER BY t.id LIMIT 1000)
        UNION ALL
        SELECT head_id, b_snap::text,
            (SELECT coalesce(json_object_agg(st.name, json_build_array(st.id, st.created_tick, st.floor_tick, st.notify_mode)), '{}')
               FROM pgfeed.streams st WHERE st.name = ANY (streams))::text,
            NULL::text, NULL::bigint, NULL::bigint, NULL::timestamptz, NULL::text, NULL::jsonb, NULL::bigint,
            head_lo, b_hi,
            -- The server's own horizon: behind the newest tick means this is not
            -- the database that took it (a dump restored into a new cluster).
            pg_snapshot_xmax(pg_current_snapshot())::text::bigint, head_fp;
    IF head_id IS NULL OR head_id <= known OR head_id >= known + 1000 OR a_snap IS NULL THEN
        RETURN;
    END IF;
    FOR s IN
        SELECT u.name, st.id AS sid, st.floor_tick AS floor
          FROM unnest(streams, after_ticks) AS u(name, after)
          JOIN pgfeed.streams st ON st.name = u.name
         WHERE u.after = known
    LOOP
        -- A marker row carries the floor even when the interval is empty.
        RETURN QUERY
            SELECT head_id, NULL::text, NULL::text, s.name, NULL::bigint, NULL::bigint,
                   NULL::timestamptz, NULL::text, NULL::jsonb, s.floor, NULL::bigint, NULL::bigint,
                   NULL::bigint, NULL::bigint
            UNION ALL
            SELECT head_id, NULL::text, NULL::text, s.name, r.xid, r.seq, r.created_at, r.key, r.payload, s.floor,
                   NULL::bigint, NULL::bigint, NULL::bigint, NULL::bigint
              FROM pgfeed.interval_rows_v2(s.sid, a_snap, a_lo, b_snap, b_hi, 0, lim + 1) r;
    END LOOP;
END $$;
REVOKE ALL ON FUNCTION pgfeed.read_live_v4(bigint, text[], bigint[], integer) FROM PUBLIC;

-- The ticker's own cost. Each tick called three SQL functions whose SET
-- search_path clause kept them from being inlined, so each call set up a
-- SQL function's execution, and _system_id_v3 opened a subtransaction
-- (its EXCEPTION block) on every tick:
-- * _seq_now_v2 reads the sequence with pg_sequence_last_value, with no SET
--   clause (every name qualified), so that callers inline it;
-- * _system_id_v3 checks the privilege instead of catching its absence
--   (VOLATILE, as pg_control_system() is, so that callers inline it);
-- * _history_break_v3, which a tick calls when the cluster's identity is
--   unknown, counts the rows above the newest tick with literal bounds: the
--   ticker's connection now forces generic plans;
-- * _tick_fp_v4 is _tick_fp_v3's formula (the same values: a test compares
--   them) with every name qualified and no SET clause, inlined into
--   _insert_tick_v2.
CREATE OR REPLACE FUNCTION pgfeed._seq_now_v2() RETURNS bigint
LANGUAGE sql VOLATILE AS $$
    SELECT COALESCE(pg_catalog.pg_sequence_last_value('pgfeed.event_seq'::pg_catalog.regclass), 0)
$$;

CREATE OR REPLACE FUNCTION pgfeed._system_id_v3() RETURNS bigint
LANGUAGE sql VOLATILE AS $$
    SELECT CASE WHEN pg_catalog.has_function_privilege('pg_catalog.pg_control_system()', 'EXECUTE')
                THEN (pg_catalog.pg_control_system()).system_identifier END
$$;

-- As in 0007, with its one scan of new rows planned with literal bounds.
CREATE OR REPLACE FUNCTION pgfeed._history_break_v3() RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    last_id   bigint;
    last_snap pg_snapshot;
    last_hi   bigint;
    last_sys  bigint;
    sys       bigint := pgfeed._system_id_v3();
    cur_xmax  xid8 := greatest(pg_snapshot_xmax(pg_current_snapshot()),
                               (coalesce(pg_current_xact_id_if_assigned()::text::bigint, 0) + 1)::text::xid8);
    n         bigint;
BEGIN
    SELECT t.id, t.snap, t.seq_hi, t.system_id INTO last_id, last_snap, last_hi, last_sys
      FROM pgfeed.ticks t ORDER BY t.id DESC LIMIT 1;
    IF last_snap IS NULL THEN
        RETURN NULL;
    END IF;
    IF cur_xmax < pg_snapshot_xmax(last_snap) THEN
        RETURN format('this server''s transaction ids (%s) are behind the newest tick %s (%s): '
                      'the database was restored into another cluster; run `pgfeed repair --after-restore`',
                      cur_xmax, last_id, pg_snapshot_xmax(last_snap));
    END IF;
    IF last_sys IS NOT NULL AND sys IS NOT NULL AND last_sys = sys THEN
        RETURN NULL;  -- the cluster that took the newest tick
    END IF;
    IF last_hi IS NOT NULL AND pgfeed._seq_now_v2() < last_hi THEN
        RETURN format('pgfeed.event_seq (%s) is behind the newest tick %s (%s): the database was restored '
                      'without its sequences; restore them, then run `pgfeed repair --after-restore`',
                      pgfeed._seq_now_v2(), last_id, last_hi);
    END IF;
    -- No row above seq_hi is visible in a tick (docs/design.md, "Ticks"): one
    -- that is was appended on this cluster with a transaction id the restored
    -- ticks count as ended, and would be skipped.
    IF last_hi IS NOT NULL THEN
        -- With the bounds as literals: planned generically (the ticker's
        -- connection forces generic plans), seq > $1 is estimated wide and
        -- every partition scanned, on every tick where the cluster's identity
        -- is unknown (the owner may not read pg_control).
        EXECUTE format('SELECT count(*) FROM pgfeed.events e WHERE e.seq > %s'
                       ' AND pg_visible_in_snapshot(e.xid, %L::pg_snapshot)', last_hi, last_snap)
           INTO n;
        IF n > 0 THEN
            RETURN format('%s rows were appended on this database while its transaction ids were behind the '
                          'restored newest tick %s: the database was restored into another cluster; run '
                          '`pgfeed repair --after-restore`', n, last_id);
        END IF;
    END IF;
    RETURN NULL;
END $$;
REVOKE ALL ON FUNCTION pgfeed._history_break_v3() FROM PUBLIC;

CREATE FUNCTION pgfeed._tick_fp_v4(
    id bigint, snap pg_snapshot, seq_lo bigint, seq_hi bigint, taken_at timestamptz, term bigint, system_id bigint
) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT CAST(CAST('x' OPERATOR(pg_catalog.||) pg_catalog."left"(pg_catalog.md5(pg_catalog.concat_ws('|',
               id, CAST(snap AS pg_catalog.text),
               COALESCE(CAST(seq_lo AS pg_catalog.text), '-'), COALESCE(CAST(seq_hi AS pg_catalog.text), '-'),
               CAST(extract(epoch FROM taken_at) OPERATOR(pg_catalog.*) 1000000 AS pg_catalog.int8),
               COALESCE(CAST(term AS pg_catalog.text), '-'), COALESCE(CAST(system_id AS pg_catalog.text), '-'))), 15)
           AS pg_catalog."bit"(60)) AS pg_catalog.int8)
$$;
REVOKE ALL ON FUNCTION pgfeed._tick_fp_v4(bigint, pg_snapshot, bigint, bigint, timestamptz, bigint, bigint) FROM PUBLIC;

-- As in 0007, with the fingerprint of _tick_fp_v4.
CREATE OR REPLACE FUNCTION pgfeed._insert_tick_v2(tick_term bigint, seq_lo bigint) RETURNS TABLE (id bigint, snap text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    own       xid8;
    last_id   bigint;
    last_snap pg_snapshot;
    last_lo   bigint;
    last_sys  bigint;
    sys       bigint;
    why       text;
    current   pg_snapshot;
    top       xid8;
    lo        bigint := seq_lo;
    hi        bigint;
    running   xid8[];
    taken     timestamptz;
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'pgfeed: ticks must be taken at READ COMMITTED, not %',
            current_setting('transaction_isolation')
            USING ERRCODE = '25001';
    END IF;
    own := pg_current_xact_id();
    PERFORM pg_advisory_xact_lock(7451287230471176193);
    SELECT t.id, t.snap, t.seq_lo, t.system_id INTO last_id, last_snap, last_lo, last_sys
      FROM pgfeed.ticks t ORDER BY t.id DESC LIMIT 1;
    SELECT s INTO current FROM pg_current_snapshot() AS s;
    hi := pgfeed._seq_now_v2();
    sys := pgfeed._system_id_v3();
    -- The server's next xid is past the snapshot's xmax and past our own
    -- xid (a tick this transaction took before, in create_stream_v2, has an
    -- xmax raised to it: that is not a restore).
    IF last_snap IS NOT NULL
       AND greatest(pg_snapshot_xmax(current)::text::bigint, own::text::bigint + 1)
           < pg_snapshot_xmax(last_snap)::text::bigint THEN
        RAISE EXCEPTION 'pgfeed: refusing to tick: this server''s transaction ids (%) are behind the newest tick % (%)',
            pg_snapshot_xmax(current), last_id, pg_snapshot_xmax(last_snap)
            USING ERRCODE = 'PF002',
                  HINT = 'The database was restored into a new cluster; run `pgfeed repair --after-restore`.';
    END IF;
    IF last_snap IS NOT NULL AND (last_sys IS NULL OR sys IS NULL OR last_sys <> sys) THEN
        why := pgfeed._history_break_v3();
        IF why IS NOT NULL THEN
            RAISE EXCEPTION 'pgfeed: refusing to tick: %', why
                USING ERRCODE = 'PF004',
                      HINT = 'See "When the database changes under you" in docs/design.md.';
        END IF;
    END IF;
    IF lo IS NULL AND last_snap IS NOT NULL THEN
        -- Clamped (create_stream_v2 in a transaction that already has an
        -- xid): exactly the previous tick's snapshot and seq_lo, so this tick
        -- sees nothing new. 0004 kept only the previous xmax, with the
        -- current list of running xids: the tick then saw transactions below
        -- that xmax that had ended since, and not earlier commits above it,
        -- which is not a prefix of the commit order (a model-based test found
        -- it: a change delivered before the one it waited for). And a second
        -- create_stream_v2 in the same transaction found its own tick's
        -- raised xmax ahead of its snapshot and refused (PF002).
        current := last_snap;
        lo := last_lo;
    ELSE
        IF lo IS NOT NULL THEN
            top := greatest(own, pg_snapshot_xmax(current));
        ELSE  -- the first tick ever, in a transaction that wrote
            top := pg_snapshot_xmax(current);
            lo := 0;
        END IF;
        -- See 0004 for why every xid between the snapshot's xmax and top
        -- counts as running.
        running := ARRAY(
            SELECT x FROM pg_snapshot_xip(current) x WHERE x < top
            UNION SELECT own WHERE own < top
            UNION SELECT i::text::xid8 FROM generate_series(pg_snapshot_xmax(current)::text::bigint, top::text::bigint - 1) i
            ORDER BY 1);
        current := format('%s:%s:%s', coalesce((SELECT min(x) FROM unnest(running) x), top), top,
                          array_to_string(running, ','))::pg_snapshot;
    END IF;
    taken := clock_timestamp();
    INSERT INTO pgfeed.ticks (id, snap, taken_at, seq_lo, seq_hi, term, system_id, fp)
        VALUES (coalesce(last_id, 0) + 1, current, taken, lo, hi, tick_term, sys,
                pgfeed._tick_fp_v4(coalesce(last_id, 0) + 1, current, lo, hi, taken, tick_term, sys));
    PERFORM pg_notify('pgfeed_v2_ticks', (coalesce(last_id, 0) + 1)::text);
    RETURN QUERY SELECT coalesce(last_id, 0) + 1, current::text;
END $$;
REVOKE ALL ON FUNCTION pgfeed._insert_tick_v2(bigint, bigint) FROM PUBLIC;

-- Roles already granted `reader` read with v4.
DO $$
DECLARE
    g record;
BEGIN
    FOR g IN SELECT DISTINCT r.rolname FROM pgfeed.role_grants rg JOIN pg_roles r ON r.oid = rg.role_oid
              WHERE rg.kind = 'reader' LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION pgfeed.read_live_v4(bigint, text[], bigint[], integer) TO %I',
                       g.rolname);
    END LOOP;
END $$;

-- The ticker's wait while nothing changes: true as soon as some row may
-- have become visible since the newest tick, false after timeout_ms. It
-- answers what tick_v2's check (_changed_since_v3) would, every poll_ms,
-- against a fresh snapshot (plpgsql takes one for each statement of a
-- volatile function at READ COMMITTED); while no transaction the newest
-- tick listed as running can still commit, that answer is whether the event
-- sequence moved past the tick's seq_hi (_seq_now_v2, inlined).
-- Reads only.
CREATE FUNCTION pgfeed.await_change_v4(timeout_ms integer, poll_ms integer DEFAULT 1) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    last_snap pg_snapshot;
    last_lo   bigint;
    last_hi   bigint;
    pending   boolean;
    pause     double precision := greatest(poll_ms, 1) / 1000.0;
    deadline  timestamptz := clock_timestamp() + make_interval(secs => greatest(timeout_ms, 0) / 1000.0);
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'pgfeed: await_change_v4 needs READ COMMITTED (a snapshot per check), not %',
            current_setting('transaction_isolation')
            USING ERRCODE = '25001';
    END IF;
    SELECT t.snap, t.seq_lo, t.seq_hi INTO last_snap, last_lo, last_hi FROM pgfeed.ticks t ORDER BY t.id DESC LIMIT 1;
    IF last_snap IS NULL OR last_hi IS NULL OR last_lo IS NULL THEN
        RETURN true;
    END IF;
    -- Transactions the tick saw running, or rows appended while it was
    -- taken: their commits do not move the sequence; check them in full.
    pending := last_hi > last_lo OR EXISTS (SELECT 1 FROM pg_snapshot_xip(last_snap));
    LOOP
        IF pgfeed._seq_now_v2() > last_hi THEN  -- inlined: no query
            RETURN true;
        END IF;
        IF pending
           AND pgfeed._changed_since_v3(last_snap, last_lo, last_hi, pg_current_snapshot(), pgfeed._seq_now_v2()) THEN
            RETURN true;
        END IF;
        EXIT WHEN clock_timestamp() >= deadline;
        -- Never past the deadline: the caller's statement timeout is sized on it.
        PERFORM pg_sleep(least(pause, extract(epoch FROM deadline - clock_timestamp())::double precision));
    END LOOP;
    RETURN false;
END $$;
REVOKE ALL ON FUNCTION pgfeed.await_change_v4(integer, integer) FROM PUBLIC;

-- Roles already granted `ticker` wait with it.
DO $$
DECLARE
    g record;
BEGIN
    FOR g IN SELECT DISTINCT r.rolname FROM pgfeed.role_grants rg JOIN pg_roles r ON r.oid = rg.role_oid
              WHERE rg.kind = 'ticker' LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION pgfeed.await_change_v4(integer, integer) TO %I', g.rolname);
    END LOOP;
END $$;
