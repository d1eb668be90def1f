-- pgfeed 0007: continuity across the database's own life (see docs/design.md,
-- "When the database changes under you").
--
-- * Every tick records the cluster that took it (system_id, from
--   pg_control_system()) and a fingerprint (fp) of everything that makes it
--   that tick: id, snapshot, seq bounds, term, the server's clock at the
--   tick, cluster. A promoted standby that reuses a tick id, or a restored
--   database that is not the one a reader or a token saw, shows a different
--   fingerprint for the same id. Readers compare fingerprints of the ticks
--   they know; position tokens and saved consumer positions carry them.
-- * A tick on another cluster than the newest tick's (a dump restored into a
--   new cluster, pg_upgrade) continues the history only when that is sound:
--   the event sequence did not go back, and no row was appended with a
--   transaction id the restored ticks already count as ended (such a row
--   would never be delivered). Otherwise the ticker refuses, permanently,
--   with SQLSTATE PF004, until `pgfeed repair --after-restore` has moved
--   those rows into the next interval (repair_restamp_v3, after
--   advance_xids_v3 brought the cluster's transaction ids past the
--   restored ticks').
-- * The ticker's idle check (tick_v2) probes indexes instead of scanning
--   every event row (_changed_since_v3).
-- * append_v2 and append_many_v2 lose their SET search_path clause (a third
--   of an append's CPU), with every name schema-qualified instead.
-- * capture_v2 refuses a column renumbered by a logical restore (it bound
--   columns by number and read other columns silently).
-- * A lease whose heartbeat lies in the server's future (its clock went
--   back) can be claimed.
-- * prune_v2 runs as the owner (SECURITY DEFINER), so that the daemon under
--   `pgfeed grant ticker` keeps retention on and sees every consumer's saved
--   position; `grant ticker` grants it.
-- * A tick taken by create_stream_v2 inside a transaction that already
--   wrote copies the previous tick's snapshot (it saw a set of commits that
--   was not a prefix of the commit order).
-- * prune_v2 protects saved positions of the form TICK.SEQ (it recognised
--   only TICK and the 0.1 form): a consumer at a partial position was
--   reset instead of kept.
--
-- Every object of 0001-0006 keeps its signature, so readers and writers of
-- the previous release keep working while this is installed.

ALTER TABLE pgfeed.ticks ADD COLUMN system_id bigint;
ALTER TABLE pgfeed.ticks ADD COLUMN fp bigint;
COMMENT ON COLUMN pgfeed.ticks.system_id IS
    'pg_control_system().system_identifier of the cluster that took the tick (NULL: taken before 0007).';
COMMENT ON COLUMN pgfeed.ticks.fp IS
    'Fingerprint of the tick (pgfeed._tick_fp_v3): the same id with another fingerprint is another history.';

ALTER TABLE pgfeed.positions ADD COLUMN tick_fp bigint;
COMMENT ON COLUMN pgfeed.positions.tick_fp IS
    'Fingerprint of the tick the saved position names, as the consumer saw it (NULL: saved before 0007).';

-- The fingerprint: 60 bits of an MD5 over the tick's fields (an integrity
-- check against another history, not a secret).
CREATE FUNCTION pgfeed._tick_fp_v3(
    id bigint, snap pg_snapshot, seq_lo bigint, seq_hi bigint, taken_at timestamptz, term bigint, system_id bigint
) RETURNS bigint
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT ('x' || left(md5(concat_ws('|', id, snap::text, coalesce(seq_lo::text, '-'), coalesce(seq_hi::text, '-'),
                                      (extract(epoch FROM taken_at) * 1000000)::bigint,
                                      coalesce(term::text, '-'), coalesce(system_id::text, '-'))), 15))::bit(60)::bigint
$$;

UPDATE pgfeed.ticks t SET fp = pgfeed._tick_fp_v3(t.id, t.snap, t.seq_lo, t.seq_hi, t.taken_at, t.term, NULL);

-- This cluster's identity; NULL where the owner may not read pg_control
-- (then only the transaction-id and sequence checks guard a restore).
CREATE FUNCTION pgfeed._system_id_v3() RETURNS bigint
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN (SELECT c.system_identifier FROM pg_control_system() c);
EXCEPTION WHEN insufficient_privilege THEN
    RETURN NULL;
END $$;

-- Why the newest tick cannot be continued on this database, or NULL when it
-- can. For the ticker (_insert_tick_v2), `pgfeed status` and the repair.
-- SECURITY DEFINER so that a monitoring role may ask: it returns a reason,
-- never a row.
CREATE FUNCTION pgfeed._history_break_v3() RETURNS text
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
        SELECT count(*) INTO n FROM pgfeed.events e
         WHERE e.seq > last_hi AND pg_visible_in_snapshot(e.xid, last_snap);
        IF n > 0 THEN
            RETURN format('%s rows were appended on this database while its transaction ids were behind the '
                          'restored newest tick %s: the database was restored into another cluster; run '
                          '`pgfeed repair --after-restore`', n, last_id);
        END IF;
    END IF;
    RETURN NULL;
