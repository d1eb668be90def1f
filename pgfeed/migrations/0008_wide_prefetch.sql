-- pgfeed 0008: a woken reader reads every new interval in its one round trip.
--
-- read_live_v3 prefetched the rows of the interval ending at the newest tick
-- only when that tick was exactly one past the reader's known head. Under
-- load the ticker takes ticks faster than a reader wakes (a reader woken by
-- tick N finds N+1 or N+2 already taken), so most wake-ups cost a second
-- round trip (a range read through interval_rows_v2) and a refresh waited
-- for it. read_live_v4 prefetches the whole interval (known, newest] for the
-- streams standing at the known head, when the ticks it lists cover that
-- interval (fewer than 1,000 ticks). The reader places each row in the first
-- of those ticks that sees it, exactly as a range read over a window of
-- ticks does (positions.plan_window): same rows, same order.
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
