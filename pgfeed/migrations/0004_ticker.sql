-- pgfeed 0004: one ticker per database.
--
-- Until now every reader took ticks when woken and every append sent a
-- NOTIFY, so the database's cost grew with writes x readers. From here on:
--
-- * exactly one ticker (elected through the lease row pgfeed.ticker, fenced
--   by its term) takes ticks, only when something changed, and sends one
--   NOTIFY per tick on pgfeed_v2_ticks (payload: the tick id, no row data);
-- * writers only INSERT (append_v2: static SQL, no NOTIFY unless the stream
--   asked for notify_mode 'immediate', which wakes the ticker at once);
-- * readers only read (read_live_v2 replaces tick_read_v1 for them);
-- * commit tokens name the writer's transaction and need no write at all.
--
-- The order argument does not depend on the election: _tick_v2 takes every
-- tick under the same advisory lock as _take_tick_v1, after the previous tick
-- committed, so even two tickers at once (a deposed leader, a reader of the
-- previous release calling tick_v1) produce consistent ticks. The lease only
-- keeps the volume down; the term check is a fence on top.
--
-- Everything of 0001-0003 stays, so readers and writers of the previous
-- release keep working while this is installed (their NOTIFY-less streams are
-- followed by their fallback poll).

-- Order inside a tick interval becomes seq, the global append order (see
-- docs/design.md, "Causal order"): a transaction that appended after it saw
-- another's commit allocated its seq after every seq of that one. Reading an
-- interval in seq order needs two bounds per tick, and a snapshot that lists
-- every running transaction below its xmax ("closed", see _insert_tick_v2).
ALTER TABLE pgfeed.ticks ADD COLUMN seq_lo bigint;
ALTER TABLE pgfeed.ticks ADD COLUMN seq_hi bigint;
ALTER TABLE pgfeed.ticks ADD COLUMN term bigint;
COMMENT ON COLUMN pgfeed.ticks.seq_lo IS
    'Every row whose xid is at or above the snapshot''s xmax has a higher seq (NULL: tick of the previous release; readers then fall back to xid ranges).';
COMMENT ON COLUMN pgfeed.ticks.seq_hi IS
    'pgfeed.event_seq as read just after the snapshot: every row with a higher seq was appended after the tick (NULL: tick of the previous release).';

-- A row's xid is assigned before its seq is allocated (the default of seq
-- asks for the xid first; the xid column's own default comes after it in
-- column order). Hence a row with seq <= S was written by a transaction whose
-- xid existed when S was read. ALTER recurses to every partition; new
-- partitions copy it.
ALTER TABLE pgfeed.events ALTER COLUMN seq
    SET DEFAULT CASE WHEN pg_current_xact_id() IS NOT NULL THEN nextval('pgfeed.event_seq') END;
-- Range reads in seq order.
CREATE INDEX events_seq ON pgfeed.events (seq);
COMMENT ON COLUMN pgfeed.ticks.term IS
    'Ticker term the tick was taken under (NULL: taken by create_stream or a reader of the previous release).';

-- The lease. One row; a claim bumps the term, so a deposed leader's renewals
-- and ticks (which name its term) are refused. Timestamps come from the
-- server's clock only, so clients' clocks never matter.
CREATE TABLE pgfeed.ticker (
    one          boolean PRIMARY KEY DEFAULT true CHECK (one),
    term         bigint NOT NULL DEFAULT 0,
    holder       text,
    kind         text CHECK (kind IN ('daemon', 'reader')),
    backend_pid  integer,
    started_at   timestamptz,
    heartbeat_at timestamptz,
    expires_at   timestamptz NOT NULL DEFAULT '-infinity'
);
INSERT INTO pgfeed.ticker DEFAULT VALUES;
COMMENT ON TABLE pgfeed.ticker IS
    'The ticker lease: who ticks (holder, kind), under which term, and its heartbeat.';

ALTER TABLE pgfeed.streams DROP CONSTRAINT streams_notify_mode_check;
ALTER TABLE pgfeed.streams ADD CONSTRAINT streams_notify_mode_check
    CHECK (notify_mode IN ('ticker', 'immediate', 'poll'));
