-- Ledger partitions: one per calendar month (UTC), named meter.ledger_YYYY_MM.
--
-- Creation takes an advisory lock per month (class 0x4D45, 'ME') so that two callers
-- creating the same month do not collide. Dropping folds each partition's rows into
-- meter.ledger_checkpoints in the same transaction, so reconcile() stays empty.

CREATE FUNCTION meter.create_partition(p_year integer, p_month integer) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_name text;
    v_from timestamptz;
BEGIN
    IF p_year IS NULL OR p_year < 1900 OR p_year > 9999 THEN
        PERFORM meter._fail('MT001', 'year', format('must be between 1900 and 9999, got %s',
                                                    coalesce(p_year::text, 'NULL')));
    END IF;
    IF p_month IS NULL OR p_month < 1 OR p_month > 12 THEN
        PERFORM meter._fail('MT001', 'month', format('must be between 1 and 12, got %s',
                                                     coalesce(p_month::text, 'NULL')));
    END IF;
    v_name := format('ledger_%s_%s', lpad(p_year::text, 4, '0'), lpad(p_month::text, 2, '0'));
    IF to_regclass('meter.' || v_name) IS NOT NULL THEN
        RETURN NULL;
    END IF;
    PERFORM pg_advisory_xact_lock(19781, p_year * 100 + p_month);
    IF to_regclass('meter.' || v_name) IS NOT NULL THEN
        RETURN NULL;
    END IF;
    v_from := make_timestamptz(p_year, p_month, 1, 0, 0, 0, 'UTC');
    EXECUTE format('CREATE TABLE meter.%I PARTITION OF meter.ledger FOR VALUES FROM (%L) TO (%L)',
                   v_name, v_from, v_from + interval '1 month');
    EXECUTE format('CREATE TRIGGER ledger_no_truncate BEFORE TRUNCATE ON meter.%I '
                   'FOR EACH STATEMENT EXECUTE FUNCTION meter._refuse_change()', v_name);
    RETURN v_name;
END
$$;

-- Create this month's partition and the next p_months_ahead; return the ones created.
CREATE FUNCTION meter.ensure_partitions(p_months_ahead integer DEFAULT 3) RETURNS SETOF text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_month timestamp := date_trunc('month', now() AT TIME ZONE 'UTC');
    v_name text;
BEGIN
    IF p_months_ahead IS NULL OR p_months_ahead < 0 OR p_months_ahead > 120 THEN
        PERFORM meter._fail('MT001', 'months_ahead', format('must be between 0 and 120, got %s',
                                                            coalesce(p_months_ahead::text, 'NULL')));
    END IF;
    FOR i IN 0..p_months_ahead LOOP
        v_name := meter.create_partition(extract(year FROM v_month + make_interval(months => i))::integer,
                                         extract(month FROM v_month + make_interval(months => i))::integer);
        IF v_name IS NOT NULL THEN
            RETURN NEXT v_name;
        END IF;
    END LOOP;
END
$$;

-- Drop the partitions of months that ended on or before the first day of the current month
-- minus p_older_than_months, after folding their rows into meter.ledger_checkpoints.
-- Returns the names dropped. Idempotency keys are kept: replays still return their result.
CREATE FUNCTION meter.drop_old_partitions(p_older_than_months integer DEFAULT 24)
RETURNS SETOF text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_cutoff timestamptz;
    v_part record;
    v_upper timestamptz;
BEGIN
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

-- This month and the next three exist from the start.
SELECT meter.ensure_partitions(3);

REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA meter FROM PUBLIC;
