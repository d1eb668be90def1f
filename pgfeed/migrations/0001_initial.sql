-- pgfeed 0001: streams, events, ticks, writer and reader functions.
--
-- Correctness argument (docs/design.md has it in full): every event row records
-- the id of the transaction that wrote it (xid8). Readers never order rows by a
-- value allocated before commit. Instead a "tick" records pg_current_snapshot()
-- under a lock; ticks are numbered in the order they were taken, and each
-- tick's snapshot sees everything the previous one saw. The rows of interval
-- (a, b] are exactly those whose xid is visible in tick b and not in tick a.
-- Everything a reader delivers is derived from durable ticks, so every process
-- cuts every stream at the same places and a position token means the same
-- prefix everywhere.
--
-- Names that running readers and writers call carry the _v1 suffix; a later
-- migration adds _v2 beside them so processes of the previous release keep
-- working during a rolling upgrade. pgfeed.append is the stable alias meant for
-- hand-written SQL and triggers.

CREATE TABLE pgfeed.ticks (
    id       bigint PRIMARY KEY,
    snap     pg_snapshot NOT NULL,
    taken_at timestamptz NOT NULL
);
COMMENT ON TABLE pgfeed.ticks IS
    'Numbered transaction snapshots; interval (a, b] of a stream holds the rows whose xid is visible in tick b but not in tick a.';

CREATE TABLE pgfeed.streams (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name              text NOT NULL UNIQUE CHECK (name ~ '^[a-z][a-z0-9_]{0,62}$'),
    created_tick      bigint NOT NULL,
    max_payload_bytes integer NOT NULL DEFAULT 1048576 CHECK (max_payload_bytes > 0),
    notify_mode       text NOT NULL DEFAULT 'immediate' CHECK (notify_mode IN ('immediate', 'poll')),
    created_at        timestamptz NOT NULL DEFAULT now()
);
COMMENT ON COLUMN pgfeed.streams.created_tick IS
    'Tick taken by the transaction that created this incarnation; a position older than it belongs to a dropped stream.';

CREATE SEQUENCE pgfeed.event_seq;

-- One partition per stream (events_<stream id>): a stream is dropped in O(1),
-- privileges are granted per stream, and a range read touches one partition.
CREATE TABLE pgfeed.events (
    stream_id  bigint NOT NULL,
    seq        bigint NOT NULL DEFAULT nextval('pgfeed.event_seq'),
    xid        xid8 NOT NULL DEFAULT pg_current_xact_id(),
    created_at timestamptz NOT NULL DEFAULT now(),
    key        text,
    payload    jsonb NOT NULL
) PARTITION BY LIST (stream_id);
CREATE INDEX events_xid_seq ON pgfeed.events (xid, seq);

-- Which roles pgfeed grant gave what, so that streams created later inherit
-- "all streams" grants.
CREATE TABLE pgfeed.role_grants (
    role_oid   oid NOT NULL,
    kind       text NOT NULL CHECK (kind IN ('writer', 'reader')),
    stream_id  bigint REFERENCES pgfeed.streams (id) ON DELETE CASCADE
);
CREATE UNIQUE INDEX role_grants_once ON pgfeed.role_grants (role_oid, kind, coalesce(stream_id, 0));

-- Saved reader positions. Each role sees and changes only its own rows.
CREATE TABLE pgfeed.positions (
    owner      name NOT NULL DEFAULT current_user,
    consumer   text NOT NULL,
    stream     text NOT NULL,
    token      text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (owner, consumer, stream)
);
ALTER TABLE pgfeed.positions ENABLE ROW LEVEL SECURITY;
CREATE POLICY positions_own ON pgfeed.positions
    USING (owner = current_user) WITH CHECK (owner = current_user);