ALTER TABLE pgfeed.streams ALTER COLUMN notify_mode SET DEFAULT 'ticker';
-- The built-in stream was created 'immediate' only because that was the one
-- way to wake readers; with a ticker it need not pay NOTIFY's commit lock.
UPDATE pgfeed.streams SET notify_mode = 'ticker' WHERE name = 'caches' AND notify_mode = 'immediate';

ALTER TABLE pgfeed.role_grants DROP CONSTRAINT role_grants_kind_check;
ALTER TABLE pgfeed.role_grants ADD CONSTRAINT role_grants_kind_check
    CHECK (kind IN ('writer', 'reader', 'ticker'));

-- Writers append through the parent table (static SQL, one cached plan), so
-- per-stream writer grants become a row-level policy there. Owner-run code
-- (capture_v1, SECURITY DEFINER) is not subject to it; partitions keep their
-- own INSERT grants for direct inserts. Reads through the parent see all rows.
-- The check is inline (writers get SELECT on pgfeed.role_grants, which holds
-- role oids and stream ids only): a SECURITY DEFINER function per row halved
-- a writer role's append rate (bench/).
ALTER TABLE pgfeed.events ENABLE ROW LEVEL SECURITY;
CREATE POLICY events_read ON pgfeed.events FOR SELECT USING (true);
CREATE POLICY events_append ON pgfeed.events FOR INSERT WITH CHECK (EXISTS (
    SELECT 1 FROM pgfeed.role_grants g
     WHERE g.kind = 'writer' AND (g.stream_id IS NULL OR g.stream_id = events.stream_id)
       AND pg_catalog.pg_has_role(current_user, g.role_oid, 'USAGE')));

-- Change detection for the ticker, without locks or writes: did any row
-- become visible since tick `last`? Rows appended since (seq advanced), or
-- rows of transactions running at `last` that have finished by `cur`.
CREATE FUNCTION pgfeed._changed_since_v2(last_snap pg_snapshot, last_seq bigint, cur pg_snapshot, cur_seq bigint)
RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT last_seq IS NULL OR cur_seq > last_seq OR EXISTS (
        SELECT 1 FROM pgfeed.events e
         WHERE (e.xid = ANY (ARRAY(SELECT x FROM pg_snapshot_xip(last_snap) x WHERE pg_visible_in_snapshot(x, cur)))
                OR (e.xid >= pg_snapshot_xmax(last_snap) AND e.xid < pg_snapshot_xmax(cur)
                    AND pg_visible_in_snapshot(e.xid, cur))))
$$;

CREATE FUNCTION pgfeed._seq_now_v2() RETURNS bigint
LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN s.is_called THEN s.last_value ELSE 0 END FROM pgfeed.event_seq s
$$;

