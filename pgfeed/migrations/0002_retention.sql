-- pgfeed 0002: retention. Ticks and events older than a cut-off tick can be
-- pruned; each stream records the tick below which it no longer holds rows
-- (floor_tick), so a reader whose position is older resets instead of
-- silently skipping what was deleted.

ALTER TABLE pgfeed.streams ADD COLUMN floor_tick bigint NOT NULL DEFAULT 0;
COMMENT ON COLUMN pgfeed.streams.floor_tick IS
    'Rows of intervals up to this tick were pruned; a position older than it cannot be resumed and resets.';

-- Delete every event of every stream visible in the newest tick older than
-- `older_than`, and every tick before that one. The newest tick always stays.
CREATE FUNCTION pgfeed.prune_v1(older_than interval)
RETURNS TABLE (floor_tick bigint, ticks_deleted bigint, events_deleted bigint)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    cut      bigint;
    cut_snap pg_snapshot;
    n_ticks  bigint;
    n_events bigint;
BEGIN
    IF older_than IS NULL OR older_than < interval '0' THEN
        RAISE EXCEPTION 'pgfeed: invalid retention %', coalesce(older_than::text, 'NULL')
            USING ERRCODE = '22023', HINT = 'Give a non-negative interval, e.g. ''7 days''.';
    END IF;
    SELECT t.id, t.snap INTO cut, cut_snap
        FROM pgfeed.ticks t
        WHERE t.taken_at < now() - older_than AND t.id < (SELECT max(id) FROM pgfeed.ticks)
        ORDER BY t.id DESC LIMIT 1;
    IF cut IS NULL THEN
        RETURN QUERY SELECT coalesce((SELECT max(s.floor_tick) FROM pgfeed.streams s), 0), 0::bigint, 0::bigint;
        RETURN;
    END IF;
    DELETE FROM pgfeed.events e
        WHERE e.xid < pg_snapshot_xmax(cut_snap) AND pg_visible_in_snapshot(e.xid, cut_snap);
    GET DIAGNOSTICS n_events = ROW_COUNT;
    DELETE FROM pgfeed.ticks t WHERE t.id < cut;
    GET DIAGNOSTICS n_ticks = ROW_COUNT;
    UPDATE pgfeed.streams s SET floor_tick = cut WHERE s.floor_tick < cut;
    RETURN QUERY SELECT cut, n_ticks, n_events;
END $$;
REVOKE ALL ON FUNCTION pgfeed.prune_v1(interval) FROM PUBLIC;
