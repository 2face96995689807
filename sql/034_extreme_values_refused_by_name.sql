-- Extreme values from SQL callers are refused by name, as every other bad value is.
--
-- Why (found by probing each API function's date, time, interval and integer parameters
-- with the extremes of their types; listed as not built since 032): three checks did
-- arithmetic on a value before bounding it, and PostgreSQL's own range error (22008,
-- naming no parameter) came out instead of MT001:
-- 1. set_period_config(p_period_interval => 'infinity'): 006's meter._period_interval
--    subtracted from the interval (PostgreSQL 17 and later have infinite intervals). The
--    SDK mapped that code to a ValidationError for interval text; SQL callers got 22008.
--    '-infinity' was refused by name already (not positive).
-- 2. close_period(p_period_end => '5874897-12-31'), the last date there is, or any date
--    past 294276 (the end of timestamps): 024's meter._close_period added a day and cast
--    to timestamp before meter._ledger_time refused the time as in the future. close_period
--    now refuses a date after 9999-12-30 itself, with the same words, after the key checks
--    that come first in _close_period (meter._check_account_key, 033); other dates pay
--    one comparison. (The roll and open_period call _close_period with dates they computed.)
-- 3. drop_old_partitions(p_older_than_months => 2147483647) subtracted that many months
--    from now. The count is now bounded like the other retention settings (keys: 36500
--    days; partitions ahead: 120 months): at most 1200 months, a century. The worker's
--    METER_LEDGER_RETENTION_MONTHS is bounded the same, so a bad value stops the worker
--    at start instead of failing beat's retention task every day.
--
-- Lock order: unchanged (close_period: holds past their TTL with SKIP LOCKED, then the
-- account; drop_old_partitions: its advisory lock, then each partition).
--
-- Migrations once applied are never edited: 006's _period_interval, 024's close_period and
-- 022's drop_old_partitions are replaced whole; only the lines marked 034 changed.

CREATE OR REPLACE FUNCTION meter._period_interval(p_value interval) RETURNS interval
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    v interval := coalesce(p_value, interval '1 month');
BEGIN
    IF NOT isfinite(v)  -- 034: the arithmetic below fails on an infinite interval
       OR v <= interval '0' OR extract(epoch FROM v - date_trunc('day', v)) <> 0
       OR (extract(year FROM v) * 12 + extract(month FROM v) > 0
           AND extract(day FROM v) <> 0)
       OR extract(year FROM v) * 12 + extract(month FROM v) < 0
       OR extract(day FROM v) < 0 THEN
        PERFORM meter._fail('MT001', 'period_interval',
            format('must be a positive number of whole days or whole months, got %s', v));
    END IF;
    RETURN v;
END
$$;

-- Close a billing period (SPEC 3.4); the body is meter._close_period (024). Locks: as
-- there (holds past their TTL with SKIP LOCKED, then the account).
CREATE OR REPLACE FUNCTION meter.close_period(p_user_id text, p_event_type text, p_unit text,
                                   p_resource text, p_period_end date,
                                   p_namespace text DEFAULT 'default')
RETURNS TABLE (expired numeric, carried_over numeric, new_balance numeric)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF p_period_end > date '9999-12-30' THEN
        -- 034: past it, _close_period's date arithmetic overflowed before its checks
        -- reached the date; the checks that come first there come first here.
        PERFORM meter._check_account_key(p_namespace, p_user_id, p_event_type, p_unit,
                                         p_resource);
        PERFORM meter._fail('MT001', 'period_end',
                            format('%s is more than 24 hours in the future', p_period_end));
    END IF;
    RETURN QUERY SELECT * FROM meter._close_period(p_user_id, p_event_type, p_unit,
                                                   p_resource, p_period_end, p_namespace,
                                                   NULL);
END
$$;

-- Fold the ledger months older than p_older_than_months into checkpoints and drop them
-- (022). Locks: its advisory lock, then each partition dropped, one at a time.
CREATE OR REPLACE FUNCTION meter.drop_old_partitions(p_older_than_months integer DEFAULT 24)
RETURNS SETOF text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_cutoff timestamptz;
    v_part record;
    v_upper timestamptz;
BEGIN
    -- The fold must see every row the drop removes. At REPEATABLE READ or SERIALIZABLE its
    -- snapshot is older than the partition's lock: a row committed while this call waited
    -- for that lock would be dropped without being folded.
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        PERFORM meter._fail('MT001', 'transaction_isolation',
            format('drop_old_partitions must run at READ COMMITTED, not %s',
                   upper(current_setting('transaction_isolation'))));
    END IF;
    IF p_older_than_months IS NULL OR p_older_than_months NOT BETWEEN 1 AND 1200 THEN  -- 034
        PERFORM meter._fail('MT001', 'older_than_months',
            format('must be between 1 and 1200, got %s',
                   coalesce(p_older_than_months::text, 'NULL')));
    END IF;
    -- One dropper at a time; writers are kept out of each partition by its lock below.
    PERFORM pg_advisory_xact_lock(19781, 0);
    v_cutoff := (date_trunc('month', now() AT TIME ZONE 'UTC')
                 - make_interval(months => p_older_than_months)) AT TIME ZONE 'UTC';
    FOR v_part IN
        SELECT c.relname,
               make_timestamptz(substr(c.relname, 8, 4)::integer, substr(c.relname, 13, 2)::integer,
                                1, 0, 0, 0, 'UTC') AS month_start
        FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'meter.ledger'::regclass
          AND c.relname ~ '^ledger_[0-9]{4}_[0-9]{2}$'
        ORDER BY c.relname
    LOOP
        v_upper := v_part.month_start + interval '1 month';
        CONTINUE WHEN v_upper > v_cutoff;
        EXECUTE format('LOCK TABLE meter.%I IN ACCESS EXCLUSIVE MODE', v_part.relname);
        EXECUTE format(
            'INSERT INTO meter.ledger_checkpoints AS c (namespace, account_id, balance, entries, through)
             SELECT namespace, account_id, sum(amount), count(*), %L::timestamptz
             FROM meter.%I GROUP BY namespace, account_id
             ON CONFLICT (namespace, account_id) DO UPDATE
             SET balance = c.balance + excluded.balance,
                 entries = c.entries + excluded.entries,
                 through = greatest(c.through, excluded.through),
                 updated_at = now()', v_upper, v_part.relname);
        EXECUTE format('DROP TABLE meter.%I', v_part.relname);
        RETURN NEXT v_part.relname;
    END LOOP;
END
$$;