-- Tick creation. Serialised by a transaction-level advisory lock so that tick
-- ids follow the order in which snapshots were taken: tick n+1's snapshot is
-- taken after tick n committed, hence sees a superset of it. READ COMMITTED
-- is required: each statement below must see what committed before it ran.
-- With share, the newest tick is returned instead of a new one when it already
-- sees everything that had finished when the call began (decided on snapshots,
-- not clocks).
CREATE FUNCTION pgfeed._take_tick_v1(share boolean DEFAULT true) RETURNS TABLE (id bigint, snap text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    own       xid8 := pg_current_xact_id_if_assigned();
    at_call   pg_snapshot;
    last_id   bigint;
    last_snap pg_snapshot;
    current   pg_snapshot;
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'pgfeed: ticks must be taken at READ COMMITTED, not %',
            current_setting('transaction_isolation')
            USING ERRCODE = '25001',
                  HINT = 'Use default_transaction_isolation = ''read committed'' on pgfeed connections.';
    END IF;
    SELECT s INTO at_call FROM pg_current_snapshot() AS s;
    PERFORM pg_advisory_xact_lock(7451287230471176193);
    SELECT t.id, t.snap INTO last_id, last_snap
        FROM pgfeed.ticks t ORDER BY t.id DESC LIMIT 1;
    IF share AND last_snap IS NOT NULL
       AND pg_snapshot_xmax(last_snap) >= pg_snapshot_xmax(at_call)
       AND NOT EXISTS (SELECT 1 FROM pg_snapshot_xip(last_snap) AS x
                        WHERE x < pg_snapshot_xmax(at_call)
                          AND x NOT IN (SELECT pg_snapshot_xip(at_call))) THEN
        RETURN QUERY SELECT last_id, last_snap::text;
        RETURN;
    END IF;
    -- A statement of its own, run after the lock was granted: it gets a
    -- snapshot taken now, which sees everything the previous tick saw (that
    -- tick committed before we got the lock).
    SELECT s INTO current FROM pg_current_snapshot() AS s;
    -- PostgreSQL leaves the caller's own transaction out of the running list;
    -- it has not committed, so put it back (a tick taken by create_stream_v1
    -- inside a larger transaction must not count that transaction as done).
    IF own IS NOT NULL AND own < pg_snapshot_xmax(current) THEN
        SELECT format('%s:%s:%s', least(pg_snapshot_xmin(current), own), pg_snapshot_xmax(current),
                      string_agg(u.x::text, ',' ORDER BY u.x))::pg_snapshot
          INTO current
          FROM (SELECT pg_snapshot_xip(current) AS x UNION SELECT own) AS u;
    END IF;
    IF share AND last_snap IS NOT NULL AND last_snap::text = current::text THEN
        RETURN QUERY SELECT last_id, last_snap::text;
        RETURN;
    END IF;
    INSERT INTO pgfeed.ticks (id, snap, taken_at)
        VALUES (coalesce(last_id, 0) + 1, current, clock_timestamp());
    RETURN QUERY SELECT coalesce(last_id, 0) + 1, current::text;
END $$;
REVOKE ALL ON FUNCTION pgfeed._take_tick_v1(boolean) FROM PUBLIC;

-- The public tick: readers call it when woken, writers after commit to get a
-- read-your-writes token. It refuses to run inside a transaction that has
-- written anything, because the tick lock is then held until that transaction
-- ends and every reader of every stream would wait for it.
CREATE FUNCTION pgfeed.tick_v1() RETURNS TABLE (id bigint, snap text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF pg_current_xact_id_if_assigned() IS NOT NULL THEN
        RAISE EXCEPTION 'pgfeed.tick_v1() must run in a transaction of its own'
            USING ERRCODE = '25001',
                  HINT = 'Call it after COMMIT (autocommit), not inside the writing transaction.';
    END IF;
    RETURN QUERY SELECT t.id, t.snap FROM pgfeed._take_tick_v1() t;
END $$;
REVOKE ALL ON FUNCTION pgfeed.tick_v1() FROM PUBLIC;

CREATE FUNCTION pgfeed.create_stream_v1(
    stream text, max_payload_bytes integer DEFAULT 1048576, notify_mode text DEFAULT 'immediate'
) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    new_id    bigint;
    tick      bigint;
    part      text;
    g         record;
BEGIN
    -- COLLATE "C": the rule is about ASCII code points, whatever the database's collation.
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
    IF notify_mode IS NULL OR notify_mode NOT IN ('immediate', 'poll') THEN
        RAISE EXCEPTION 'pgfeed: invalid notify_mode % for stream %',
            coalesce(quote_literal(notify_mode), 'NULL'), quote_literal(stream)
            USING ERRCODE = '22023', HINT = 'Give ''immediate'' or ''poll''.';
    END IF;
    IF EXISTS (SELECT 1 FROM pgfeed.streams st WHERE st.name = stream) THEN
        RAISE EXCEPTION 'pgfeed: stream % already exists', quote_literal(stream)
            USING ERRCODE = '42710';
    END IF;
    -- Always a new tick: one shared from before this transaction could be a
    -- position of a dropped incarnation of the same name.
    SELECT t.id INTO tick FROM pgfeed._take_tick_v1(false) t;
    INSERT INTO pgfeed.streams (name, created_tick, max_payload_bytes, notify_mode)
        VALUES (stream, tick, max_payload_bytes, notify_mode) RETURNING id INTO new_id;
    part := 'events_' || new_id;
    EXECUTE format('CREATE TABLE pgfeed.%I PARTITION OF pgfeed.events FOR VALUES IN (%s)', part, new_id);
    EXECUTE format('ALTER TABLE pgfeed.%I ALTER COLUMN stream_id SET DEFAULT %s', part, new_id);
    -- By oid: a dropped role is skipped, and a new role that reuses its name
    -- inherits nothing.
    FOR g IN SELECT r.rolname, rg.kind FROM pgfeed.role_grants rg JOIN pg_roles r ON r.oid = rg.role_oid
             WHERE rg.stream_id IS NULL LOOP
        IF g.kind = 'writer' THEN
            EXECUTE format('GRANT INSERT (key, payload) ON pgfeed.%I TO %I', part, g.rolname);
        END IF;
    END LOOP;
    RETURN new_id;
END $$;

CREATE FUNCTION pgfeed.append_v1(stream text, payload jsonb, key text DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    s    record;
    size integer;
BEGIN
    IF payload IS NULL THEN
        RAISE EXCEPTION 'pgfeed: payload for stream % is SQL NULL', quote_literal(stream)
            USING ERRCODE = '22004', HINT = 'Pass any JSON value; JSON null (''null''::jsonb) is accepted.';
    END IF;
    SELECT st.id, st.max_payload_bytes, st.notify_mode INTO s
        FROM pgfeed.streams st WHERE st.name = stream;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgfeed: unknown stream %', coalesce(quote_literal(stream), 'NULL')
            USING ERRCODE = '42704', HINT = 'Create it with: pgfeed stream create NAME';
    END IF;
    size := pg_column_size(payload);
    IF size > s.max_payload_bytes THEN
        RAISE EXCEPTION 'pgfeed: payload of % bytes exceeds the limit of % bytes for stream %',
            size, s.max_payload_bytes, quote_literal(stream)
            USING ERRCODE = '54000';
    END IF;
    EXECUTE format('INSERT INTO pgfeed.%I (key, payload) VALUES ($1, $2)', 'events_' || s.id)
        USING key, payload;
    IF s.notify_mode = 'immediate' THEN
        -- Constant payload: repeats within one transaction fold into one NOTIFY.
        PERFORM pg_notify('pgfeed_v1_' || s.id, '');
    END IF;
    RETURN currval('pgfeed.event_seq');
END $$;

CREATE FUNCTION pgfeed.append_many_v1(stream text, payloads jsonb[], keys text[] DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    s       record;
    big     record;
    n       bigint;
BEGIN
    IF payloads IS NULL THEN
        RAISE EXCEPTION 'pgfeed: payloads for stream % is SQL NULL', coalesce(quote_literal(stream), 'NULL')
            USING ERRCODE = '22004', HINT = 'Pass an array of JSON values (an empty array appends nothing).';
    END IF;
    IF keys IS NOT NULL AND cardinality(keys) <> cardinality(payloads) THEN
        RAISE EXCEPTION 'pgfeed: % keys given for % payloads', cardinality(keys), cardinality(payloads)
            USING ERRCODE = '22023';
    END IF;
    SELECT st.id, st.max_payload_bytes, st.notify_mode INTO s
        FROM pgfeed.streams st WHERE st.name = stream;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgfeed: unknown stream %', coalesce(quote_literal(stream), 'NULL')
            USING ERRCODE = '42704', HINT = 'Create it with: pgfeed stream create NAME';
    END IF;
    SELECT i INTO big FROM unnest(payloads) WITH ORDINALITY u(p, i) WHERE p IS NULL ORDER BY i LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'pgfeed: payload % of % for stream % is SQL NULL', big.i, cardinality(payloads), quote_literal(stream)
            USING ERRCODE = '22004', HINT = 'Pass any JSON value; JSON null (''null''::jsonb) is accepted.';
    END IF;
    -- All or nothing: one payload over the limit refuses the whole call.
    -- An array stores an element of up to 126 data bytes with a 1-byte header
    -- instead of 4: add the 3 bytes back so that a payload measures the same
    -- here as in append_v1.
    SELECT u.i, u.size INTO big
        FROM (SELECT i, CASE WHEN pg_column_size(p) <= 127 THEN pg_column_size(p) + 3 ELSE pg_column_size(p) END
                        AS size
                FROM unnest(payloads) WITH ORDINALITY AS a(p, i)) u
        WHERE u.size > s.max_payload_bytes ORDER BY u.i LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'pgfeed: payload % of % (% bytes) exceeds the limit of % bytes for stream %',
            big.i, cardinality(payloads), big.size, s.max_payload_bytes, quote_literal(stream)
            USING ERRCODE = '54000';
    END IF;
    EXECUTE format(
        -- ORDER BY: seq (the order within a transaction) follows the array.
        'INSERT INTO pgfeed.%I (key, payload)'
        ' SELECT k, p FROM unnest($1, $2) WITH ORDINALITY AS u(p, k, i) ORDER BY i',
        'events_' || s.id
    ) USING payloads, coalesce(keys, array_fill(NULL::text, ARRAY[cardinality(payloads)]));
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 AND s.notify_mode = 'immediate' THEN
        PERFORM pg_notify('pgfeed_v1_' || s.id, '');
    END IF;
    RETURN n;
END $$;

-- Stable aliases for hand-written SQL.
CREATE FUNCTION pgfeed.append(stream text, payload jsonb, key text DEFAULT NULL) RETURNS bigint
LANGUAGE sql AS $$ SELECT pgfeed.append_v1(stream, payload, key) $$;

CREATE FUNCTION pgfeed.append_many(stream text, payloads jsonb[], keys text[] DEFAULT NULL) RETURNS bigint
LANGUAGE sql AS $$ SELECT pgfeed.append_many_v1(stream, payloads, keys) $$;

-- Cache invalidation (Synapse's use case). keys NULL invalidates the whole cache.
CREATE FUNCTION pgfeed.invalidate_v1(cache_name text, keys text[] DEFAULT NULL) RETURNS bigint
LANGUAGE sql AS $$
    SELECT pgfeed.append_v1('caches', jsonb_build_object('cache', cache_name, 'keys', to_jsonb(keys)), cache_name)
$$;

-- Row capture. SECURITY DEFINER so that whoever writes a captured table need
-- not hold pgfeed privileges; EXECUTE is revoked from PUBLIC, so only the
-- owner can attach it to a table. Arguments: stream, key columns and captured
-- columns, each a JSON array of column names ('null' = all columns).
CREATE FUNCTION pgfeed.capture_v1() RETURNS trigger
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
    PERFORM pgfeed.append_v1(
        stream,
        jsonb_build_object('op', lower(TG_OP), 'table', TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME,
                           'key', k, 'row', rec),
        k::text);
    RETURN NULL;
END $$;
REVOKE ALL ON FUNCTION pgfeed.capture_v1() FROM PUBLIC;

-- The built-in stream that pgfeed.invalidate() appends to.
SELECT pgfeed.create_stream_v1('caches');

-- Nothing in the pgfeed schema is callable by PUBLIC; `pgfeed grant` hands out
-- exactly what a writer or reader role needs.
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA pgfeed FROM PUBLIC;
