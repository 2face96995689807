-- A repeated open_period replays whatever the account's configuration says now.
--
-- Why: open_period resolved a NULL p_allocation to the account's current period_allocation
-- before comparing with the period already opened, so after set_period_config changed the
-- allocation, the identical call (p_allocation NULL) raised IdempotencyConflictError
-- instead of returning the first result (found by an audit). And with the configuration
-- removed, it raised MT001 (allocation required).
--
-- Now the look-up of an opened period comes first: a repeat with p_allocation NULL returns
-- the opening balance; an explicit p_allocation must equal the one the period was opened
-- with (MT002 otherwise, as before). Migrations once applied are never edited, so the
-- function is replaced whole; only the order of those two steps changed.

CREATE OR REPLACE FUNCTION meter.open_period(p_user_id text, p_event_type text, p_unit text,
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
    SELECT * INTO v_period FROM meter.periods p
    WHERE p.namespace = p_namespace AND p.account_id = v_acc.account_id
      AND p.period_start = p_period_start;
    IF FOUND AND v_period.opened_at IS NOT NULL THEN
        -- A repeat: its own arguments decide, not the account's configuration now, which
        -- may have changed since the period was opened.
        IF v_allocation IS NOT NULL AND v_period.allocation <> v_allocation THEN
            PERFORM meter._fail('MT002', 'allocation',
                format('period %s was already opened with allocation %s',
                       p_period_start, v_period.allocation));
        END IF;
        RETURN v_period.open_balance;
    END IF;

    v_allocation := coalesce(v_allocation, v_acc.period_allocation);
    IF v_allocation IS NULL THEN
        PERFORM meter._fail('MT001', 'allocation',
            'is required: none given and no period_allocation configured for the account');
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
