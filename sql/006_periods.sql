-- Billing periods: configuration, opening (allocation) and closing (expiry, carry-over).
--
-- Each period of an account is a row of meter.periods. open_period is idempotent per
-- (account, period_start) and close_period per (account, period_end): a repeat returns the
-- first result and writes nothing; a repeat with other arguments is MT002.
-- Ledger rows are dated at the period boundaries (UTC): the allocation at period_start
-- 00:00, the expiration and carry-over at the last microsecond of period_end.

-- Whether a period interval is usable for date-based periods: positive whole days/months.
CREATE FUNCTION meter._period_interval(p_value interval) RETURNS interval
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    v interval := coalesce(p_value, interval '1 month');
BEGIN
    IF v <= interval '0' OR extract(epoch FROM v - date_trunc('day', v)) <> 0
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

-- Configure an account's periods (created if missing): when the current period starts, the
-- allocation each period opens with, the carry-over limit (NULL: carry everything), and the
-- period length. Recorded in meter.period_config_changes.
-- Locks: the account.
CREATE FUNCTION meter.set_period_config(p_user_id text, p_event_type text, p_unit text,
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

-- Open a period: allocate p_allocation (or the configured period_allocation) dated at
-- p_period_start 00:00 UTC, and make it the account's current period. Returns the balance
-- after the allocation. Unknown account: MT003.
-- Locks: the account.
CREATE FUNCTION meter.open_period(p_user_id text, p_event_type text, p_unit text,
                                  p_resource text, p_period_start date,
                                  p_allocation numeric DEFAULT NULL,
                                  p_namespace text DEFAULT 'default')
RETURNS numeric
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_resource text := meter._resource(p_resource);
    v_allocation numeric;
    v_time timestamptz;
    v_acc meter.accounts;
    v_period meter.periods;
    v_post record;
    v_entry bigint;
    v_balance numeric;
BEGIN
    PERFORM meter._guard(p_namespace);
    PERFORM meter._ident('user_id', p_user_id, 256, true),
            meter._ident('event_type', p_event_type, 256),
            meter._ident('unit', p_unit, 64);
    IF p_period_start IS NULL OR NOT isfinite(p_period_start) THEN
        PERFORM meter._fail('MT001', 'period_start', 'is required (a finite date)');
    END IF;
    IF p_allocation IS NOT NULL THEN
        v_allocation := meter._amount('allocation', p_allocation, 'nonnegative');
    END IF;
    v_time := meter._ledger_time('period_start', p_period_start::timestamp AT TIME ZONE 'UTC');

    v_acc := meter._lock_account(p_namespace, p_user_id, p_event_type, v_resource, p_unit);
    IF v_acc.account_id IS NULL THEN
        PERFORM meter._fail('MT003', 'user_id',
            format('no account (%s, %s, %s, %s) in namespace %s; configure it with '
                   'set_period_config or allocate to it first',
                   coalesce(p_user_id, 'pool'), p_event_type, v_resource, p_unit, p_namespace));
    END IF;
    v_allocation := coalesce(v_allocation, v_acc.period_allocation);
    IF v_allocation IS NULL THEN
        PERFORM meter._fail('MT001', 'allocation',
            'is required: none given and no period_allocation configured for the account');
    END IF;

    SELECT * INTO v_period FROM meter.periods p
    WHERE p.namespace = p_namespace AND p.account_id = v_acc.account_id
      AND p.period_start = p_period_start;
    IF FOUND AND v_period.opened_at IS NOT NULL THEN
        IF v_period.allocation <> v_allocation THEN
            PERFORM meter._fail('MT002', 'allocation',
                format('period %s was already opened with allocation %s',
                       p_period_start, v_period.allocation));
        END IF;
        RETURN v_period.open_balance;
    END IF;

    IF v_allocation > 0 THEN
        v_post := meter._post(p_namespace, v_acc.account_id, 'allocation', v_allocation, v_time,
                              NULL, jsonb_build_object('period_start', p_period_start));
        v_balance := v_post.balance;
        v_entry := v_post.entry_id;
    ELSE
        v_balance := v_acc.balance;
    END IF;
    UPDATE meter.accounts a SET period_start = p_period_start, updated_at = now()
    WHERE a.namespace = p_namespace AND a.account_id = v_acc.account_id;
    INSERT INTO meter.periods
        (namespace, account_id, user_id, event_type, resource, unit, period_start, allocation,
         open_balance, open_entry_id, opened_at, opened_actor)
    VALUES (p_namespace, v_acc.account_id, p_user_id, p_event_type, v_resource, p_unit,
            p_period_start, v_allocation, v_balance, v_entry, now(), meter._actor());
    RETURN v_balance;
END
$$;

-- Close the period ending on p_period_end (its last day): what is available above the
-- carry-over limit expires. Writes an `expiration` row for all that is available and a
-- `carry_over` row for what rolls forward (each only when non-zero), so history shows both;
-- returns the net expired, the carried over and the new balance. Nothing available (zero or
-- negative): writes nothing, returns zeros and the balance. Unknown account: MT003.
-- Locks: the account.
CREATE FUNCTION meter.close_period(p_user_id text, p_event_type text, p_unit text,
                                   p_resource text, p_period_end date,
                                   p_namespace text DEFAULT 'default')
RETURNS TABLE (expired numeric, carried_over numeric, new_balance numeric)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
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

    v_available := v_acc.balance - v_acc.reserved;
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

REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA meter FROM PUBLIC;
