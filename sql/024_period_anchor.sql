-- Monthly periods keep the day they were configured on.
--
-- Why: roll_periods started each period at the previous start plus the interval. A month
-- is cut short where the next month has fewer days, and the cut stuck: configured on
-- Jan 31, periods began on Feb 28, then Mar 28, Apr 28 and the 28th ever after, so every
-- period from March on began up to three days early. A billing user expects the anchor
-- to hold (Jan 31, Feb 28, Mar 31, Apr 30), as a subscription's billing day does.
--
-- Now the next start is computed from the account's latest configuration (its
-- period_start, the anchor, in meter.period_config_changes) plus a whole number of
-- intervals, not from the previous period. Only a start on the last day of its month can
-- differ, so only such a start looks the configuration up (by the new index). A current
-- period that is off that grid, because it was opened by hand on another day, is followed
-- as before by its start plus the interval. Day intervals never cut, so they are unchanged.
--
-- Accounts configured before this migration follow the grid from their next period on;
-- one that already slid (to Mar 28, say) is off the grid and keeps its day: the
-- migration does not move anyone's billing day.
-- Migrations once applied are never edited, so roll_periods is replaced whole; only the
-- two places that compute the next start changed (and a comment on its candidate filter).

CREATE INDEX period_config_changes_account
    ON meter.period_config_changes (namespace, account_id, change_id);

-- The first day of the period after the one starting p_start, for an account whose
-- periods last p_interval (whole days or whole months, meter._period_interval).
CREATE FUNCTION meter._next_period_start(p_namespace text, p_account_id bigint,
                                         p_start date, p_interval interval)
RETURNS date
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_naive date := (p_start + p_interval)::date;
    v_step integer := (extract(year FROM p_interval) * 12 + extract(month FROM p_interval))::integer;
    v_anchor date;
    v_interval interval;
    v_months integer;
BEGIN
    -- Adding months cuts a day only past a shorter month's end, so a start that is not the
    -- last day of its month was not cut, and start + interval is on the grid already.
    IF v_step = 0 OR p_start <> (date_trunc('month', p_start) + interval '1 month - 1 day')::date THEN
        RETURN v_naive;
    END IF;
    SELECT c.period_start, c.period_interval INTO v_anchor, v_interval
    FROM meter.period_config_changes c
    WHERE c.namespace = p_namespace AND c.account_id = p_account_id
    ORDER BY c.change_id DESC LIMIT 1;
    IF v_anchor IS NULL OR v_interval::text <> p_interval::text OR v_anchor > p_start
       OR extract(day FROM v_anchor) <= extract(day FROM p_start) THEN
        RETURN v_naive;  -- no anchor, or one whose day fits: nothing was cut
    END IF;
    v_months := (extract(year FROM p_start) * 12 + extract(month FROM p_start))::integer
                - (extract(year FROM v_anchor) * 12 + extract(month FROM v_anchor))::integer;
    IF v_months % v_step <> 0 OR (v_anchor + make_interval(months => v_months))::date <> p_start THEN
        RETURN v_naive;  -- off the grid: opened by hand on another day
    END IF;
    RETURN (v_anchor + make_interval(months => v_months + v_step))::date;
END
$$;
REVOKE EXECUTE ON FUNCTION meter._next_period_start(text, bigint, date, interval) FROM PUBLIC;

CREATE OR REPLACE FUNCTION meter.roll_periods(p_namespace text DEFAULT NULL,
                                   p_now timestamptz DEFAULT now(),
                                   p_batch_size integer DEFAULT 100)