END $$;
REVOKE ALL ON FUNCTION pgfeed._history_break_v3() FROM PUBLIC;

-- As in 0004, plus: the cluster and fingerprint are recorded, and a tick on
-- another cluster than the newest tick's is refused while
-- _history_break_v3() names a reason (PF004: permanent until repaired, where
-- 0004's PF002 lifted by itself once the transaction ids passed the
-- restored ones, skipping the rows written meanwhile).
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
                pgfeed._tick_fp_v3(coalesce(last_id, 0) + 1, current, lo, hi, taken, tick_term, sys));
    PERFORM pg_notify('pgfeed_v2_ticks', (coalesce(last_id, 0) + 1)::text);
    RETURN QUERY SELECT coalesce(last_id, 0) + 1, current::text;
END $$;
REVOKE ALL ON FUNCTION pgfeed._insert_tick_v2(bigint, bigint) FROM PUBLIC;

-- The repair, step 1: end transactions until this cluster's next transaction
-- id is past target (the restored newest tick's xmax). A procedure, so that
-- each iteration commits; the caller turns synchronous_commit off first.
-- (No SET clause, no SECURITY DEFINER: both forbid COMMIT in a procedure;
-- every name is schema-qualified instead.)
CREATE PROCEDURE pgfeed.advance_xids_v3(target xid8)
LANGUAGE plpgsql AS $$
BEGIN
    WHILE pg_catalog.pg_current_xact_id() < target LOOP
        COMMIT;
    END LOOP;
    COMMIT;
END $$;
REVOKE ALL ON PROCEDURE pgfeed.advance_xids_v3(xid8) FROM PUBLIC;

-- The repair, step 2, in a transaction of its own: give every row the
-- restored ticks wrongly count as delivered (appended on this cluster with a
-- transaction id below theirs) this transaction's id, so that they form part
-- of the next interval, after the whole restored history, in append order.
-- Refuses while a transaction that could still append such a row runs.
-- Returns how many rows moved (dry_run: would move).
CREATE FUNCTION pgfeed.repair_restamp_v3(dry_run boolean DEFAULT false) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    last_id   bigint;
    last_snap pg_snapshot;
    last_hi   bigint;
    blockers  text;
    n         bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(7451287230471176193);
    SELECT t.id, t.snap, t.seq_hi INTO last_id, last_snap, last_hi FROM pgfeed.ticks t ORDER BY t.id DESC LIMIT 1;
    IF last_snap IS NULL OR last_hi IS NULL THEN
        RETURN 0;
    END IF;
    IF dry_run THEN
        SELECT count(*) INTO n FROM pgfeed.events e
         WHERE e.seq > last_hi AND pg_visible_in_snapshot(e.xid, last_snap);
        RETURN n;
    END IF;
    IF pg_snapshot_xmax(pg_current_snapshot()) < pg_snapshot_xmax(last_snap) THEN
        RAISE EXCEPTION 'pgfeed: this server''s transaction ids (%) are still behind the newest tick % (%)',
            pg_snapshot_xmax(pg_current_snapshot()), last_id, pg_snapshot_xmax(last_snap)
            USING ERRCODE = 'PF004', HINT = 'Call pgfeed.advance_xids_v3 first.';
    END IF;
    IF pg_snapshot_xmin(pg_current_snapshot()) < pg_snapshot_xmax(last_snap) THEN
        SELECT string_agg(format('pid %s (%s, %s)', a.pid, coalesce(nullif(a.application_name, ''), '-'),
                                 coalesce(a.state, '?')), ', ' ORDER BY a.pid)
          INTO blockers FROM pg_stat_activity a
         WHERE a.backend_xid IS NOT NULL AND a.pid <> pg_backend_pid();
        RAISE EXCEPTION 'pgfeed: transactions that began before the repair are still open: %',
            coalesce(blockers, 'none visible to this role')
            USING ERRCODE = '55006', HINT = 'Let them end (or terminate them), then run the repair again.';
    END IF;
    UPDATE pgfeed.events e SET xid = pg_current_xact_id()
     WHERE e.seq > last_hi AND pg_visible_in_snapshot(e.xid, last_snap);
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END $$;
REVOKE ALL ON FUNCTION pgfeed.repair_restamp_v3(boolean) FROM PUBLIC;

-- Retention as in 0004, protecting saved positions TICK.SEQ too (they need
-- tick TICK - 1, like the 0.1 form TICK.XID.SEQ). SECURITY DEFINER: run by
-- a role other than the owner (the daemon under `pgfeed grant ticker`), it
-- saw only that role's saved positions (row-level security) and so
-- protected no other consumer; EXECUTE goes to ticker roles only.
CREATE OR REPLACE FUNCTION pgfeed.prune_v2(older_than interval, protect_consumers boolean DEFAULT true, dry_run boolean DEFAULT false)
RETURNS TABLE (floor_tick bigint, ticks_deleted bigint, events_deleted bigint, held_by_consumers boolean)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    cut      bigint;
    keep     bigint;
    cut_snap pg_snapshot;
    n_ticks  bigint;
    n_events bigint;
    held     boolean := false;
BEGIN
    IF older_than IS NULL OR older_than < interval '0' THEN
        RAISE EXCEPTION 'pgfeed: invalid retention %', coalesce(older_than::text, 'NULL')
            USING ERRCODE = '22023', HINT = 'Give a non-negative interval, e.g. ''7 days''.';
    END IF;
    SELECT t.id INTO cut
        FROM pgfeed.ticks t
        WHERE t.taken_at < now() - older_than AND t.id < (SELECT max(id) FROM pgfeed.ticks)
        ORDER BY t.id DESC LIMIT 1;
    IF cut IS NOT NULL AND protect_consumers THEN
        SELECT min(CASE WHEN p.token ~ '^[0-9]+$' THEN p.token::bigint
                        ELSE split_part(p.token, '.', 1)::bigint - 1 END)
          INTO keep FROM pgfeed.positions p WHERE p.token ~ '^[0-9]{1,18}(\.[0-9]{1,18}){0,2}$';
        IF keep IS NOT NULL AND keep < cut THEN
            held := true;
            SELECT t.id INTO cut FROM pgfeed.ticks t WHERE t.id <= keep ORDER BY t.id DESC LIMIT 1;
        END IF;
    END IF;
    IF cut IS NULL THEN
        RETURN QUERY SELECT coalesce((SELECT max(s.floor_tick) FROM pgfeed.streams s), 0), 0::bigint, 0::bigint, held;
        RETURN;
    END IF;
    SELECT t.snap INTO cut_snap FROM pgfeed.ticks t WHERE t.id = cut;
    IF dry_run THEN
        SELECT count(*) INTO n_events FROM pgfeed.events e
            WHERE e.xid < pg_snapshot_xmax(cut_snap) AND pg_visible_in_snapshot(e.xid, cut_snap);
        SELECT count(*) INTO n_ticks FROM pgfeed.ticks t WHERE t.id < cut;
        RETURN QUERY SELECT cut, n_ticks, n_events, held;
        RETURN;
    END IF;
    DELETE FROM pgfeed.events e
        WHERE e.xid < pg_snapshot_xmax(cut_snap) AND pg_visible_in_snapshot(e.xid, cut_snap);
    GET DIAGNOSTICS n_events = ROW_COUNT;
    DELETE FROM pgfeed.ticks t WHERE t.id < cut;
    GET DIAGNOSTICS n_ticks = ROW_COUNT;
    UPDATE pgfeed.streams s SET floor_tick = cut WHERE s.floor_tick < cut;
    RETURN QUERY SELECT cut, n_ticks, n_events, held;
END $$;
REVOKE ALL ON FUNCTION pgfeed.prune_v2(interval, boolean, boolean) FROM PUBLIC;

-- Readers fetch ticks with their fingerprints (as read_live_v2, plus tick_fp).
CREATE FUNCTION pgfeed.read_live_v3(known bigint, streams text[], after_ticks bigint[], lim integer)
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
    IF head_id IS NULL OR head_id <> known + 1 THEN
        RETURN;
    END IF;
    FOR s IN
        SELECT u.name, u.after, st.id AS sid, st.floor_tick AS floor
          FROM unnest(streams, after_ticks) AS u(name, after)
          JOIN pgfeed.streams st ON st.name = u.name
         WHERE u.after = head_id - 1
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

-- The ticker's "anything new?" check without scanning rows. 0004's
-- _changed_since_v2 ORed two conditions inside one EXISTS over every events
-- partition, which the planner answers with a sequential scan: with a few
-- large transactions (bulk appends, captured bulk updates) an idle check took
-- 100-200 ms every idle_interval, and past the ticker's statement timeout no
-- check could finish, so a tick waited for an unrelated append. Here:
-- * rows of transactions the last tick listed as running: one index probe
--   per listed xid that has ended since (few: concurrent transactions).
--   OFFSET 0 keeps each probe a correlated subplan: flattened into a semi
--   join, it was planned as a hash join over every row of the partitions;
-- * rows of transactions that got their xid after the last tick's snapshot:
--   when nothing was appended since (cur_seq = last_hi), their seqs lie in
--   (last_lo, last_hi] (see _insert_tick_v2), the rows appended while that
--   tick was taken: an ordered index range, not the table.
CREATE FUNCTION pgfeed._changed_since_v3(last_snap pg_snapshot, last_lo bigint, last_hi bigint,
                                         cur pg_snapshot, cur_seq bigint)
RETURNS boolean
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    found boolean;
BEGIN
    IF last_hi IS NULL OR last_lo IS NULL OR cur_seq > last_hi THEN
        RETURN true;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_snapshot_xip(last_snap) running(x_id)
                WHERE pg_visible_in_snapshot(running.x_id, cur)
                  AND EXISTS (SELECT 1 FROM pgfeed.events e WHERE e.xid = running.x_id OFFSET 0)) THEN
        RETURN true;
    END IF;
    IF last_hi <= last_lo THEN
        RETURN false;  -- nothing was appended while the last tick was taken
    END IF;
    -- With the bounds as literals: planned with unknown bounds (a generic
    -- plan), the range may be estimated wide and every partition scanned.
    EXECUTE format('SELECT EXISTS (SELECT 1 FROM pgfeed.events e WHERE e.seq > %s AND e.seq <= %s'
                   ' AND e.xid >= %L::xid8 AND pg_visible_in_snapshot(e.xid, %L::pg_snapshot))',
                   last_lo, last_hi, pg_snapshot_xmax(last_snap), cur)
       INTO found;
    RETURN found;
