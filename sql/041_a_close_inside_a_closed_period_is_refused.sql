-- A close dated inside a period already closed is refused.
--
-- Why (found by a review of this stop, with a reproduction): close_period replays a close
-- of the same day (the account's period ending then), but a day inside a period that was
-- closed on a later day matched no period: it recorded a close of its own, with no start,
-- and expired what was available now, that is the current period's allocation, dated back
-- into the closed period. A monthly plan of 100, October closed by the roll on 10-31,
-- November open: close_period(10-30), an end off by one day (a local-time end, say),
-- expired November's 100 and wrote an expiration at 10-30 23:59:59.999999, after October's
-- own close had expired 100. reconcile() stays empty: the sums agree, the periods do not.
--
-- Now such a close is refused, MT001 naming period_end, before anything is written. A
-- close of a day that a recorded period begins after (the next period opened ahead, up
-- to a day; a day between periods, or before the first) counts what stood at the end of
-- that day, as the roll's closes do, the rows dated after it left out: at call time it
-- counted the later period's allocation as unused and expired it (found by the second,
-- third and fourth reviews: close_period(09-30) before periods that began on 10-01
-- expired November's allocation; closing today after tomorrow's period was opened ahead
-- expired tomorrow's). A hold active at the call is counted as held at the end, for a
-- close before its day is over. A close of the last day of a recorded period replays as
-- before; a close with no later period (the usual close of the period just ended) counts
-- what is available at the call, as before.
--
-- Locks: unchanged (024). Migrations once applied are never edited: 038's _close_period
-- is replaced whole; only the lines marked 041 changed.

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
    v_limit numeric;
    v_later numeric := p_later;  -- 041: or this close's own sum, in a gap (below)
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
    -- 041: a day inside a period already closed on a later day is no period's end: closing
    -- there would expire what the current period holds, dated back into the closed one
    SELECT * INTO v_period FROM meter.periods p
    WHERE p.namespace = p_namespace AND p.account_id = v_acc.account_id
      AND p.period_start <= p_period_end AND p.period_end > p_period_end
    ORDER BY p.period_start DESC LIMIT 1;
    IF FOUND THEN
        PERFORM meter._fail('MT001', 'period_end',
            format('%s falls inside the period %s to %s, closed already: close a period on '
                   'its last day (replayed) or after it', p_period_end,
                   v_period.period_start, v_period.period_end));
    END IF;
    -- 041: a day that a recorded period begins after (the next period opened ahead, a
    -- gap between periods, a day before the first): at call time the balance holds that
    -- later period's units, which the close would count as unused. It counts what stood
    -- at the end of the day instead, as the roll's closes do: less what is dated after it
    IF p_later IS NULL
       AND EXISTS (SELECT 1 FROM meter.periods p
                   WHERE p.namespace = p_namespace AND p.account_id = v_acc.account_id
                     AND p.period_start > p_period_end) THEN
        SELECT coalesce(sum(l.amount), 0) INTO v_later FROM meter.ledger l
        WHERE l.namespace = p_namespace AND l.account_id = v_acc.account_id
          AND l.event_time > v_time;
    END IF;
    -- Holds past their TTL reserve nothing any more: expire them (SKIP LOCKED, so taking
    -- them after the account waits on nothing), or their amount would survive the close.
    IF meter._expire_due(p_namespace, p_user_id, p_event_type, v_resource, p_unit, NULL) THEN
        v_acc := meter._lock_account(p_namespace, p_user_id, p_event_type, v_resource, p_unit);
    END IF;

    -- 038: the carry-over limit of the configuration the period was opened under: the
    -- latest change of a start no later than the period's (a change set ahead, for a
    -- later start, applies from that start on); none recorded, the account's.
    SELECT c.carry_over_limit INTO v_limit FROM meter.period_config_changes c
    WHERE c.namespace = p_namespace AND c.account_id = v_acc.account_id
      AND c.period_start <= (SELECT q.period_start FROM meter.periods q
                             WHERE q.namespace = p_namespace
                               AND q.account_id = v_acc.account_id
                               AND q.period_end IS NULL AND q.period_start <= p_period_end
                             ORDER BY q.period_start DESC LIMIT 1)
    ORDER BY c.change_id DESC LIMIT 1;
    IF NOT FOUND THEN
        v_limit := v_acc.carry_over_limit;
    END IF;

    v_available := v_acc.balance - v_acc.reserved;
    IF v_later IS NOT NULL THEN
        -- What the period left unused at its end, by the ledger's event times: the balance
        -- without what is dated after the end (p_later, the caller's sum), less what the
        -- holds made by then still held at the end: not past their TTL, and not committed,
        -- released or expired yet (a TTL is at most 86400 s, hence the bound on created_at;
        -- in seconds, since a day on a timestamptz follows the session's TimeZone).
        SELECT v_acc.balance - v_later - coalesce(sum(r.amount), 0) INTO v_available
        FROM meter.reservations r
        WHERE r.namespace = p_namespace AND r.account_id = v_acc.account_id
          AND r.created_at > v_time - interval '86400 seconds' AND r.created_at <= v_time
          AND (r.expires_at > v_time
               -- 041: a close before its day ends: a hold active now is held
               OR (r.status = 'active' AND r.expires_at > now()))
          AND (r.completed_at IS NULL OR r.completed_at > v_time);
    END IF;
    v_balance := v_acc.balance;
    IF v_available > 0 THEN
        v_carry := CASE WHEN v_limit IS NULL THEN v_available  -- 038: v_limit
                        ELSE least(v_available, v_limit) END;
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
    IF v_later IS NOT NULL THEN
        v_balance := v_balance - v_later;  -- recorded as it stood at the end, after the close
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
