-- pgfeed 0005: capture that a mirror can trust (capture_v2).
--
-- capture_v1 froze column names into its trigger's arguments, built the key
-- from NEW only, ignored TRUNCATE and reported unquoted names. capture_v2:
--
-- * binds the key and captured columns by attribute number, resolved at run
--   time on the captured table: a renamed column is followed (events carry
--   its current name), a dropped one fails the write with one line naming
--   the capture, never a null;
-- * carries "old_key" on an UPDATE that changes the key;
-- * is also a statement-level TRUNCATE trigger: {"op": "truncate", "table"};
-- * reports tables as PostgreSQL quotes them (format('%I.%I'));
-- * can skip updates that change no captured column (skip_unchanged).
--
-- Existing capture_v1 triggers are left as they are and keep working (the
-- function is unchanged): re-pointing them here would take a lock on, and
-- need ownership of, every captured application table inside `pgfeed
-- migrate`, and would switch the event format (new truncate events, quoted
-- names) under consumers that have not been upgraded. `pgfeed capture` run
-- again for a table replaces its capture_v1 trigger with capture_v2.
--
-- Arguments (text, as triggers take them; parsed with casts, no query):
--   TG_ARGV[0]  the stream
--   TG_ARGV[1]  attribute numbers of the key columns, in key order: '{1,2}'
--   TG_ARGV[2]  attribute numbers of the captured columns, or '*' (all)
--   TG_ARGV[3]  options, comma-separated: skip_unchanged (an UPDATE that
--               changes neither the key nor a captured column appends
--               nothing), partitioned (the trigger is on a partitioned table
--               and runs as a clone on its partitions)
--   TG_ARGV[4]  the columns' names when captured, for messages only:
--               a JSON object {"key": [...], "columns": [...]}
-- Attribute numbers are those of the captured table: on a partition (whose
-- numbers may differ) the captured table is the nearest ancestor holding the
-- original trigger; names are the same in every partition. One catalog read
-- per row (an index scan of pg_attribute) resolves the current names.
CREATE FUNCTION pgfeed.capture_v2() RETURNS trigger
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
