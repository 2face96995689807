-- Months of the ledger created before 056 in a session whose TimeZone was not UTC are
-- given the bounds of their month in UTC.
--
-- Why (found by a review of 056, reproduced): 056 made create_partition write a month's
-- bounds in UTC, but every month an installation had already created kept the bounds its
-- creating session's TimeZone gave it, and nothing sets that zone to UTC (the server's
-- default is the zone of the host that ran initdb). The old upper bound was the month's
-- first instant in UTC plus '1 month' added in that zone, so:
-- * under any zone of Europe (Europe/Berlin: October ended on November 1 at 01:00 UTC)
--   and any zone that leaves daylight saving time in the month, a month ran into the
--   next, whose partition could never be created, with 056 or without it (42P17, "would
--   overlap"): every event of that month was refused (dead letters; errors for the SDK)
--   for as long as the installation lived;
-- * under a zone west of UTC (America/New_York: March ended on the 28th at 23:00 UTC) or
--   one that enters daylight saving time in the month (Europe/Berlin: March ended on the
--   31st at 23:00 UTC), the month's last hours or days had no partition at all (23514),
--   and retention (056's drop_old_partitions, which takes a month's end in UTC) counted
--   the month as ending later than it did.
-- 056's header left it to the operator to find and recreate such months by hand.
--
-- Now each month `ledger_YYYY_MM` whose bounds are not those of its month in UTC is
-- detached and attached again with them. Rows it holds dated in another month of UTC (a
-- month that ran into the next took rows of that month's first hours: nothing but a
-- direct INSERT put one there, the writers creating the next month first, and failing)
-- are moved, unchanged (id, created_at, every column), to their month, created if
-- missing: left where they were, that month could never be created (a review found the
-- first version of this file left them, with a WARNING that `meter migrate` never shows).
-- Nothing else about a month changes: its name, owner, privileges, the ledger's indexes
-- (attached again, not rebuilt), its constraints and row trigger (cloned again, once),
-- its own TRUNCATE trigger (kept by the table), its statistics. All in the migration's
-- one transaction: a month detached is never seen, nor written, by anyone else.
--
-- Each repaired month holding rows is read once (a review found two reads: a search for
-- rows outside the month, then ATTACH's own check): a CHECK of its month in UTC is added
-- and validated (that read), ATTACH finds its bounds implied by it and reads nothing, and
-- the CHECK is dropped. About 0.1 s a million rows (PostgreSQL 18, 2 cores, cached),
-- every read and write of the ledger waiting meanwhile: under Europe/Berlin only the
-- Marches and Octobers need it; under a zone west of UTC also every month after a month
-- of 30 days.
--
-- Lock order: the ledger (ACCESS EXCLUSIVE, before any month is read, held to the end of
-- the migration), then each month repaired (ACCESS EXCLUSIVE), as drop_old_partitions
-- takes them (a review found the first month read before the ledger's lock: with a
-- retention holding the ledger and waiting for that month, a deadlock, 40P01), then the
-- months the rows moved go to (create_partition: its advisory lock, then the month).
-- Nothing is locked on an installation whose months are all months of UTC (every
-- installation whose sessions ran in UTC).
--
-- (Amended before it shipped: the first version of this file was on no installation.)

DO $$
DECLARE
    v_part record;
    v_bound text[];
    v_from text;
    v_to text;
    v_locked boolean := false;
    v_moved meter.ledger[] := '{}';
    v_some meter.ledger[];
    v_month record;
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
        -- as 056's create_partition writes them
        v_from := format('%s-%s-01 00:00:00+00', lpad(v_part.y::text, 4, '0'),
                         lpad(v_part.m::text, 2, '0'));
        v_to := format('%s-%s-01 00:00:00+00', lpad((v_part.y + v_part.m / 12)::text, 4, '0'),
                       lpad((v_part.m % 12 + 1)::text, 2, '0'));
        v_bound := regexp_match(v_part.bound, '^FOR VALUES FROM \(''([^'']*)''\) TO \(''([^'']*)''\)$');
        CONTINUE WHEN v_bound IS NOT NULL AND v_bound[1]::timestamptz = v_from::timestamptz
                      AND v_bound[2]::timestamptz = v_to::timestamptz;
        IF NOT v_locked THEN
            -- the ledger before any month, as drop_old_partitions and every reader and
            -- writer take them: a month read first (its ACCESS SHARE) while this waited
            -- for the ledger deadlocked with a retention holding the ledger and waiting
            -- for that month (40P01)
            LOCK TABLE ONLY meter.ledger IN ACCESS EXCLUSIVE MODE;
            v_locked := true;
        END IF;
        -- dropped by a retention this waited for
        CONTINUE WHEN to_regclass(format('meter.%I', v_part.relname)) IS NULL;
        -- A CHECK of the month in UTC, validated by one read of the month (under the
        -- ledger's lock, as every read here), proves its rows lie in that month, and lets
        -- ATTACH skip its own read of them (it was a second read of every month with rows)
        BEGIN
            EXECUTE format('ALTER TABLE meter.%I ADD CONSTRAINT ledger_month_of_utc '
                           'CHECK (event_time >= %L AND event_time < %L)',
                           v_part.relname, v_from, v_to);
            EXECUTE format('ALTER TABLE meter.ledger DETACH PARTITION meter.%I', v_part.relname);
        EXCEPTION WHEN check_violation THEN
            -- rows dated in another month of UTC (the first hours of the next month, in a
            -- month that ran into it): taken out of the month, detached (a plain table,
            -- without the ledger's row trigger, locked by this transaction alone), and
            -- written again through the ledger below, unchanged, once their month exists.
            -- Left where they were, the next month could never be created (42P17).
            EXECUTE format('ALTER TABLE meter.ledger DETACH PARTITION meter.%I', v_part.relname);
            EXECUTE format('WITH d AS (DELETE FROM meter.%I WHERE NOT (event_time >= $1 '
                           'AND event_time < $2) RETURNING *) '
                           'SELECT array_agg(ROW(d.*)::meter.ledger) FROM d', v_part.relname)
            INTO v_some USING v_from::timestamptz, v_to::timestamptz;
            v_moved := v_moved || v_some;
            RAISE WARNING 'meter.% (%): % row(s) dated outside its month in UTC moved to '
                          'their month', v_part.relname, v_part.bound, cardinality(v_some);
            EXECUTE format('ALTER TABLE meter.%I ADD CONSTRAINT ledger_month_of_utc '
                           'CHECK (event_time >= %L AND event_time < %L)',
                           v_part.relname, v_from, v_to);
        END;
        EXECUTE format('ALTER TABLE meter.ledger ATTACH PARTITION meter.%I '
                       'FOR VALUES FROM (%L) TO (%L)', v_part.relname, v_from, v_to);
        EXECUTE format('ALTER TABLE meter.%I DROP CONSTRAINT ledger_month_of_utc',
                       v_part.relname);
    END LOOP;
    FOR v_month IN
        SELECT DISTINCT extract(year FROM r.event_time)::integer AS y,
                        extract(month FROM r.event_time)::integer AS m
        FROM unnest(v_moved) r
    LOOP
        PERFORM meter.create_partition(v_month.y, v_month.m);
    END LOOP;
    INSERT INTO meter.ledger SELECT * FROM unnest(v_moved);
END
$$;
