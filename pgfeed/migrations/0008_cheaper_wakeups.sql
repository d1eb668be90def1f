-- pgfeed 0008: cheaper wake-ups for readers, and a ticker that notices a
-- change within a millisecond at any write rate.
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
    -- The ticks from the known head on: at most 1,000, so the interval
    -- prefetched below is covered only when the newest tick is among them.
    RETURN QUERY SELECT t.id, t.snap::text, NULL::text, NULL::text, NULL::bigint, NULL::bigint,
                        NULL::timestamptz, NULL::text, NULL::jsonb, NULL::bigint, t.seq_lo, t.seq_hi, NULL::bigint, t.fp
                   FROM pgfeed.ticks t WHERE t.id >= known ORDER BY t.id LIMIT 1000;
    SELECT t.id, t.snap, t.seq_lo, t.seq_hi, t.fp INTO head_id, b_snap, head_lo, b_hi, head_fp
      FROM pgfeed.ticks t ORDER BY t.id DESC LIMIT 1;
    RETURN QUERY SELECT head_id, b_snap::text,
        (SELECT coalesce(json_object_agg(st.name, json_build_array(st.id, st.created_tick, st.floor_tick, st.notify_mode)), '{}')
           FROM pgfeed.streams st WHERE st.name = ANY (streams))::text,
        NULL::text, NULL::bigint, NULL::bigint, NULL::timestamptz, NULL::text, NULL::jsonb, NULL::bigint,
        head_lo, b_hi,
        -- The server's own horizon: behind the newest tick means this is not
        -- the database that took it (a dump restored into a new cluster).
        pg_snapshot_xmax(pg_current_snapshot())::text::bigint, head_fp;
    IF head_id IS NULL OR head_id <= known OR head_id >= known + 1000 THEN
        RETURN;
    END IF;
    FOR s IN
        SELECT u.name, u.after, st.id AS sid, st.floor_tick AS floor
          FROM unnest(streams, after_ticks) AS u(name, after)
          JOIN pgfeed.streams st ON st.name = u.name
         WHERE u.after = known
    LOOP
        SELECT tk.snap, tk.seq_lo INTO a_snap, a_lo FROM pgfeed.ticks tk WHERE tk.id = s.after;
        CONTINUE WHEN a_snap IS NULL;
        -- A marker row carries the floor even when the interval is empty.
        RETURN QUERY SELECT head_id, NULL::text, NULL::text, s.name, NULL::bigint, NULL::bigint,
                            NULL::timestamptz, NULL::text, NULL::jsonb, s.floor, NULL::bigint, NULL::bigint,
                            NULL::bigint, NULL::bigint;
        RETURN QUERY
            SELECT head_id, NULL::text, NULL::text, s.name, r.xid, r.seq, r.created_at, r.key, r.payload, s.floor,
                   NULL::bigint, NULL::bigint, NULL::bigint, NULL::bigint
              FROM pgfeed.interval_rows_v2(s.sid, a_snap, a_lo, b_snap, b_hi, 0, lim + 1) r;
    END LOOP;
END $$;
REVOKE ALL ON FUNCTION pgfeed.read_live_v4(bigint, text[], bigint[], integer) FROM PUBLIC;

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
-- sequence moved past the tick's seq_hi, which is read without a query.
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
        IF coalesce(pg_sequence_last_value('pgfeed.event_seq'), 0) > last_hi THEN
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
