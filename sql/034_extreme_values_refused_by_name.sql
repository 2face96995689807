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
--    to timestamp before meter._ledger_time refused the time as in the future. A date
--    after 9999-12-30 is now refused first, with the same words.
-- 3. drop_old_partitions(p_older_than_months => 2147483647) subtracted that many months
--    from now. The count is now bounded like the other retention settings (keys: 36500
--    days; partitions ahead: 120 months): at most 1200 months, a century. The worker's
--    METER_LEDGER_RETENTION_MONTHS is bounded the same, so a bad value stops the worker
--    at start instead of failing beat's retention task every day.
--
-- Lock order: unchanged (_close_period: holds past their TTL with SKIP LOCKED, then the
-- account; drop_old_partitions: its advisory lock, then each partition).
--
-- Migrations once applied are never edited: 006's _period_interval, 024's _close_period
-- and 022's drop_old_partitions are replaced whole; only the lines marked 034 changed.

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

-- close_period's body (024), with one choice: what is available (p_later NULL: now; else
-- at the period's end). Locks: holds past their TTL with SKIP LOCKED, then the account.
CREATE OR REPLACE FUNCTION meter._close_period(p_user_id text, p_event_type text, p_unit text,
                                    p_resource text, p_period_end date, p_namespace text,
                                    p_later numeric)
RETURNS TABLE (expired numeric, carried_over numeric, new_balance numeric)
LANGUAGE plpgsql AS $$
DECLARE
    v_resource text := meter._resource(p_resource);
    v_time timestamptz;
    v_acc meter.accounts;
    v_period meter.periods;
    v_available numeric;
    v_carry numeric := 0;
    v_expired numeric := 0;
    v_balance numeric;
    v_post record;
BEGIN
    PERFORM meter._guard(p_namespace);
    PERFORM meter._ident('user_id', p_user_id, 256, true),
            meter._ident('event_type', p_event_type, 256),
            meter._ident('unit', p_unit, 64);
    IF p_period_end IS NULL OR NOT isfinite(p_period_end) THEN
        PERFORM meter._fail('MT001', 'period_end', 'is required (a finite date)');
    END IF;
    IF p_period_end > date '9999-12-30' THEN  -- 034: beyond it, the line below overflowed
        PERFORM meter._fail('MT001', 'period_end',
                            format('%s is more than 24 hours in the future', p_period_end));
    END IF;
    v_time := meter._ledger_time('period_end',
        (p_period_end + 1)::timestamp AT TIME ZONE 'UTC' - interval '1 microsecond');

    v_acc := meter._lock_account(p_namespace, p_user_id, p_event_type, v_resource, p_unit);
    IF v_acc.account_id IS NULL THEN
        PERFORM meter._fail('MT003', 'user_id',
            format('no account (%s, %s, %s, %s) in namespace %s',
                   coalesce(p_user_id, 'pool'), p_event_type, v_resource, p_unit, p_namespace));
    END IF;

    SELECT * INTO v_period FROM meter.periods p
    WHERE p.namespace = p_namespace AND p.account_id = v_acc.account_id
      AND p.period_end = p_period_end;
    IF FOUND THEN
        expired := v_period.expired;
        carried_over := v_period.carried_over;
        new_balance := v_period.close_balance;
        RETURN NEXT;
        RETURN;
    END IF;
    -- Holds past their TTL reserve nothing any more: expire them (SKIP LOCKED, so taking
    -- them after the account waits on nothing), or their amount would survive the close.
    IF meter._expire_due(p_namespace, p_user_id, p_event_type, v_resource, p_unit, NULL) THEN
        v_acc := meter._lock_account(p_namespace, p_user_id, p_event_type, v_resource, p_unit);
    END IF;

    v_available := v_acc.balance - v_acc.reserved;
    IF p_later IS NOT NULL THEN
        -- What the period left unused at its end, by the ledger's event times: the balance
        -- without what is dated after the end (p_later, the caller's sum), less what the
        -- holds made by then still held at the end: not past their TTL, and not committed,
        -- released or expired yet (a TTL is at most 86400 s, hence the bound on created_at;
        -- in seconds, since a day on a timestamptz follows the session's TimeZone).
        SELECT v_acc.balance - p_later - coalesce(sum(r.amount), 0) INTO v_available
        FROM meter.reservations r
        WHERE r.namespace = p_namespace AND r.account_id = v_acc.account_id
          AND r.created_at > v_time - interval '86400 seconds' AND r.created_at <= v_time
          AND r.expires_at > v_time AND (r.completed_at IS NULL OR r.completed_at > v_time);
    END IF;
    v_balance := v_acc.balance;
    IF v_available > 0 THEN
        v_carry := CASE WHEN v_acc.carry_over_limit IS NULL THEN v_available
                        ELSE least(v_available, v_acc.carry_over_limit) END;
        v_post := meter._post(p_namespace, v_acc.account_id, 'expiration', -v_available,
                              v_time, NULL, jsonb_build_object('period_end', p_period_end));
        v_balance := v_post.balance;
        IF v_carry > 0 THEN
            v_post := meter._post(p_namespace, v_acc.account_id, 'carry_over', v_carry,
                                  v_time, NULL, jsonb_build_object('period_end', p_period_end));
            v_balance := v_post.balance;
        END IF;
        v_expired := v_available - v_carry;
    END IF;
    IF p_later IS NOT NULL THEN
        v_balance := v_balance - p_later;  -- recorded as it stood at the end, after the close
    END IF;
    expired := v_expired;
    carried_over := v_carry;
    new_balance := v_balance;

    -- Record the close on the period it ends (the latest open one starting on or before
    -- p_period_end), or on a new row when no open was recorded.
    UPDATE meter.periods p
    SET period_end = p_period_end, expired = v_expired, carried_over = v_carry,
        close_balance = v_balance, closed_at = now(), closed_actor = meter._actor()
    WHERE p.namespace = p_namespace AND p.period_id = (
        SELECT q.period_id FROM meter.periods q
        WHERE q.namespace = p_namespace AND q.account_id = v_acc.account_id
          AND q.period_end IS NULL AND q.period_start <= p_period_end
        ORDER BY q.period_start DESC LIMIT 1);
    IF NOT FOUND THEN
        INSERT INTO meter.periods
            (namespace, account_id, user_id, event_type, resource, unit, period_end, expired,
             carried_over, close_balance, closed_at, closed_actor)
        VALUES (p_namespace, v_acc.account_id, p_user_id, p_event_type, v_resource, p_unit,
                p_period_end, v_expired, v_carry, v_balance, now(),
                meter._actor());
    END IF;
    RETURN NEXT;
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
