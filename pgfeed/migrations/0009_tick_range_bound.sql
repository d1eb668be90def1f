-- pgfeed 0009: a woken reader's read probes the ticks' index whatever the
-- plan.
--
-- read_live_v4 (0008) listed the ticks from the reader's known head with
-- "id >= known ORDER BY id LIMIT 1000". Depending on the table's
-- statistics and on the plan, that was planned as a scan and sort of the
-- whole ticks table, on every wake-up of every reader process, below some
-- thousands of ticks: a generic plan (readers force them) estimates
-- "id >= $1" at a third of the table whatever the statistics, and
-- statistics gathered while the table was nearly empty misled custom plans
-- too. Seen on the benchmark's fresh databases (a reader's read cost
-- 445-460 us of server CPU at one row a tick where it now costs 300-345)
-- and in a test with such statistics (3,012 tick rows read per call). The listing is now
-- bounded on both sides (id < known + 1000), which plans as an index range.
-- While the known tick exists these are the same ticks (each tick's id is
-- the newest one's plus one, so ids are consecutive; pruning removes only
-- the oldest); when it was pruned, possibly fewer, which a reader handles
-- as it handles more than 1,000 ticks since its known head. Same
-- signature: readers of 0008 call it unchanged.

CREATE OR REPLACE FUNCTION pgfeed.read_live_v4(known bigint, streams text[], after_ticks bigint[], lim integer)
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
    -- then the newest tick with the streams' incarnations. Bounded on both
    -- sides (ids are consecutive) so that no plan reads the whole table;
    -- least() keeps the bound from overflowing for a huge known.
    RETURN QUERY
        (SELECT t.id, t.snap::text, NULL::text, NULL::text, NULL::bigint, NULL::bigint,
                NULL::timestamptz, NULL::text, NULL::jsonb, NULL::bigint, t.seq_lo, t.seq_hi, NULL::bigint, t.fp
           FROM pgfeed.ticks t WHERE t.id >= known AND t.id < least(known, 9223372036854774807) + 1000 ORDER BY t.id)
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
