-- The expiry sweep never waits for an account; retention keeps what the period roll still
-- needs; a backdated write that races retention recreates its month.
--
-- Why (each found by a review of this stop, with a reproduction):
-- 1. The sweep deadlocked with a caller's own transaction. A caller that writes to an
--    account and then, in the same transaction, commits one of its holds takes the account
--    before the hold; that is inherent to a transaction of several calls. The sweep took
--    the due holds (SKIP LOCKED) and then waited for their accounts: holding the hold the
--    caller was about to commit, it waited for the account the caller held (40P01 after
--    deadlock_timeout). The sweep was always the victim, and its whole batch (up to 1000
--    holds of every namespace) was rolled back. Now it takes the due holds together with
--    their accounts, both with SKIP LOCKED, in one statement: a hold whose account someone
--    holds is passed over, not counted in the batch (a first version filtered after the
--    LIMIT, and a batch of holds on one held account stalled the sweep for everyone, as a
--    review found), and waits for the next round. Nothing depends on the sweep's timing:
--    reads, results and checks already count a hold past its TTL as reserving nothing
--    (023, 028), and a late commit still records its usage. The sweep no longer waits for
--    any row, so it can close no cycle.
-- 2. Retention could make a late period roll invent units. The roll closes a period "as
--    it stood at its end": the balance now, less the ledger rows dated after the end. Rows
--    folded into ledger_checkpoints by drop_old_partitions have lost their dates, so when
--    the roll was behind by more than the retention, rows dated after a period's end were
--    counted as before it: a consume after the end was charged to the period, which then
--    expired less and carried more (a review's case: retention of one month, a roll two
--    months late, 50 units carried that were never there; reconcile() saw nothing, since
--    the sums still matched). drop_old_partitions now keeps every month that holds rows
--    dated on or after the next period start of an account whose roll is due: its cutoff
--    is lowered to the earliest such start. A roll on time lowers nothing (its next start
--    is in the future). The months kept are dropped by a later run, once the roll caught
--    up; meanwhile each run raises a WARNING saying so (the worker logs it), since one
--    account whose roll fails at every run keeps them for every namespace.
-- 3. A backdated write racing retention failed with 23514 ("no partition of relation
--    ledger found for row"), which the pipeline files as a dead letter. _ledger_time saw
--    the month's partition before a concurrent drop committed, and the insert then found
--    none. For a month before the current one it now takes the ledger's own write lock
--    first (the lock the insert takes anyway, granted after a drop commits), then looks
--    the partition up and creates it when missing, as for any backdated event. The
--    current and next month are never dropped, so undated and current writes pay nothing.
--
-- Lock order: the sweep: each due hold with its account, both SKIP LOCKED (it waits for
-- none). drop_old_partitions: unchanged (its advisory lock, then each
-- partition). _ledger_time: for a past month, the ledger (ROW EXCLUSIVE), before the
-- partition it may create and before the account.
--
-- Migrations once applied are never edited: 002's _ledger_time, 020's
-- release_expired_reservations and 034's drop_old_partitions are replaced whole; only the
-- lines marked 036 changed.

CREATE OR REPLACE FUNCTION meter._ledger_time(p_param text, p_value timestamptz)
RETURNS timestamptz
LANGUAGE plpgsql AS $$
DECLARE
    v timestamptz := coalesce(p_value, now());
    v_month text := to_char(coalesce(p_value, now()) AT TIME ZONE 'UTC', 'YYYY_MM');
BEGIN
    IF p_value IS NOT NULL THEN
        IF p_value > now() + interval '24 hours' THEN
            PERFORM meter._fail('MT001', p_param,
                format('%s is more than 24 hours in the future', p_value));
        END IF;
        IF p_value < timestamptz '1900-01-01 00:00:00+00' THEN
            PERFORM meter._fail('MT001', p_param, format('%s is before 1900', p_value));
        END IF;
        -- 036: a past month may be being dropped: wait for that drop before looking
        IF v_month < to_char(now() AT TIME ZONE 'UTC', 'YYYY_MM') THEN
            LOCK TABLE ONLY meter.ledger IN ROW EXCLUSIVE MODE;
        END IF;
    END IF;
    IF to_regclass('meter.ledger_' || v_month) IS NULL THEN
        PERFORM meter.create_partition(extract(year FROM v AT TIME ZONE 'UTC')::integer,
                                       extract(month FROM v AT TIME ZONE 'UTC')::integer);
    END IF;
    IF v_month = to_char(now() AT TIME ZONE 'UTC', 'YYYY_MM') THEN
        PERFORM set_config('meter.ledger_month', v_month, false);
    END IF;
    RETURN v;
END
$$;

-- Expire up to p_batch_size holds past their TTL (every namespace when p_namespace is
-- NULL, for a privileged role with no tenant). Returns how many it expired.
-- Locks: each due hold with its account, both SKIP LOCKED (036): a hold or an account
-- someone else holds is left for the next round, so the sweep never waits.
CREATE OR REPLACE FUNCTION meter.release_expired_reservations(p_namespace text DEFAULT NULL,
                                                   p_batch_size integer DEFAULT 1000)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_namespaces text[];
    v_accounts bigint[];
    v_totals numeric[];
    v_count integer;
BEGIN
    IF p_namespace IS NULL THEN
        IF nullif(current_setting('meter.tenant', true), '') IS NOT NULL
           OR NOT meter._is_privileged(session_user) THEN
            RAISE EXCEPTION 'namespace: sweeping every namespace needs a privileged role and no tenant'
                USING ERRCODE = 'MT004', COLUMN = 'namespace';
        END IF;
    ELSE
        PERFORM meter._guard(p_namespace);
    END IF;
    IF p_batch_size IS NULL OR p_batch_size < 1 OR p_batch_size > 100000 THEN
        PERFORM meter._fail('MT001', 'batch_size', format('must be between 1 and 100000, got %s',
                                                          coalesce(p_batch_size::text, 'NULL')));
    END IF;

    -- 036: the due holds whose account is free, each locked with its account, both SKIP
    -- LOCKED: a caller's transaction may hold the account and be about to commit one of
    -- these very holds. A hold or an account someone holds is passed over (and not
    -- counted in the batch, so holds elsewhere are still reached).
    WITH due AS (
        SELECT r.namespace, r.reservation_id
        FROM meter.reservations r
        JOIN meter.accounts a ON a.namespace = r.namespace AND a.account_id = r.account_id
        WHERE r.status = 'active' AND r.expires_at <= now()
          AND (p_namespace IS NULL OR r.namespace = p_namespace)
        ORDER BY r.expires_at
        LIMIT p_batch_size
        FOR UPDATE OF r, a SKIP LOCKED
    ), expired AS (
        UPDATE meter.reservations r
        SET status = 'expired', completed_at = now(),
            completed_actor = '{"actor_id": "system:expiry"}'::jsonb
        FROM due
        WHERE r.namespace = due.namespace AND r.reservation_id = due.reservation_id
        RETURNING r.namespace, r.account_id, r.amount
    ), per_account AS (
        SELECT e.namespace, e.account_id, sum(e.amount) AS total, count(*) AS n
        FROM expired e GROUP BY e.namespace, e.account_id
    )
    SELECT array_agg(p.namespace), array_agg(p.account_id), array_agg(p.total),
           coalesce(sum(p.n), 0)
    INTO v_namespaces, v_accounts, v_totals, v_count
    FROM per_account p;

    IF v_count = 0 THEN
        RETURN 0;
    END IF;
    UPDATE meter.accounts a
    SET reserved = a.reserved - d.total, updated_at = now()
    FROM unnest(v_namespaces, v_accounts, v_totals) AS d(namespace, account_id, total)
    WHERE a.namespace = d.namespace AND a.account_id = d.account_id;
    RETURN v_count;
END
$$;
REVOKE EXECUTE ON FUNCTION meter.release_expired_reservations(text, integer) FROM PUBLIC;

-- Drop the ledger's monthly partitions that end on or before the first day of the current
-- month minus p_older_than_months, after folding their rows into meter.ledger_checkpoints;
-- but never one holding rows dated on or after the next period start of an account whose
-- period roll is due (036). Returns the partitions dropped.
-- Locks: its advisory lock (one dropper at a time), then each partition it drops.
CREATE OR REPLACE FUNCTION meter.drop_old_partitions(p_older_than_months integer DEFAULT 24)
RETURNS SETOF text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_cutoff timestamptz;
    v_part record;
    v_upper timestamptz;
    v_today date := (now() AT TIME ZONE 'UTC')::date;
    v_roll_needs date;
    v_window timestamptz;
    v_kept integer := 0;
BEGIN
    -- The fold must see every row the drop removes. At REPEATABLE READ or SERIALIZABLE its
    -- snapshot is older than the partition's lock: a row committed while this call waited
    -- for that lock would be dropped without being folded.
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        PERFORM meter._fail('MT001', 'transaction_isolation',
            format('drop_old_partitions must run at READ COMMITTED, not %s',
                   upper(current_setting('transaction_isolation'))));
    END IF;
    IF p_older_than_months IS NULL OR p_older_than_months NOT BETWEEN 1 AND 1200 THEN
        PERFORM meter._fail('MT001', 'older_than_months',
            format('must be between 1 and 1200, got %s',
                   coalesce(p_older_than_months::text, 'NULL')));
    END IF;
    -- One dropper at a time; writers are kept out of each partition by its lock below.
    PERFORM pg_advisory_xact_lock(19781, 0);
    v_cutoff := (date_trunc('month', now() AT TIME ZONE 'UTC')
                 - make_interval(months => p_older_than_months)) AT TIME ZONE 'UTC';
    -- 036: what a due roll still has to close as it stood: the rows dated from the next
    -- period start on (from the configured start, for a period configured but not opened,
    -- whose open closes the one before it). The accounts are roll_periods' candidates.
    SELECT min(CASE WHEN c.opened THEN meter._next_period_start(c.namespace, c.account_id,
                                                                c.period_start,
                                                                c.period_interval)
                    ELSE c.period_start END)
    INTO v_roll_needs
    FROM (SELECT a.namespace, a.account_id, a.period_start, a.period_interval,
                 EXISTS (SELECT 1 FROM meter.periods p
                         WHERE p.namespace = a.namespace AND p.account_id = a.account_id
                           AND p.period_start = a.period_start
                           AND p.opened_at IS NOT NULL) AS opened
          FROM meter.accounts a
          WHERE a.period_allocation IS NOT NULL AND a.period_interval IS NOT NULL
            AND a.period_start <= v_today) c
    -- as in roll_periods: only these can be due, and only they need the exact figure
    WHERE NOT c.opened
       OR (CASE WHEN c.period_interval < interval '1000 years'
                THEN (c.period_start + c.period_interval)::date <= v_today ELSE false END)
       OR EXISTS (SELECT 1 FROM meter.periods p
                  WHERE p.namespace = c.namespace AND p.account_id = c.account_id
                    AND p.period_start >= c.period_start
                    AND (p.period_start > c.period_start OR p.period_end IS NOT NULL));
    v_window := v_cutoff;
    IF v_roll_needs IS NOT NULL AND v_roll_needs <= v_today THEN
        v_cutoff := least(v_cutoff, v_roll_needs::timestamp AT TIME ZONE 'UTC');
    END IF;
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
        IF v_upper > v_cutoff THEN
            -- 036: past the window, but kept for the roll
            v_kept := v_kept + (v_upper <= v_window)::integer;
            CONTINUE;
        END IF;
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
    IF v_kept > 0 THEN
        -- 036: said, since one account whose roll fails at every run would keep them
        RAISE WARNING 'drop_old_partitions kept % month(s) older than % months: the period '
                      'roll has yet to close periods ending from % on (roll_periods reports '
                      'the accounts it cannot roll)',
                      v_kept, p_older_than_months, v_roll_needs - 1;
    END IF;
END
$$;
