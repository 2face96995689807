-- open_period refuses a start out of range by name, before any date arithmetic.
--
-- Why (found by a review of this stop): open_period computed `p_period_start - 1` in its
-- DECLARE section and cast the start to timestamp before meter._ledger_time bounded it.
-- A start past timestamp's range (year 294277 and later, up to date's last day) or at
-- date's first day (4714-11-24 BC) failed with PostgreSQL's 22008 "date out of range",
-- which names no parameter, and did so ahead of the unknown account's MT003. Only SQL
-- callers can send such dates (Python's date stops at year 9999). 034 did the same for
-- close_period.
--
-- Now a start before 1900 or after tomorrow (UTC, by the clock: what _ledger_time refuses
-- as more than 24 hours ahead, at the day's granularity) is refused with MT001 naming
-- period_start, in _ledger_time's words, before anything else is computed. Starts
-- _ledger_time accepts are unchanged (it still judges tomorrow's start against the hour).
--
-- Locks: unchanged (031). Migrations once applied are never edited: 037's open_period is
-- replaced whole; only the lines marked 046 changed.

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
    v_close_to date;  -- 046: set once p_period_start is known to be in range
    v_close_end timestamptz;
    v_later numeric;
    v_before date;
    v_move boolean := true;
BEGIN
    PERFORM meter._guard(p_namespace);
    PERFORM meter._ident('user_id', p_user_id, 256, true),
            meter._ident('event_type', p_event_type, 256),
            meter._ident('unit', p_unit, 64);
    IF p_period_start IS NULL OR NOT isfinite(p_period_start) THEN
        PERFORM meter._fail('MT001', 'period_start', 'is required (a finite date)');
    END IF;
    -- 046: what _ledger_time refuses below, refused before any date arithmetic, which
    -- overflows for dates past timestamp's range or at date's first day
    IF p_period_start < date '1900-01-01' THEN
        PERFORM meter._fail('MT001', 'period_start', format('%s is before 1900', p_period_start));
    END IF;
    IF p_period_start > (now() AT TIME ZONE 'UTC' + interval '24 hours')::date THEN
        PERFORM meter._fail('MT001', 'period_start',
            format('%s is more than 24 hours in the future', p_period_start));
    END IF;
    v_close_to := p_period_start - 1;  -- 046
    IF p_allocation IS NOT NULL THEN
        v_allocation := meter._amount('allocation', p_allocation, 'nonnegative');
    END IF;
    v_time := meter._ledger_time('period_start', p_period_start::timestamp AT TIME ZONE 'UTC');
    v_close_end := p_period_start::timestamp AT TIME ZONE 'UTC' - interval '1 microsecond';
    -- The month the close below dates its rows in, created before the account is locked
    -- (the lock order: months first), when a close looks likely; read without a lock,
    -- so the close still creates it if this guessed wrong.
    IF v_close_to >= date '1900-01-01' AND EXISTS (
           SELECT 1 FROM meter.accounts a JOIN meter.periods p
               ON p.namespace = a.namespace AND p.account_id = a.account_id
           WHERE a.namespace = p_namespace AND a.user_id IS NOT DISTINCT FROM p_user_id
             AND a.event_type = p_event_type AND a.resource = v_resource AND a.unit = p_unit
             AND p.opened_at IS NOT NULL AND p.period_end IS NULL
             AND p.period_start < p_period_start) THEN
        PERFORM meter._ledger_time('period_start', v_close_end);
    END IF;

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

    -- An account the roll keeps (configured), whose latest period opened before this one
    -- is still open, with nothing recorded after its start: the roll would take this
    -- period for the current one and never close that one, whose unused units would run
    -- on into this period past the carry-over limit. Ended (this period starts today or
    -- before, UTC), it is closed now, at the day before, as the roll closes: what it left
    -- unused at its end, by the ledger's event times. Not ended yet (this period opened
    -- ahead, up to a day), it stays the current one: the roll closes it at its end, then
    -- moves on to this one, opened already; closing it now would charge the rest of its
    -- days to this period. A period with anything recorded after its start (a later
    -- period opened or closed, as before 031) is left alone: a later close took its units.
    -- Nor is it closed when this period starts past its next start (the roll is behind,
    -- 037): closing it at the day before would make one period of several and skip the
    -- periods between, with their allocations; the roll opens them and keeps this one.
    IF v_acc.period_allocation IS NOT NULL AND v_acc.period_interval IS NOT NULL THEN
        SELECT p.period_start INTO v_before FROM meter.periods p
        WHERE p.namespace = p_namespace AND p.account_id = v_acc.account_id
          AND p.opened_at IS NOT NULL AND p.period_start < p_period_start
        ORDER BY p.period_start DESC LIMIT 1;
        IF v_before IS NOT NULL AND NOT EXISTS (
               SELECT 1 FROM meter.periods p
               WHERE p.namespace = p_namespace AND p.account_id = v_acc.account_id
                 AND (p.period_start > v_before OR p.period_end >= v_before)) THEN
            IF p_period_start > (now() AT TIME ZONE 'UTC')::date
               -- 037: past that period's next start (the roll is behind): the roll closes
               -- it and opens the periods between, then keeps this one
               OR p_period_start > coalesce(meter._period_start_limit(
                                               p_namespace, v_acc.account_id, p_period_start),
                                            'infinity') THEN
                v_move := false;
            ELSIF v_close_to >= date '1900-01-01' THEN
                SELECT coalesce(sum(l.amount), 0) INTO v_later FROM meter.ledger l
                WHERE l.namespace = p_namespace AND l.account_id = v_acc.account_id
                  AND l.event_time > v_close_end;
                PERFORM meter._close_period(p_user_id, p_event_type, p_unit, p_resource,
                                            v_close_to, p_namespace, v_later);
                v_acc := meter._lock_account(p_namespace, p_user_id, p_event_type, v_resource,
                                             p_unit);
            END IF;
        END IF;
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
    WHERE a.namespace = p_namespace AND a.account_id = v_acc.account_id AND v_move;
    INSERT INTO meter.periods
        (namespace, account_id, user_id, event_type, resource, unit, period_start, allocation,
         open_balance, open_entry_id, opened_at, opened_actor)
    VALUES (p_namespace, v_acc.account_id, p_user_id, p_event_type, v_resource, p_unit,
            p_period_start, v_allocation, v_balance, v_entry, now(), meter._actor());
    RETURN v_balance;
END
$$;