END $$;
REVOKE ALL ON FUNCTION pgfeed._changed_since_v3(pg_snapshot, bigint, bigint, pg_snapshot, bigint) FROM PUBLIC;

-- tick_v2 as in 0004, deciding with _changed_since_v3.
CREATE OR REPLACE FUNCTION pgfeed.tick_v2(tick_term bigint, force boolean DEFAULT false) RETURNS TABLE (id bigint, snap text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    last_snap pg_snapshot;
    last_lo   bigint;
    last_seq  bigint;
    found_it  boolean;
    seq_lo    bigint;
BEGIN
    IF pg_current_xact_id_if_assigned() IS NOT NULL THEN
        RAISE EXCEPTION 'pgfeed.tick_v2() must run in a transaction of its own'
            USING ERRCODE = '25001', HINT = 'Call it in autocommit mode.';
    END IF;
    IF NOT force THEN
        SELECT t.snap, t.seq_lo, t.seq_hi INTO last_snap, last_lo, last_seq FROM pgfeed.ticks t ORDER BY t.id DESC LIMIT 1;
        IF last_snap IS NOT NULL
           AND NOT pgfeed._changed_since_v3(last_snap, last_lo, last_seq, pg_current_snapshot(), pgfeed._seq_now_v2()) THEN
            RETURN;
        END IF;
    END IF;
    -- Before the row lock below gives this transaction an xid.
    seq_lo := pgfeed._seq_now_v2();
    SELECT true INTO found_it FROM pgfeed.ticker l WHERE l.term = tick_term FOR SHARE;
    IF found_it IS NULL THEN
        RAISE EXCEPTION 'pgfeed: ticker term % was superseded', tick_term
            USING ERRCODE = 'PF001', HINT = 'Another ticker holds the lease now.';
    END IF;
    RETURN QUERY SELECT * FROM pgfeed._insert_tick_v2(tick_term, seq_lo);
END $$;
REVOKE ALL ON FUNCTION pgfeed.tick_v2(bigint, boolean) FROM PUBLIC;

-- resolve_token_v2 as in 0004, its snapshot-token check by index probes
-- instead of one EXISTS over every event row (the same scan as the ticker's
-- old check: wait_for resolves a commit token with it).
CREATE OR REPLACE FUNCTION pgfeed.resolve_token_v2(token text) RETURNS bigint
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    head_id   bigint;
    head_snap pg_snapshot;
    head_lo   bigint;
    pending   boolean;
    x         xid8;
    snap      pg_snapshot;
BEGIN
    SELECT t.id, t.snap, t.seq_lo INTO head_id, head_snap, head_lo FROM pgfeed.ticks t ORDER BY t.id DESC LIMIT 1;
    IF token ~ '^x[0-9]{1,19}$' THEN
        x := substr(token, 2)::xid8;
        -- A hot standby may not have replayed it yet: wait, do not refuse.
        IF x >= pg_snapshot_xmax(pg_current_snapshot()) AND pg_is_in_recovery() THEN
            RETURN NULL;
        END IF;
        IF pg_xact_status(x) IS NOT DISTINCT FROM 'in progress' THEN
            RETURN NULL;
        END IF;
        IF pg_visible_in_snapshot(x, head_snap)
           OR NOT EXISTS (SELECT 1 FROM pgfeed.events e WHERE e.xid = x) THEN
            RETURN head_id;
        END IF;
        RETURN NULL;
    ELSIF token ~ '^s[0-9]+:[0-9]+:[0-9,]*$' THEN
        snap := substr(token, 2)::pg_snapshot;
        IF pg_snapshot_xmax(snap) > pg_snapshot_xmax(pg_current_snapshot()) THEN
            IF pg_is_in_recovery() THEN
                RETURN NULL;
            END IF;
            RAISE EXCEPTION 'pgfeed: commit token % is beyond anything this database has issued', token
                USING ERRCODE = 'PF003';
        END IF;
        -- Not covered while a transaction the token counts as ended, and the
        -- newest tick does not, wrote a row: one the tick listed as running
        -- (an index probe each), or one whose xid the tick had not reached
        -- (an index probe per such xid; by seq when there are many of them:
        -- such rows were appended after the tick's seq_lo).
        IF EXISTS (SELECT 1 FROM pg_snapshot_xip(head_snap) running(x_id)
                    WHERE pg_visible_in_snapshot(running.x_id, snap)
                      AND EXISTS (SELECT 1 FROM pgfeed.events e WHERE e.xid = running.x_id OFFSET 0)) THEN
            RETURN NULL;
        END IF;
        IF pg_snapshot_xmax(snap)::text::bigint - pg_snapshot_xmax(head_snap)::text::bigint <= 10000 OR head_lo IS NULL THEN
            IF EXISTS (SELECT 1 FROM generate_series(pg_snapshot_xmax(head_snap)::text::bigint,
                                                     pg_snapshot_xmax(snap)::text::bigint - 1) g(i)
                        WHERE pg_visible_in_snapshot(i::text::xid8, snap)
                          AND EXISTS (SELECT 1 FROM pgfeed.events e WHERE e.xid = i::text::xid8 OFFSET 0)) THEN
                RETURN NULL;
            END IF;
        ELSE
            -- Literal bounds, as in _changed_since_v3.
            EXECUTE format('SELECT EXISTS (SELECT 1 FROM pgfeed.events e WHERE e.seq > %s AND e.xid >= %L::xid8'
                           ' AND e.xid < %L::xid8 AND pg_visible_in_snapshot(e.xid, %L::pg_snapshot))',
                           head_lo, pg_snapshot_xmax(head_snap), pg_snapshot_xmax(snap), snap)
               INTO pending;
            IF pending THEN
                RETURN NULL;
            END IF;
        END IF;
        RETURN head_id;
    END IF;
    RAISE EXCEPTION 'pgfeed: malformed commit token %', quote_literal(token)
        USING ERRCODE = '22023', HINT = 'Expected x<xid> or s<snapshot>, as returned by pgfeed.commit_token().';
END $$;

-- ticker_claim_v2 as in 0004, plus: a lease whose heartbeat lies in the
-- server's future is expired. After the server's clock went back by J, the
-- live leader's expires_at would otherwise hold off every candidate for J
-- more seconds when that leader dies; a claim now just moves to a new term
-- (fenced: the old leader's next renewal or tick is refused).
CREATE OR REPLACE FUNCTION pgfeed.ticker_claim_v2(claimant text, claimant_kind text, ttl_ms integer)
RETURNS TABLE (term bigint, expires_at timestamptz)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF claimant_kind IS NULL OR claimant_kind NOT IN ('daemon', 'reader') THEN
        RAISE EXCEPTION 'pgfeed: invalid ticker kind %', coalesce(quote_literal(claimant_kind), 'NULL')
            USING ERRCODE = '22023', HINT = 'Give ''daemon'' or ''reader''.';
    END IF;
    IF ttl_ms IS NULL OR ttl_ms <= 0 THEN
        RAISE EXCEPTION 'pgfeed: invalid ticker lease % ms', coalesce(ttl_ms::text, 'NULL')
            USING ERRCODE = '22023', HINT = 'Give a positive number of milliseconds.';
    END IF;
    RETURN QUERY
        UPDATE pgfeed.ticker l
           SET term = l.term + 1, holder = claimant, kind = claimant_kind, backend_pid = pg_backend_pid(),
               started_at = clock_timestamp(), heartbeat_at = clock_timestamp(),
               expires_at = clock_timestamp() + make_interval(secs => ttl_ms / 1000.0)
         WHERE l.expires_at < clock_timestamp()
            OR l.heartbeat_at > clock_timestamp() + interval '1 second'
            OR (claimant_kind = 'daemon' AND l.kind = 'reader')
        RETURNING l.term, l.expires_at;
END $$;
REVOKE ALL ON FUNCTION pgfeed.ticker_claim_v2(text, text, integer) FROM PUBLIC;

-- append_v2 and append_many_v2 as in 0004, without the SET search_path
-- clause: PostgreSQL saves and restores the setting around every call, which
-- cost about a third of an append's CPU (11 of 35 us a row, measured in one
-- transaction on PostgreSQL 15). They are not SECURITY DEFINER (they run as
-- the writer, under the events_append policy), so pinning the path protects
-- nothing; every name is schema-qualified instead, operators included.
CREATE OR REPLACE FUNCTION pgfeed.append_v2(stream text, payload jsonb, key text DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    sid   bigint;
    lim   integer;
    mode  text;
    seq   bigint;
    size  integer;
BEGIN
    IF payload IS NULL THEN
        RAISE EXCEPTION 'pgfeed: payload for stream % is SQL NULL', pg_catalog.quote_literal(stream)
            USING ERRCODE = '22004', HINT = 'Pass any JSON value; JSON null (''null''::jsonb) is accepted.';
    END IF;
    SELECT st.id, st.max_payload_bytes, st.notify_mode INTO sid, lim, mode
      FROM pgfeed.streams st WHERE st.name OPERATOR(pg_catalog.=) stream;
    IF sid IS NULL THEN
        RAISE EXCEPTION 'pgfeed: unknown stream %', coalesce(pg_catalog.quote_literal(stream), 'NULL')
            USING ERRCODE = '42704', HINT = 'Create it with: pgfeed stream create NAME';
    END IF;
    size := pg_catalog.pg_column_size(payload);
    IF size OPERATOR(pg_catalog.>) lim THEN
        RAISE EXCEPTION 'pgfeed: payload of % bytes exceeds the limit of % bytes for stream %',
            size, lim, pg_catalog.quote_literal(stream)
            USING ERRCODE = '54000';
    END IF;
    INSERT INTO pgfeed.events (stream_id, key, payload) VALUES (sid, key, payload);
    -- Not RETURNING: that needs SELECT on the table, which writers lack.
    seq := pg_catalog.currval('pgfeed.event_seq');
    IF mode OPERATOR(pg_catalog.=) 'immediate' THEN
        PERFORM pg_catalog.pg_notify('pgfeed_v2_wake', '');
    END IF;
    RETURN seq;
END $$;

CREATE OR REPLACE FUNCTION pgfeed.append_many_v2(stream text, payloads jsonb[], keys text[] DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    sid  bigint;
    lim  integer;
    mode text;
    big  record;
    n    bigint;
BEGIN
    IF payloads IS NULL THEN
        RAISE EXCEPTION 'pgfeed: payloads for stream % is SQL NULL',
            coalesce(pg_catalog.quote_literal(stream), 'NULL')
            USING ERRCODE = '22004', HINT = 'Pass an array of JSON values (an empty array appends nothing).';
    END IF;
    IF keys IS NOT NULL AND pg_catalog.cardinality(keys) OPERATOR(pg_catalog.<>) pg_catalog.cardinality(payloads) THEN
        RAISE EXCEPTION 'pgfeed: % keys given for % payloads', pg_catalog.cardinality(keys), pg_catalog.cardinality(payloads)
            USING ERRCODE = '22023';
    END IF;
    SELECT st.id, st.max_payload_bytes, st.notify_mode INTO sid, lim, mode
      FROM pgfeed.streams st WHERE st.name OPERATOR(pg_catalog.=) stream;
    IF sid IS NULL THEN
        RAISE EXCEPTION 'pgfeed: unknown stream %', coalesce(pg_catalog.quote_literal(stream), 'NULL')
            USING ERRCODE = '42704', HINT = 'Create it with: pgfeed stream create NAME';
    END IF;
    SELECT i INTO big FROM pg_catalog.unnest(payloads) WITH ORDINALITY u(p, i) WHERE p IS NULL ORDER BY i LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'pgfeed: payload % of % for stream % is SQL NULL', big.i, pg_catalog.cardinality(payloads),
            pg_catalog.quote_literal(stream)
            USING ERRCODE = '22004', HINT = 'Pass any JSON value; JSON null (''null''::jsonb) is accepted.';
    END IF;
    -- Measured as append_v2 measures one payload (see append_many_v1).
    SELECT u.i, u.size INTO big
        FROM (SELECT i, CASE WHEN pg_catalog.pg_column_size(p) OPERATOR(pg_catalog.<=) 127
                             THEN pg_catalog.pg_column_size(p) OPERATOR(pg_catalog.+) 3
                             ELSE pg_catalog.pg_column_size(p) END AS size
                FROM pg_catalog.unnest(payloads) WITH ORDINALITY AS a(p, i)) u
        WHERE u.size OPERATOR(pg_catalog.>) lim ORDER BY u.i LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'pgfeed: payload % of % (% bytes) exceeds the limit of % bytes for stream %',
            big.i, pg_catalog.cardinality(payloads), big.size, lim, pg_catalog.quote_literal(stream)
            USING ERRCODE = '54000';
    END IF;
    INSERT INTO pgfeed.events (stream_id, key, payload)
        SELECT sid, k, p
          FROM ROWS FROM (pg_catalog.unnest(payloads), pg_catalog.unnest(coalesce(keys,
                   pg_catalog.array_fill(NULL::pg_catalog.text, ARRAY[pg_catalog.cardinality(payloads)]))))
               WITH ORDINALITY AS u(p, k, i) ORDER BY i;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n OPERATOR(pg_catalog.>) 0 AND mode OPERATOR(pg_catalog.=) 'immediate' THEN
        PERFORM pg_catalog.pg_notify('pgfeed_v2_wake', '');
    END IF;
    RETURN n;
END $$;

-- capture_v2 as in 0005, plus: a column whose captured name now sits at
-- another attribute number fails the write loudly. Columns are bound by
-- number so that renames are followed; a logical restore (pg_dump) renumbers
-- the columns of a table that had dropped ones, and the numbers then named
-- other columns silently (a wrong key, a spurious key change). Only a column
-- whose name changed pays the extra catalog lookup.
CREATE OR REPLACE FUNCTION pgfeed.capture_v2() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    stream  text    := TG_ARGV[0];
    nums    int2[]  := TG_ARGV[1]::int2[];
    nk      integer := cardinality(nums);
    opts    text[]  := string_to_array(TG_ARGV[3], ',');
    rel     oid     := TG_RELID;
    tbl     text;
    part    text;
    names   text[]  := '{}';
    n       name;
    lost    text;
    was     text;
    moved   int2;
    named   jsonb   := TG_ARGV[4]::jsonb;
    rec     jsonb;
    old_rec jsonb;
    k       jsonb   := '{}';
    ok      jsonb   := '{}';
    cur     jsonb;
    prev    jsonb;
    body    jsonb;
BEGIN
    IF 'partitioned' = ANY (opts) THEN
        SELECT a.relid, format('%I.%I', n.nspname, c.relname) INTO rel, tbl
          FROM pg_partition_ancestors(TG_RELID) WITH ORDINALITY AS a(relid, depth)
          JOIN pg_trigger t ON t.tgrelid = a.relid AND t.tgname = TG_NAME AND t.tgparentid = 0
          JOIN pg_class c ON c.oid = a.relid JOIN pg_namespace n ON n.oid = c.relnamespace
         ORDER BY a.depth DESC LIMIT 1;
        IF rel <> TG_RELID THEN
            part := format('%I.%I', TG_TABLE_SCHEMA, TG_TABLE_NAME);
        END IF;
    ELSE
        tbl := format('%I.%I', TG_TABLE_SCHEMA, TG_TABLE_NAME);
    END IF;

    IF TG_LEVEL = 'STATEMENT' THEN
        IF TG_OP <> 'TRUNCATE' THEN
            RAISE EXCEPTION 'pgfeed: capture_v2 on % fired for a % statement', tbl, TG_OP
                USING ERRCODE = '39P01', HINT = 'Install captures with pgfeed capture.';
        END IF;
        body := jsonb_build_object('op', 'truncate', 'table', tbl);
        IF part IS NOT NULL THEN
            body := body || jsonb_build_object('partition', part);
        END IF;
        PERFORM pgfeed.append_v2(stream, body, NULL);
        RETURN NULL;
    END IF;

    IF TG_ARGV[2] <> '*' THEN
        nums := nums || TG_ARGV[2]::int2[];
    END IF;
    FOR i IN 1 .. cardinality(nums) LOOP
        -- One unique index lookup per column.
        SELECT a.attname INTO n FROM pg_attribute a
         WHERE a.attrelid = rel AND a.attnum = nums[i] AND NOT a.attisdropped;
        IF n IS NULL THEN
            -- Dropped (or, after a logical restore, renumbered away): name the
            -- column as it was named when captured; never append a null for it.
            lost := format('%s %s', CASE WHEN i <= nk THEN 'key column' ELSE 'column' END,
                           quote_ident(coalesce(CASE WHEN i <= nk THEN TG_ARGV[4]::jsonb -> 'key' ->> (i - 1)
                                                     ELSE TG_ARGV[4]::jsonb -> 'columns' ->> (i - nk - 1) END,
                                                nums[i]::text)));
            RAISE EXCEPTION 'pgfeed: capture of % into stream %: its % was dropped from the table; run pgfeed capture again or uncapture',
                tbl, quote_literal(stream), lost
                USING ERRCODE = '55000',
                      HINT = 'Run pgfeed capture for this table and stream again (it resolves the columns anew), or pgfeed uncapture.';
        END IF;
        -- Renamed since the capture, or renumbered by a logical restore (pg_dump
        -- renumbers the columns of a table that had dropped ones, and the
        -- trigger's numbers then name other columns)? A name captured that
        -- now sits at another number tells them apart: fail loudly.
        was := CASE WHEN i <= nk THEN named -> 'key' ->> (i - 1) ELSE named -> 'columns' ->> (i - nk - 1) END;
        IF was IS NOT NULL AND was <> n THEN
            SELECT a.attnum INTO moved FROM pg_attribute a
             WHERE a.attrelid = rel AND a.attname = was AND NOT a.attisdropped;
            IF moved IS NOT NULL THEN
                RAISE EXCEPTION 'pgfeed: capture of % into stream %: column % is now number % and number % is %: the table was restored or its columns swapped; run pgfeed capture again',
                    tbl, quote_literal(stream), quote_ident(was), moved, nums[i], quote_ident(n)
                    USING ERRCODE = '55000',
                          HINT = 'Run pgfeed capture for this table and stream again (it resolves the columns anew), or pgfeed uncapture.';
            END IF;
        END IF;
        names[i] := n;
    END LOOP;

    IF TG_OP = 'DELETE' THEN rec := to_jsonb(OLD); ELSE rec := to_jsonb(NEW); END IF;
    IF TG_OP = 'UPDATE' THEN old_rec := to_jsonb(OLD); END IF;
    -- The key, and the listed columns, from the new row (the old one for a
    -- delete) and, for an update, from the old row too. old_rec is NULL for
    -- an insert or delete, and so are ok and prev then.
    FOR i IN 1 .. cardinality(names) LOOP
        IF i <= nk THEN
            k := k || jsonb_build_object(names[i], rec -> names[i]);
            ok := ok || jsonb_build_object(names[i], old_rec -> names[i]);
        ELSE
            cur := coalesce(cur, '{}') || jsonb_build_object(names[i], rec -> names[i]);
            prev := coalesce(prev, '{}') || jsonb_build_object(names[i], old_rec -> names[i]);
        END IF;
    END LOOP;
    IF TG_ARGV[2] = '*' THEN
        cur := rec;
        prev := old_rec;
    ELSIF cur IS NULL THEN  -- an empty column list
        cur := '{}';
        prev := '{}';
    END IF;
    IF TG_OP = 'UPDATE' AND 'skip_unchanged' = ANY (opts) AND ok = k AND prev = cur THEN
        RETURN NULL;
    END IF;

    body := jsonb_build_object('op', lower(TG_OP), 'table', tbl, 'key', k, 'row', cur);
    IF TG_OP = 'UPDATE' AND ok <> k THEN
        body := body || jsonb_build_object('old_key', ok);
    END IF;
    IF part IS NOT NULL THEN
        body := body || jsonb_build_object('partition', part);
    END IF;
    PERFORM pgfeed.append_v2(stream, body, k::text);
    RETURN NULL;
END $$;
REVOKE ALL ON FUNCTION pgfeed.capture_v2() FROM PUBLIC;

REVOKE ALL ON FUNCTION pgfeed.read_live_v3(bigint, text[], bigint[], integer),
    pgfeed._tick_fp_v3(bigint, pg_snapshot, bigint, bigint, timestamptz, bigint, bigint),
    pgfeed._system_id_v3() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgfeed._history_break_v3() TO pg_monitor;

-- Roles already granted `ticker` may prune (the daemon's retention).
DO $$
DECLARE
    g record;
BEGIN
    FOR g IN SELECT DISTINCT r.rolname FROM pgfeed.role_grants rg JOIN pg_roles r ON r.oid = rg.role_oid
              WHERE rg.kind = 'ticker' LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION pgfeed.prune_v2(interval, boolean, boolean) TO %I', g.rolname);
    END LOOP;
END $$;

-- Roles already granted `reader` read with v3.
DO $$
DECLARE
    g record;
BEGIN
    FOR g IN SELECT DISTINCT r.rolname FROM pgfeed.role_grants rg JOIN pg_roles r ON r.oid = rg.role_oid
              WHERE rg.kind = 'reader' LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION pgfeed.read_live_v3(bigint, text[], bigint[], integer) TO %I',
                       g.rolname);
    END LOOP;
END $$;
