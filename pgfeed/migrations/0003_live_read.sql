-- pgfeed 0003: one round trip for a woken reader. Take (or share) a tick and,
-- for each followed stream whose reader stands exactly one tick behind it,
-- return that interval's rows in the same call.
--
-- The rows are read by a statement of their own, run after the tick was taken:
-- it sees every transaction the tick sees, and the filter keeps exactly the
-- interval (after, tick]. The function runs in the caller's autocommit
-- transaction, which commits (making the tick durable) before the client gets
-- the result, so nothing is delivered from a tick that could be lost.
-- SECURITY DEFINER to take the tick; EXECUTE goes only to reader roles, which
-- may read every stream anyway.

CREATE FUNCTION pgfeed.tick_read_v1(streams text[], after_ticks bigint[], lim integer)
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
    floor_tick bigint
)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t_id   bigint;
    t_snap text;
    b_snap pg_snapshot;
    a_snap pg_snapshot;
    s       record;
    running xid8[];
BEGIN
    IF pg_current_xact_id_if_assigned() IS NOT NULL THEN
        RAISE EXCEPTION 'pgfeed.tick_read_v1() must run in a transaction of its own'
            USING ERRCODE = '25001', HINT = 'Call it in autocommit mode.';
    END IF;
    IF cardinality(streams) IS DISTINCT FROM cardinality(after_ticks) THEN
        RAISE EXCEPTION 'pgfeed: % streams given with % positions', cardinality(streams), cardinality(after_ticks)
            USING ERRCODE = '22023';
    END IF;
    SELECT t.id, t.snap INTO t_id, t_snap FROM pgfeed._take_tick_v1() t;
    b_snap := t_snap::pg_snapshot;
    RETURN QUERY SELECT t_id, t_snap,
        (SELECT coalesce(json_object_agg(st.name, json_build_array(st.id, st.created_tick, st.floor_tick)), '{}')
           FROM pgfeed.streams st WHERE st.name = ANY (streams))::text,
        NULL::text, NULL::bigint, NULL::bigint, NULL::timestamptz, NULL::text, NULL::jsonb, NULL::bigint;
    FOR s IN
        SELECT u.name, u.after, st.id AS sid
          FROM unnest(streams, after_ticks) AS u(name, after)
          JOIN pgfeed.streams st ON st.name = u.name
         WHERE u.after = t_id - 1
    LOOP
        SELECT tk.snap INTO a_snap FROM pgfeed.ticks tk WHERE tk.id = s.after;
        CONTINUE WHEN a_snap IS NULL;
        -- Transactions running at the previous tick and finished by this one
        -- (all below its xmax), then the xids assigned since: two ordered
        -- index range scans. The floor is read in the same statement
        -- (snapshot) as the rows.
        running := ARRAY(SELECT x FROM pg_snapshot_xip(a_snap) x WHERE pg_visible_in_snapshot(x, b_snap));
        RETURN QUERY
            SELECT t_id, NULL::text, NULL::text, s.name, r.xid, r.seq, r.created_at, r.key, r.payload, f.floor_tick
              FROM (SELECT st.floor_tick FROM pgfeed.streams st WHERE st.id = s.sid) f
              LEFT JOIN LATERAL (
                  (SELECT e.xid::text::bigint AS xid, e.seq, e.created_at, e.key, e.payload
                     FROM pgfeed.events e
                    WHERE e.stream_id = s.sid AND e.xid = ANY (running)
                    ORDER BY e.xid, e.seq LIMIT lim + 1)
                  UNION ALL
                  (SELECT e.xid::text::bigint, e.seq, e.created_at, e.key, e.payload
                     FROM pgfeed.events e
                    WHERE e.stream_id = s.sid
                      AND e.xid >= pg_snapshot_xmax(a_snap) AND e.xid < pg_snapshot_xmax(b_snap)
                      AND pg_visible_in_snapshot(e.xid, b_snap)
                    ORDER BY e.xid, e.seq LIMIT lim + 1)
              ) r ON true;
    END LOOP;
END $$;
REVOKE ALL ON FUNCTION pgfeed.tick_read_v1(text[], bigint[], integer) FROM PUBLIC;