-- Insert the next tick. Caller: READ COMMITTED, its own transaction; seq_lo
-- read by the caller before its transaction got an xid (or NULL when it had
-- one already: create_stream_v2 inside a larger transaction). Takes the tick
-- lock, so the snapshot (a statement run after the lock was granted) sees
-- everything the previous tick saw.
--
-- The stored snapshot is *closed*: its xmax is raised to this transaction's
-- own xid and every transaction still running below it is listed (a plain
-- pg_current_snapshot() leaves out running xids at or above its xmax). Then
-- every row with xid >= xmax was written by a transaction that got its xid
-- after seq_lo was read, so its seq is above seq_lo; and every row with
-- seq <= seq_lo that this tick does not see belongs to a listed xid. With no
-- usable seq_lo, the tick keeps the previous tick's xmax and seq_lo, for
-- which the same holds.
--
-- Refuses a snapshot behind the newest tick: that database is not the
-- continuation of the one that took it (restored into a new cluster) and
-- ticking on would skip rows silently.
CREATE FUNCTION pgfeed._insert_tick_v2(tick_term bigint, seq_lo bigint) RETURNS TABLE (id bigint, snap text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    own       xid8;
    last_id   bigint;
    last_snap pg_snapshot;
    last_lo   bigint;
    current   pg_snapshot;
    top       xid8;
    lo        bigint := seq_lo;
    hi        bigint;
    running   xid8[];
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'pgfeed: ticks must be taken at READ COMMITTED, not %',
            current_setting('transaction_isolation')
            USING ERRCODE = '25001';
    END IF;
    own := pg_current_xact_id();
    PERFORM pg_advisory_xact_lock(7451287230471176193);
    SELECT t.id, t.snap, t.seq_lo INTO last_id, last_snap, last_lo FROM pgfeed.ticks t ORDER BY t.id DESC LIMIT 1;
    SELECT s INTO current FROM pg_current_snapshot() AS s;
    hi := pgfeed._seq_now_v2();
    IF last_snap IS NOT NULL AND pg_snapshot_xmax(current) < pg_snapshot_xmax(last_snap) THEN
        RAISE EXCEPTION 'pgfeed: refusing to tick: this server''s transaction ids (%) are behind the newest tick % (%)',
            pg_snapshot_xmax(current), last_id, pg_snapshot_xmax(last_snap)
            USING ERRCODE = 'PF002',
                  HINT = 'The database was restored into a new cluster or replaced; see "When the database changes under you" in docs/design.md.';
    END IF;
    IF lo IS NOT NULL THEN
        top := greatest(own, pg_snapshot_xmax(current));
    ELSE
        -- Clamped: as far as the previous tick, with its seq_lo.
        top := coalesce(pg_snapshot_xmax(last_snap), pg_snapshot_xmax(current));
        lo := CASE WHEN last_snap IS NULL THEN 0 ELSE last_lo END;
    END IF;
    -- Running below top: the snapshot's list, this transaction when below
    -- top, and every xid between the snapshot's xmax and top (few: xids
    -- handed out after the latest one to end).
    -- Those between the snapshot's xmax and top had all been handed out and
    -- none had ended when the snapshot was taken (its xmax is one past the
    -- latest xid to end), so they count as running. Asking now whether they
    -- have ended would let a later commit in ahead of an earlier one (and
    -- clog says "committed" before a transaction leaves the running set that
    -- readers' snapshots use).
    running := ARRAY(
        SELECT x FROM pg_snapshot_xip(current) x WHERE x < top
        UNION SELECT own WHERE own < top
        UNION SELECT i::text::xid8 FROM generate_series(pg_snapshot_xmax(current)::text::bigint, top::text::bigint - 1) i
        ORDER BY 1);
    current := format('%s:%s:%s', coalesce((SELECT min(x) FROM unnest(running) x), top), top,
                      array_to_string(running, ','))::pg_snapshot;
    INSERT INTO pgfeed.ticks (id, snap, taken_at, seq_lo, seq_hi, term)
        VALUES (coalesce(last_id, 0) + 1, current, clock_timestamp(), lo, hi, tick_term);
    PERFORM pg_notify('pgfeed_v2_ticks', (coalesce(last_id, 0) + 1)::text);
    RETURN QUERY SELECT coalesce(last_id, 0) + 1, current::text;
END $$;
REVOKE ALL ON FUNCTION pgfeed._insert_tick_v2(bigint, bigint) FROM PUBLIC;

-- The ticker's one call per cadence. Without a change since the newest tick
-- it returns no row and writes nothing (no xid, no WAL). Otherwise it checks
-- the term under a row lock on the lease (a claim, which updates that row,
-- either happened before and the term no longer matches, or waits for this
-- transaction) and inserts the tick, all in one transaction.
CREATE FUNCTION pgfeed.tick_v2(tick_term bigint, force boolean DEFAULT false) RETURNS TABLE (id bigint, snap text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    last_snap pg_snapshot;
    last_seq  bigint;
    found_it  boolean;
    seq_lo    bigint;
BEGIN
    IF pg_current_xact_id_if_assigned() IS NOT NULL THEN
        RAISE EXCEPTION 'pgfeed.tick_v2() must run in a transaction of its own'
            USING ERRCODE = '25001', HINT = 'Call it in autocommit mode.';
    END IF;
    IF NOT force THEN
        SELECT t.snap, t.seq_hi INTO last_snap, last_seq FROM pgfeed.ticks t ORDER BY t.id DESC LIMIT 1;
        IF last_snap IS NOT NULL
           AND NOT pgfeed._changed_since_v2(last_snap, last_seq, pg_current_snapshot(), pgfeed._seq_now_v2()) THEN
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

-- Claim the lease if it expired, or if a daemon finds a reader holding it
-- (daemons take precedence over tickers embedded in readers). Returns the new
-- term, or no row when someone else holds a live lease.
CREATE FUNCTION pgfeed.ticker_claim_v2(claimant text, claimant_kind text, ttl_ms integer)
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
         WHERE l.expires_at < clock_timestamp() OR (claimant_kind = 'daemon' AND l.kind = 'reader')
        RETURNING l.term, l.expires_at;
END $$;
REVOKE ALL ON FUNCTION pgfeed.ticker_claim_v2(text, text, integer) FROM PUBLIC;

-- Renew (and heartbeat); false once the term was superseded.
CREATE FUNCTION pgfeed.ticker_renew_v2(held_term bigint, ttl_ms integer) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    UPDATE pgfeed.ticker l
       SET heartbeat_at = clock_timestamp(), expires_at = clock_timestamp() + make_interval(secs => ttl_ms / 1000.0),
           backend_pid = pg_backend_pid()
     WHERE l.term = held_term;
    RETURN FOUND;
END $$;
REVOKE ALL ON FUNCTION pgfeed.ticker_renew_v2(bigint, integer) FROM PUBLIC;

-- Give the lease up at once (clean shutdown) and wake the other candidates.
CREATE FUNCTION pgfeed.ticker_resign_v2(held_term bigint) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    UPDATE pgfeed.ticker l SET expires_at = '-infinity', heartbeat_at = clock_timestamp()
     WHERE l.term = held_term;
    IF FOUND THEN
        PERFORM pg_notify('pgfeed_v2_ticker', '');
    END IF;
    RETURN FOUND;
END $$;
REVOKE ALL ON FUNCTION pgfeed.ticker_resign_v2(bigint) FROM PUBLIC;

-- Streams created from here on record a tick of the new kind.
CREATE FUNCTION pgfeed.create_stream_v2(
    stream text, max_payload_bytes integer DEFAULT 1048576, notify_mode text DEFAULT 'ticker'
) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    new_id bigint;
    tick   bigint;
    part   text;
    g      record;
BEGIN
    IF stream IS NULL OR stream COLLATE "C" !~ '^[a-z][a-z0-9_]{0,62}$' THEN
        RAISE EXCEPTION 'pgfeed: invalid stream name %', coalesce(quote_literal(stream), 'NULL')
            USING ERRCODE = '22023',
                  HINT = 'A stream name is 1-63 characters: a lower-case ASCII letter, then lower-case letters, digits or _.';
    END IF;
    IF max_payload_bytes IS NULL OR max_payload_bytes <= 0 THEN
        RAISE EXCEPTION 'pgfeed: invalid max_payload_bytes % for stream %',
            coalesce(max_payload_bytes::text, 'NULL'), quote_literal(stream)
            USING ERRCODE = '22023', HINT = 'Give a positive number of bytes (default 1048576).';
    END IF;
    IF notify_mode IS NULL OR notify_mode NOT IN ('ticker', 'immediate', 'poll') THEN
        RAISE EXCEPTION 'pgfeed: invalid notify_mode % for stream %',
            coalesce(quote_literal(notify_mode), 'NULL'), quote_literal(stream)
            USING ERRCODE = '22023', HINT = 'Give ''ticker'', ''immediate'' or ''poll''.';
    END IF;
    IF EXISTS (SELECT 1 FROM pgfeed.streams st WHERE st.name = stream) THEN
        RAISE EXCEPTION 'pgfeed: stream % already exists', quote_literal(stream)
            USING ERRCODE = '42710';
    END IF;
    -- Always a new tick: one from before this transaction could be a position
    -- of a dropped incarnation of the same name.
    SELECT t.id INTO tick FROM pgfeed._insert_tick_v2(
        NULL, CASE WHEN pg_current_xact_id_if_assigned() IS NULL THEN pgfeed._seq_now_v2() END) t;
    INSERT INTO pgfeed.streams (name, created_tick, max_payload_bytes, notify_mode)
        VALUES (stream, tick, max_payload_bytes, notify_mode) RETURNING id INTO new_id;
    part := 'events_' || new_id;
    EXECUTE format('CREATE TABLE pgfeed.%I PARTITION OF pgfeed.events FOR VALUES IN (%s)', part, new_id);
    EXECUTE format('ALTER TABLE pgfeed.%I ALTER COLUMN stream_id SET DEFAULT %s', part, new_id);
    FOR g IN SELECT r.rolname, rg.kind FROM pgfeed.role_grants rg JOIN pg_roles r ON r.oid = rg.role_oid
             WHERE rg.stream_id IS NULL LOOP
        IF g.kind = 'writer' THEN
            EXECUTE format('GRANT INSERT (key, payload) ON pgfeed.%I TO %I', part, g.rolname);
        END IF;
    END LOOP;
    RETURN new_id;
END $$;

-- Append with static SQL: one cached plan for the lookup, one for the insert
-- (routed to the stream's partition by the parent table). Same checks and
-- messages as append_v1. NOTIFY only for 'immediate' streams, and then a
-- constant one that folds to one per transaction and wakes the ticker.
CREATE FUNCTION pgfeed.append_v2(stream text, payload jsonb, key text DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    sid   bigint;
    lim   integer;
    mode  text;
    seq   bigint;
    size  integer;
BEGIN
    IF payload IS NULL THEN
        RAISE EXCEPTION 'pgfeed: payload for stream % is SQL NULL', quote_literal(stream)
            USING ERRCODE = '22004', HINT = 'Pass any JSON value; JSON null (''null''::jsonb) is accepted.';
    END IF;
    SELECT st.id, st.max_payload_bytes, st.notify_mode INTO sid, lim, mode FROM pgfeed.streams st WHERE st.name = stream;
    IF sid IS NULL THEN
        RAISE EXCEPTION 'pgfeed: unknown stream %', coalesce(quote_literal(stream), 'NULL')
            USING ERRCODE = '42704', HINT = 'Create it with: pgfeed stream create NAME';
    END IF;
    size := pg_column_size(payload);
    IF size > lim THEN
        RAISE EXCEPTION 'pgfeed: payload of % bytes exceeds the limit of % bytes for stream %',
            size, lim, quote_literal(stream)
            USING ERRCODE = '54000';
    END IF;
    INSERT INTO pgfeed.events (stream_id, key, payload) VALUES (sid, key, payload);
    seq := currval('pgfeed.event_seq');
    IF mode = 'immediate' THEN
        PERFORM pg_notify('pgfeed_v2_wake', '');
    END IF;
    RETURN seq;
END $$;

CREATE FUNCTION pgfeed.append_many_v2(stream text, payloads jsonb[], keys text[] DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    sid  bigint;
    lim  integer;
    mode text;
    big  record;
    n    bigint;
BEGIN
    IF payloads IS NULL THEN
        RAISE EXCEPTION 'pgfeed: payloads for stream % is SQL NULL', coalesce(quote_literal(stream), 'NULL')
            USING ERRCODE = '22004', HINT = 'Pass an array of JSON values (an empty array appends nothing).';
    END IF;
    IF keys IS NOT NULL AND cardinality(keys) <> cardinality(payloads) THEN
        RAISE EXCEPTION 'pgfeed: % keys given for % payloads', cardinality(keys), cardinality(payloads)
            USING ERRCODE = '22023';
    END IF;
    SELECT st.id, st.max_payload_bytes, st.notify_mode INTO sid, lim, mode FROM pgfeed.streams st WHERE st.name = stream;
    IF sid IS NULL THEN
        RAISE EXCEPTION 'pgfeed: unknown stream %', coalesce(quote_literal(stream), 'NULL')
            USING ERRCODE = '42704', HINT = 'Create it with: pgfeed stream create NAME';
    END IF;
    SELECT i INTO big FROM unnest(payloads) WITH ORDINALITY u(p, i) WHERE p IS NULL ORDER BY i LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'pgfeed: payload % of % for stream % is SQL NULL', big.i, cardinality(payloads), quote_literal(stream)
            USING ERRCODE = '22004', HINT = 'Pass any JSON value; JSON null (''null''::jsonb) is accepted.';
    END IF;
    -- Measured as append_v2 measures one payload (see append_many_v1).
    SELECT u.i, u.size INTO big
        FROM (SELECT i, CASE WHEN pg_column_size(p) <= 127 THEN pg_column_size(p) + 3 ELSE pg_column_size(p) END
                        AS size
                FROM unnest(payloads) WITH ORDINALITY AS a(p, i)) u
        WHERE u.size > lim ORDER BY u.i LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'pgfeed: payload % of % (% bytes) exceeds the limit of % bytes for stream %',
            big.i, cardinality(payloads), big.size, lim, quote_literal(stream)
            USING ERRCODE = '54000';
    END IF;
    INSERT INTO pgfeed.events (stream_id, key, payload)
        SELECT sid, k, p FROM unnest(payloads, coalesce(keys, array_fill(NULL::text, ARRAY[cardinality(payloads)])))
               WITH ORDINALITY AS u(p, k, i) ORDER BY i;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 AND mode = 'immediate' THEN
        PERFORM pg_notify('pgfeed_v2_wake', '');
    END IF;
    RETURN n;
END $$;

CREATE FUNCTION pgfeed.invalidate_v2(cache_name text, keys text[] DEFAULT NULL) RETURNS bigint
LANGUAGE sql AS $$
    SELECT pgfeed.append_v2('caches', jsonb_build_object('cache', cache_name, 'keys', to_jsonb(keys)), cache_name)
$$;

-- A read-your-writes token with no write: inside the writing transaction,
-- 'x<xid>' (valid once it commits); in a transaction that wrote nothing
-- (after COMMIT, in autocommit), 's<snapshot>': everything that had ended
-- when it was taken. Reader.wait_for resolves either to the first tick that
-- covers it. Works on any driver: SELECT pgfeed.commit_token().
CREATE FUNCTION pgfeed.commit_token_v2() RETURNS text
LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce('x' || pg_current_xact_id_if_assigned()::text, 's' || pg_current_snapshot()::text)
$$;

-- Resolve a commit token (see commit_token_v2) to a tick, read-only: the
-- newest tick's id when nothing the token covers is missing from it (no row
-- of any stream lies between them: a transaction that appended nothing, or a
-- snapshot whose extra ended transactions wrote no rows, needs no new tick);
-- NULL while the ticker still has to take the tick that covers it. Refuses a
-- token from the future.
CREATE FUNCTION pgfeed.resolve_token_v2(token text) RETURNS bigint
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    head_id   bigint;
    head_snap pg_snapshot;
    x         xid8;
    snap      pg_snapshot;
BEGIN
    SELECT t.id, t.snap INTO head_id, head_snap FROM pgfeed.ticks t ORDER BY t.id DESC LIMIT 1;
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
        IF EXISTS (SELECT 1 FROM pgfeed.events e
                    WHERE (e.xid = ANY (ARRAY(SELECT pg_snapshot_xip(head_snap)))
                           OR (e.xid >= pg_snapshot_xmax(head_snap) AND e.xid < pg_snapshot_xmax(snap)))
                      AND pg_visible_in_snapshot(e.xid, snap)) THEN
            RETURN NULL;
        END IF;
        RETURN head_id;
    END IF;
    RAISE EXCEPTION 'pgfeed: malformed commit token %', quote_literal(token)
        USING ERRCODE = '22023', HINT = 'Expected x<xid> or s<snapshot>, as returned by pgfeed.commit_token().';
END $$;

-- The rows of interval (a, b] of one stream in seq order after after_seq, at
-- most lim: those visible in b and not in a. Two parts, each an ordered index
-- scan: rows appended after a's seq_lo (seq range up to b's seq_hi), and the
-- older rows of transactions a listed as running that b sees as finished
-- (one (xid, seq) scan each). Nothing else can be in the interval: a row with
-- seq <= seq_lo(a) that a does not see was written by a transaction a lists
-- (see _insert_tick_v2). Ticks of the previous release have no seq_lo: then
-- the xid ranges of the first release, sorted.
CREATE FUNCTION pgfeed.interval_rows_v2(
    sid bigint, a_snap pg_snapshot, a_seq_lo bigint, b_snap pg_snapshot, b_seq_hi bigint,
    after_seq bigint, lim integer
) RETURNS TABLE (xid bigint, seq bigint, created_at timestamptz, key text, payload jsonb)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    running xid8[] := ARRAY(SELECT x FROM pg_snapshot_xip(a_snap) x WHERE pg_visible_in_snapshot(x, b_snap));
BEGIN
    IF a_seq_lo IS NULL THEN
        RETURN QUERY
            SELECT e.xid::text::bigint, e.seq, e.created_at, e.key, e.payload FROM pgfeed.events e
             WHERE e.stream_id = sid AND e.seq > after_seq
               AND (e.xid = ANY (running)
                    OR (e.xid >= pg_snapshot_xmax(a_snap) AND e.xid < pg_snapshot_xmax(b_snap)
                        AND pg_visible_in_snapshot(e.xid, b_snap)))
             ORDER BY e.seq LIMIT lim;
        RETURN;
    END IF;
    RETURN QUERY
        SELECT u.* FROM (
            (SELECT e.xid::text::bigint AS xid, e.seq, e.created_at, e.key, e.payload FROM pgfeed.events e
              WHERE e.stream_id = sid AND e.seq > greatest(a_seq_lo, after_seq)
                AND e.seq <= coalesce(b_seq_hi, 9223372036854775807)
                AND pg_visible_in_snapshot(e.xid, b_snap) AND NOT pg_visible_in_snapshot(e.xid, a_snap)
              ORDER BY e.seq LIMIT lim)
            UNION ALL
            (SELECT r.* FROM unnest(running) AS x(id) CROSS JOIN LATERAL (
                SELECT e.xid::text::bigint, e.seq, e.created_at, e.key, e.payload FROM pgfeed.events e
                 WHERE e.stream_id = sid AND e.xid = x.id AND e.seq > after_seq AND e.seq <= a_seq_lo
                 ORDER BY e.seq LIMIT lim) r)
        ) u ORDER BY u.seq LIMIT lim;
END $$;

-- The live path of a reader, read-only: ticks from `known` on (the reader
-- compares the one it knows: ticks never change, unless the database is not
-- the one it was reading), the newest tick, the
-- current incarnation of `streams`, and for each stream whose reader stands
-- exactly at the tick before the newest one, that interval's rows (at most
-- lim + 1, two ordered index scans as in store.fetch_rows). One statement,
-- one snapshot: the floor is read with the rows.
CREATE FUNCTION pgfeed.read_live_v2(known bigint, streams text[], after_ticks bigint[], lim integer)
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
    server_xmax bigint
)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    head_id  bigint;
    b_snap   pg_snapshot;
    b_hi     bigint;
    head_lo  bigint;
    a_snap   pg_snapshot;
    a_lo     bigint;
    s        record;
BEGIN
    IF cardinality(streams) IS DISTINCT FROM cardinality(after_ticks) THEN
        RAISE EXCEPTION 'pgfeed: % streams given with % positions', cardinality(streams), cardinality(after_ticks)
            USING ERRCODE = '22023';
    END IF;
    RETURN QUERY SELECT t.id, t.snap::text, NULL::text, NULL::text, NULL::bigint, NULL::bigint,
                        NULL::timestamptz, NULL::text, NULL::jsonb, NULL::bigint, t.seq_lo, t.seq_hi, NULL::bigint
                   FROM pgfeed.ticks t WHERE t.id >= known ORDER BY t.id LIMIT 1000;
    SELECT t.id, t.snap, t.seq_lo, t.seq_hi INTO head_id, b_snap, head_lo, b_hi
      FROM pgfeed.ticks t ORDER BY t.id DESC LIMIT 1;
    RETURN QUERY SELECT head_id, b_snap::text,
        (SELECT coalesce(json_object_agg(st.name, json_build_array(st.id, st.created_tick, st.floor_tick, st.notify_mode)), '{}')
           FROM pgfeed.streams st WHERE st.name = ANY (streams))::text,
        NULL::text, NULL::bigint, NULL::bigint, NULL::timestamptz, NULL::text, NULL::jsonb, NULL::bigint,
        head_lo, b_hi,
        -- The server's own horizon: behind the newest tick means this is not
        -- the database that took it (a dump restored into a new cluster).
        pg_snapshot_xmax(pg_current_snapshot())::text::bigint;
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
                            NULL::bigint;
        RETURN QUERY
            SELECT head_id, NULL::text, NULL::text, s.name, r.xid, r.seq, r.created_at, r.key, r.payload, s.floor,
                   NULL::bigint, NULL::bigint, NULL::bigint
              FROM pgfeed.interval_rows_v2(s.sid, a_snap, a_lo, b_snap, b_hi, 0, lim + 1) r;
    END LOOP;
END $$;

-- Stable aliases for hand-written SQL now point at the new functions.
CREATE OR REPLACE FUNCTION pgfeed.append(stream text, payload jsonb, key text DEFAULT NULL) RETURNS bigint
LANGUAGE sql AS $$ SELECT pgfeed.append_v2(stream, payload, key) $$;

CREATE OR REPLACE FUNCTION pgfeed.append_many(stream text, payloads jsonb[], keys text[] DEFAULT NULL) RETURNS bigint
LANGUAGE sql AS $$ SELECT pgfeed.append_many_v2(stream, payloads, keys) $$;

CREATE FUNCTION pgfeed.commit_token() RETURNS text
LANGUAGE sql VOLATILE AS $$ SELECT pgfeed.commit_token_v2() $$;

-- capture_v1 keeps its signature (triggers name it) and now appends with v2.
CREATE OR REPLACE FUNCTION pgfeed.capture_v1() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    stream   text  := TG_ARGV[0];
    key_cols jsonb := TG_ARGV[1]::jsonb;
    cols     jsonb := TG_ARGV[2]::jsonb;
    rec      jsonb;
    k        jsonb;
BEGIN
    IF TG_OP = 'DELETE' THEN rec := to_jsonb(OLD); ELSE rec := to_jsonb(NEW); END IF;
    SELECT jsonb_object_agg(c, rec -> c) INTO k FROM jsonb_array_elements_text(key_cols) c;
    IF jsonb_typeof(cols) = 'array' THEN
        SELECT coalesce(jsonb_object_agg(c, rec -> c), '{}'::jsonb) INTO rec
            FROM jsonb_array_elements_text(cols) c;
    END IF;
    PERFORM pgfeed.append_v2(
        stream,
        jsonb_build_object('op', lower(TG_OP), 'table', TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME,
                           'key', k, 'row', rec),
        k::text);
    RETURN NULL;
END $$;
REVOKE ALL ON FUNCTION pgfeed.capture_v1() FROM PUBLIC;

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA pgfeed FROM PUBLIC;

-- Retention for the daemon and `pgfeed prune`: as prune_v1, but the cut never
-- passes what a saved consumer position still needs (a partial position at
-- tick n needs interval n) unless protect_consumers is false, and dry_run
-- only counts. Consumers left behind by an unprotected prune reset.
CREATE FUNCTION pgfeed.prune_v2(older_than interval, protect_consumers boolean DEFAULT true, dry_run boolean DEFAULT false)
RETURNS TABLE (floor_tick bigint, ticks_deleted bigint, events_deleted bigint, held_by_consumers boolean)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
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
          INTO keep FROM pgfeed.positions p WHERE p.token ~ '^[0-9]+(\.[0-9]+\.[0-9]+)?$';
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
