-- Months of the ledger created before 058 in a session whose TimeZone was not UTC are
-- given the bounds of their month in UTC.
--
-- Why (found by a review of 058, reproduced): 058 made create_partition write a month's
-- bounds in UTC, but every month an installation had already created kept the bounds its
-- creating session's TimeZone gave it, and nothing sets that zone to UTC (the server's
-- default is the zone of the host that ran initdb). The old upper bound was the month's
-- first instant in UTC plus '1 month' added in that zone, so:
-- * under any zone of Europe (Europe/Berlin: October ended on November 1 at 01:00 UTC)
--   and any zone that leaves daylight saving time in the month, a month ran into the
--   next, whose partition could never be created, with 058 or without it (42P17, "would
--   overlap"): every event of that month was refused (dead letters; errors for the SDK)
--   for as long as the installation lived;
-- * under a zone west of UTC (America/New_York: March ended on the 28th at 23:00 UTC) or
--   one that enters daylight saving time in the month (Europe/Berlin: March ended on the
--   31st at 23:00 UTC), the month's last hours or days had no partition at all (23514),
--   and retention (058's drop_old_partitions, which takes a month's end in UTC) counted
--   the month as ending later than it did.
-- 058's header left it to the operator to find and recreate such months by hand.
--
-- Now each month `ledger_YYYY_MM` whose bounds are not those of its month in UTC is
-- detached and attached again with them, when every row it holds lies in that month (an
-- empty month, as the months created ahead by the beat are; or one cut short). A month
-- holding a row outside its month in UTC (one that ran into the next, and took rows of
-- the next month's first hours) is left as it is, with a WARNING naming it: its rows
-- would have to move to the next month, which this migration does not do. The other
-- months are repaired all the same.
--
-- Lock order: the ledger (ACCESS EXCLUSIVE, taken by the first DETACH and held to the end
-- of the migration), then each month repaired (ACCESS EXCLUSIVE; ATTACH reads a month
-- holding rows, to check them against its bounds). Nothing is locked on an installation
-- whose months are all months of UTC (every installation whose sessions ran in UTC).

DO $$
DECLARE
    v_part record;
    v_bound text[];
    v_from text;
    v_to text;
    v_outside boolean;
BEGIN
    -- the bounds as pg_get_expr writes them, read back in the same settings
    SET LOCAL DateStyle = 'ISO, YMD';
    SET LOCAL TimeZone = 'UTC';
    FOR v_part IN
        SELECT c.relname, substr(c.relname, 8, 4)::integer AS y,
               substr(c.relname, 13, 2)::integer AS m,
               pg_get_expr(c.relpartbound, c.oid) AS bound
        FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'meter.ledger'::regclass
          AND c.relname ~ '^ledger_[0-9]{4}_(0[1-9]|1[0-2])$'
        ORDER BY c.relname
    LOOP
        -- as 058's create_partition writes them
        v_from := format('%s-%s-01 00:00:00+00', lpad(v_part.y::text, 4, '0'),
                         lpad(v_part.m::text, 2, '0'));
        v_to := format('%s-%s-01 00:00:00+00', lpad((v_part.y + v_part.m / 12)::text, 4, '0'),
                       lpad((v_part.m % 12 + 1)::text, 2, '0'));
        v_bound := regexp_match(v_part.bound, '^FOR VALUES FROM \(''([^'']*)''\) TO \(''([^'']*)''\)$');
        CONTINUE WHEN v_bound IS NOT NULL AND v_bound[1]::timestamptz = v_from::timestamptz
                      AND v_bound[2]::timestamptz = v_to::timestamptz;
        EXECUTE format('SELECT EXISTS (SELECT 1 FROM meter.%I WHERE NOT (event_time >= $1 '
                       'AND event_time < $2))', v_part.relname)
        INTO v_outside USING v_from::timestamptz, v_to::timestamptz;
        IF v_outside THEN
            RAISE WARNING 'meter.% (%) holds rows outside its month in UTC (% to %): left as '
                          'it is; move them to the next month by hand', v_part.relname,
                          v_part.bound, v_from, v_to;
            CONTINUE;
        END IF;
        BEGIN
            EXECUTE format('ALTER TABLE meter.ledger DETACH PARTITION meter.%I', v_part.relname);
            EXECUTE format('ALTER TABLE meter.ledger ATTACH PARTITION meter.%I '
                           'FOR VALUES FROM (%L) TO (%L)', v_part.relname, v_from, v_to);
        EXCEPTION WHEN invalid_object_definition THEN
            -- 42P17: a neighbour left as it is (above) runs into this month
            RAISE WARNING 'meter.% (%) was left as it is: %', v_part.relname, v_part.bound,
                          SQLERRM;
        END;
    END LOOP;
END
$$;