RETURNS TABLE (namespace text, user_id text, event_type text, resource text, unit text,
               status text, closed_period_end date, expired numeric, carried_over numeric,
               opened_period_start date, allocation numeric, balance numeric, error text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_now timestamptz;
    v_today date;
    v_steps integer := 0;
    v_start date;
    v_month date;
    v_cand record;
    v_acc meter.accounts;
    v_next date;
    v_close record;
    v_prior meter.periods;
    v_done boolean;
    v_actor text := current_setting('meter.actor_id', true);
BEGIN
    IF p_namespace IS NULL THEN
        PERFORM meter._require_maintenance('rolling every namespace');
    ELSE
        PERFORM meter._guard(p_namespace);
    END IF;
    v_now := meter._now(p_now);
    IF p_batch_size IS NULL OR p_batch_size < 1 OR p_batch_size > 10000 THEN
        PERFORM meter._fail('MT001', 'batch_size', format('must be between 1 and 10000, got %s',
                                                          coalesce(p_batch_size::text, 'NULL')));
    END IF;
    v_today := (v_now AT TIME ZONE 'UTC')::date;

    PERFORM pg_advisory_xact_lock(19782, 1);

    IF coalesce(v_actor, '') = '' THEN
        PERFORM set_config('meter.actor_id', 'system:periods', true);
    END IF;

    FOR v_cand IN
        SELECT a.namespace, a.account_id, a.user_id, a.event_type, a.resource, a.unit
        FROM meter.accounts a
        WHERE a.period_allocation IS NOT NULL AND a.period_interval IS NOT NULL
          AND a.period_start <= v_today AND (p_namespace IS NULL OR a.namespace = p_namespace)
          -- start + interval is never later than the next start on the grid: a superset,
          -- and the step below finds the rest not due
          AND ((a.period_start + a.period_interval)::date <= v_today
               OR NOT EXISTS (SELECT 1 FROM meter.periods p
                              WHERE p.namespace = a.namespace AND p.account_id = a.account_id
                                AND p.period_start = a.period_start
                                AND p.opened_at IS NOT NULL))
        ORDER BY a.namespace, coalesce(a.user_id, ''), a.event_type, a.resource, a.unit
    LOOP
        EXIT WHEN v_steps >= p_batch_size;
        LOOP
            EXIT WHEN v_steps >= p_batch_size;
            v_done := false;
            namespace := v_cand.namespace; user_id := v_cand.user_id;
            event_type := v_cand.event_type; resource := v_cand.resource; unit := v_cand.unit;
            status := 'rolled'; error := NULL;
            closed_period_end := NULL; expired := NULL; carried_over := NULL;
            opened_period_start := NULL; allocation := NULL; balance := NULL;
            -- One step per subtransaction: a step that fails is undone alone (the account's
            -- earlier steps stand), reported, and the account left for the next call.
            BEGIN
                -- The partitions this step dates rows in, before the account is locked (as
                -- every writer does): the months of its current period's first and last
                -- day and of the next period's first day, as read without the lock. Should
                -- the locked figures differ (a concurrent set_period_config), open/close
                -- create what is missing themselves.
                SELECT a.period_start,
                       meter._next_period_start(a.namespace, a.account_id, a.period_start,
                                                a.period_interval)
                INTO v_start, v_next FROM meter.accounts a
                WHERE a.namespace = v_cand.namespace AND a.account_id = v_cand.account_id;
                FOREACH v_month IN ARRAY ARRAY[v_start, v_next - 1, v_next] LOOP
                    IF v_month <= v_today AND to_regclass(
                           format('meter.ledger_%s', to_char(v_month, 'YYYY_MM'))) IS NULL THEN
                        PERFORM meter.create_partition(extract(year FROM v_month)::integer,
                                                       extract(month FROM v_month)::integer);
                    END IF;
                END LOOP;
                SELECT * INTO v_acc FROM meter.accounts a
                WHERE a.namespace = v_cand.namespace AND a.account_id = v_cand.account_id
                FOR UPDATE;
                IF v_acc.period_allocation IS NULL OR v_acc.period_interval IS NULL
                   OR v_acc.period_start > v_today THEN
                    v_done := true;
                ELSIF NOT EXISTS (SELECT 1 FROM meter.periods p
                                  WHERE p.namespace = v_acc.namespace
                                    AND p.account_id = v_acc.account_id
                                    AND p.period_start = v_acc.period_start
                                    AND p.opened_at IS NOT NULL) THEN
                    -- 1. the current period was configured but never opened
                    status := 'opened';
                    opened_period_start := v_acc.period_start;
                    allocation := v_acc.period_allocation;
                    balance := meter.open_period(v_acc.user_id, v_acc.event_type, v_acc.unit,
                                                 v_acc.resource, v_acc.period_start, NULL,
                                                 v_acc.namespace);
                ELSE
                    -- 2. the current period has ended: close it, open the next
                    v_next := meter._next_period_start(v_acc.namespace, v_acc.account_id,
                                                       v_acc.period_start,
                                                       v_acc.period_interval);
                    IF v_next > v_today THEN
                        v_done := true;
                    ELSE
                        SELECT * INTO v_close
                        FROM meter.close_period(v_acc.user_id, v_acc.event_type, v_acc.unit,
                                                v_acc.resource, v_next - 1, v_acc.namespace);
                        closed_period_end := v_next - 1;
                        expired := v_close.expired;
                        carried_over := v_close.carried_over;
                        opened_period_start := v_next;
                        -- The next period opened by hand already: keep it (open_period with
                        -- the configured allocation would conflict with another one) and
                        -- make it the current period.
                        SELECT * INTO v_prior FROM meter.periods p
                        WHERE p.namespace = v_acc.namespace AND p.account_id = v_acc.account_id
                          AND p.period_start = v_next AND p.opened_at IS NOT NULL;
                        IF FOUND THEN
                            allocation := v_prior.allocation;
                            UPDATE meter.accounts a SET period_start = v_next, updated_at = now()
                            WHERE a.namespace = v_acc.namespace
                              AND a.account_id = v_acc.account_id
                            RETURNING a.balance INTO balance;
                        ELSE
                            allocation := v_acc.period_allocation;
                            balance := meter.open_period(v_acc.user_id, v_acc.event_type,
                                                         v_acc.unit, v_acc.resource, v_next,
                                                         NULL, v_acc.namespace);
                        END IF;
                    END IF;
                END IF;
            EXCEPTION WHEN OTHERS THEN
                -- Transient failures (deadlock, serialization, lock timeout, cancel, resources,
                -- connection) abort the call: the caller retries it. Anything else is this
                -- account's.
                IF left(SQLSTATE, 2) IN ('40', '53', '55', '57', '08', '58', 'XX') THEN
                    RAISE;
                END IF;
                status := 'error';
                closed_period_end := NULL; expired := NULL; carried_over := NULL;
                opened_period_start := NULL; allocation := NULL; balance := NULL;
                error := SQLSTATE || ' ' || SQLERRM;
                -- not counted as a step: accounts that fail at every call must not use up
                -- the batch of the ones after them
                RETURN NEXT;
                EXIT;
            END;
            EXIT WHEN v_done;
            v_steps := v_steps + 1;
            RETURN NEXT;
        END LOOP;
    END LOOP;

    IF coalesce(v_actor, '') = '' THEN
        PERFORM set_config('meter.actor_id', coalesce(v_actor, ''), true);
    END IF;
END
$$;
