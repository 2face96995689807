-- Retention and the period roll, mended (found by an audit, each reproduced).
--
-- 1. drop_old_partitions at REPEATABLE READ or SERIALIZABLE (a database whose
--    default_transaction_isolation says so) folded the partition through a snapshot older
--    than the partition's lock: a row committed while it waited was dropped without being
--    folded, and reconcile() reported the balance off by its amount. It now refuses to run
--    at any level but READ COMMITTED (MT001), and the worker calls it in an explicit READ
--    COMMITTED transaction.
-- 2. roll_periods counted an account whose step fails as a step, and such an account fails
--    at every call and sorts where its key puts it: with roll_batch of them first (one
--    tenant's broken configurations), no account after them was ever rolled. A failed step
--    no longer counts: changed in 020's copy of roll_periods (020 never left this stop).
-- 3. set_period_config accepted a period start before 1900, which no ledger row can carry,
--    so the account failed at every roll; it is refused (MT001) like an event_time before
--    1900.
-- Migrations once applied are never edited, so the two functions are replaced whole; only
-- the lines these comments name changed.

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
    IF p_older_than_months IS NULL OR p_older_than_months < 1 THEN
        PERFORM meter._fail('MT001', 'older_than_months',
            format('must be at least 1, got %s', coalesce(p_older_than_months::text, 'NULL')));
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

CREATE OR REPLACE FUNCTION meter.set_period_config(p_user_id text, p_event_type text, p_unit text,
                                        p_resource text, p_period_start date,
                                        p_period_allocation numeric,
                                        p_carry_over_limit numeric DEFAULT NULL,
                                        p_namespace text DEFAULT 'default',
                                        p_period_interval interval DEFAULT '1 month')
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_resource text := meter._resource(p_resource);
    v_allocation numeric;
    v_limit numeric;
    v_interval interval := meter._period_interval(p_period_interval);
    v_acc meter.accounts;
BEGIN
    PERFORM meter._guard(p_namespace);
    PERFORM meter._ident('user_id', p_user_id, 256, true),
            meter._ident('event_type', p_event_type, 256),
            meter._ident('unit', p_unit, 64);
    IF p_period_start IS NULL OR NOT isfinite(p_period_start) THEN
        PERFORM meter._fail('MT001', 'period_start', 'is required (a finite date)');
    END IF;
    IF p_period_start < date '1900-01-01' THEN  -- no ledger row can be dated before 1900
        PERFORM meter._fail('MT001', 'period_start',
                            format('%s is before 1900', to_char(p_period_start, 'YYYY-MM-DD')));
    END IF;
    v_allocation := meter._amount('period_allocation', p_period_allocation, 'nonnegative');
    IF p_carry_over_limit IS NOT NULL THEN
        v_limit := meter._amount('carry_over_limit', p_carry_over_limit, 'nonnegative');
    END IF;

    PERFORM meter._create_account(p_namespace, p_user_id, p_event_type, v_resource, p_unit);
    v_acc := meter._lock_account(p_namespace, p_user_id, p_event_type, v_resource, p_unit);
    UPDATE meter.accounts a
    SET period_start = p_period_start, period_allocation = v_allocation,
        carry_over_limit = v_limit, period_interval = v_interval, updated_at = now()
    WHERE a.namespace = p_namespace AND a.account_id = v_acc.account_id;
    INSERT INTO meter.period_config_changes
        (namespace, account_id, user_id, event_type, resource, unit, period_start,
         period_allocation, carry_over_limit, period_interval, actor)
    VALUES (p_namespace, v_acc.account_id, p_user_id, p_event_type, v_resource, p_unit,
            p_period_start, v_allocation, v_limit, v_interval, meter._actor());
END
$$;
