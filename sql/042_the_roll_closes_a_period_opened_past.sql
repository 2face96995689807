-- The roll closes a period still running when the next one was opened before the roll.
--
-- Why (found by a review of this stop, two reproductions, each with a control run that
-- differs only by the call by hand):
-- 1. A plan change set for the next start (pending), then that period opened by hand a few
--    hours ahead of its day (open_period allows 24 hours ahead, and leaves the period
--    before to the roll, as it has not ended yet). The account's configured start was the
--    opened period, so the roll saw a current period that had not ended and did nothing:
--    the period before never closed, and its unused units (70, limit 0) ran on into the
--    new one (balance 270 where the control has 200).
-- 2. The roll behind, a plan change from the due next start not opened yet, and today's
--    period opened by hand (037: past the roll's limit, so left to it). The roll took the
--    configured start for a rewind into recorded periods (case 0: a period opened after
--    it) and moved on to the period opened by hand: the period before never closed and
--    the plan change's period never opened (balance 270 against 200).
--
-- Now a period "still running before" the account's start (opened, not closed, starting
-- before it, no close recorded after it began: meter._running_before) is what the roll looks at
-- first. Case 0 applies only when there is none (a start inside closed periods, or before
-- them); otherwise case 1 closes it the day before the configured start and opens that
-- start. And when the configured start was opened already, the roll closes it the day
-- before, keeping the period opened (the step's "opened by hand already" path). A period
-- opened after a later one was closed is still left alone (026's case: that close took its
-- units). roll_periods takes such accounts as candidates.
--
-- Not changed: drop_old_partitions (036) keeps the months a due roll needs by its copy of
-- roll_periods' earlier candidate test; an account in state 1 is due for at most a day, and
-- its close needs the months from the day before its configured start, within any
-- retention window of a month or more.
--
-- Cost: roll_periods tests every configured account for such a period at every run, on a
-- new partial index of open periods. A roll with nothing due over 20,000 configured
-- accounts of 13 periods each: 62 -> 80 ms (medians of 5, the two versions alternated
-- twice on one database); as a call of meter._running_before per account it was 173 ms.
--
-- Locks: unchanged (026). Migrations once applied are never edited: 026's _roll_account and
-- roll_periods are replaced whole; only the lines marked 042 changed.

-- Open periods (one per account, as a rule): what the roll's candidate test probes for
-- every configured account at every run.
CREATE INDEX periods_open ON meter.periods (namespace, account_id, period_start)
    WHERE period_end IS NULL AND opened_at IS NOT NULL;

-- The start of the latest period still running from before p_start: opened, not closed,
-- starting before p_start, and no close recorded on or after its start (a later period's,
-- whose close took its units (026), or one recorded without a start, or an earlier
-- period's closed after this one began: closing it at p_start - 1 would replay that close,
-- and the roll repeat the step; found by a review). NULL when there is none. roll_periods
-- writes the same test out.
CREATE FUNCTION meter._running_before(p_namespace text, p_account_id bigint, p_start date)
RETURNS date
LANGUAGE sql STABLE AS $$
    SELECT max(q.period_start) FROM meter.periods q
    WHERE q.namespace = p_namespace AND q.account_id = p_account_id
      AND q.period_end IS NULL AND q.opened_at IS NOT NULL AND q.period_start < p_start
      AND NOT EXISTS (SELECT 1 FROM meter.periods p
                      WHERE p.namespace = p_namespace AND p.account_id = p_account_id
                        AND p.period_end IS NOT NULL
                        AND (p.period_start > q.period_start
                             OR p.period_end >= q.period_start))
$$;
REVOKE EXECUTE ON FUNCTION meter._running_before(text, bigint, date) FROM PUBLIC;

-- One account's roll (026's; the lines marked 042 are new): steps until
-- its current period has not ended by p_today, p_budget steps were taken, or a step failed
-- (reported with status 'error', the account left for the next call). Each step is a
-- subtransaction. Locks: per step, the months it dates rows in, then the account (held to
-- commit), and it decides on what it reads under that lock. The caller sets the actor.
CREATE OR REPLACE FUNCTION meter._roll_account(p_namespace text, p_account_id bigint, p_today date,
                                    p_budget integer)
RETURNS TABLE (namespace text, user_id text, event_type text, resource text, unit text,
               status text, closed_period_end date, expired numeric, carried_over numeric,
               opened_period_start date, allocation numeric, balance numeric, error text)
LANGUAGE plpgsql AS $$
DECLARE
    v_cand meter.accounts;
    v_steps integer := 0;
    v_start date;
    v_month date;
    v_acc meter.accounts;
    v_next date;
    v_close record;
    v_prior meter.periods;
    v_done boolean;
    v_again boolean;
    v_later numeric;
    v_end timestamptz;
    v_close_end timestamptz;
    v_close_to date;
    v_move_to date;
    v_opened boolean;
    v_current_end date;
    v_posted numeric;
BEGIN
    SELECT * INTO v_cand FROM meter.accounts a
    WHERE a.namespace = p_namespace AND a.account_id = p_account_id;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    v_later := NULL;
    LOOP
        EXIT WHEN v_steps >= p_budget;
        v_done := false;
        v_again := false;
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
            -- day, of the day before it (case 1 below) and of the next period's first
            -- day, as read without the lock. Should
            -- the locked figures differ (a concurrent set_period_config), open/close
            -- create what is missing themselves.
            SELECT a.period_start,
                   meter._next_period_start(a.namespace, a.account_id, a.period_start,
                                            a.period_interval)
            INTO v_start, v_next FROM meter.accounts a
            WHERE a.namespace = v_cand.namespace AND a.account_id = v_cand.account_id;
            FOREACH v_month IN ARRAY ARRAY[v_start - 1, v_start, v_next - 1, v_next] LOOP
                -- (none before 1900: no row is dated there, and no period ends there)
                IF v_month <= p_today AND v_month >= date '1900-01-01' AND to_regclass(
                       format('meter.ledger_%s', to_char(v_month, 'YYYY_MM'))) IS NULL THEN
                    PERFORM meter.create_partition(extract(year FROM v_month)::integer,
                                                   extract(month FROM v_month)::integer);
                END IF;
            END LOOP;
            SELECT * INTO v_acc FROM meter.accounts a
            WHERE a.namespace = v_cand.namespace AND a.account_id = v_cand.account_id
            FOR UPDATE;
            v_close_to := NULL;  -- the last day of the period this step closes
            v_move_to := NULL;   -- where the roll moves on writing nothing (not a step)
            SELECT p.opened_at IS NOT NULL, p.period_end INTO v_opened, v_current_end
            FROM meter.periods p
            WHERE p.namespace = v_acc.namespace AND p.account_id = v_acc.account_id
              AND p.period_start = v_acc.period_start;
            IF v_acc.period_allocation IS NULL OR v_acc.period_interval IS NULL
               OR v_acc.period_start > p_today THEN
                v_done := true;
            ELSIF NOT coalesce(v_opened, false) THEN
                IF EXISTS (SELECT 1 FROM meter.periods p
                           WHERE p.namespace = v_acc.namespace
                             AND p.account_id = v_acc.account_id
                             AND p.opened_at IS NOT NULL
                             AND (p.period_start > v_acc.period_start
                                  OR p.period_end >= v_acc.period_start))
                   -- 042: not while a period from before the start still runs (a later
                   -- one opened by hand, left to the roll): that is case 1
                   AND meter._running_before(v_acc.namespace, v_acc.account_id,
                                             v_acc.period_start) IS NULL THEN
                    -- 0. the configured start lies inside recorded periods (a rewind to
                    --    a day no period started on): what is recorded wins. The latest
                    --    period opened is current again, and the roll goes on from it;
                    --    opening the configured start would grant its days twice.
                    SELECT max(p.period_start) INTO v_move_to FROM meter.periods p
                    WHERE p.namespace = v_acc.namespace
                      AND p.account_id = v_acc.account_id AND p.opened_at IS NOT NULL;
                ELSE
                    -- 1. the configured period was never opened: open it. A period
                    --    still open from before it (the configuration moved the start
                    --    on) ends the day before, and is closed first: its unused units
                    --    would otherwise run on into the new period past the carry-over
                    --    limit.
                    v_next := v_acc.period_start;
                    SELECT v_next - 1 INTO v_close_to FROM meter.periods p
                    WHERE p.namespace = v_acc.namespace
                      AND p.account_id = v_acc.account_id
                      AND p.opened_at IS NOT NULL AND p.period_end IS NULL
                      AND p.period_start < v_next
                    LIMIT 1;
                END IF;
            ELSIF meter._running_before(v_acc.namespace, v_acc.account_id,
                                        v_acc.period_start) IS NOT NULL THEN
                -- 042: the current period was opened ahead of its day (or by hand past
                -- the roll) while the one before it still ran: now that it has begun, the
                -- one before ends the day before it; the current one is kept (below)
                v_next := v_acc.period_start;
                v_close_to := v_next - 1;
            ELSE
                -- 2. the current period has ended: close it, open the next
                v_next := meter._next_period_start(v_acc.namespace, v_acc.account_id,
                                                   v_acc.period_start,
                                                   v_acc.period_interval);
                IF v_next > p_today THEN
                    v_done := true;
                ELSIF v_current_end IS NULL
                      AND EXISTS (SELECT 1 FROM meter.periods p
                                  WHERE p.namespace = v_acc.namespace
                                    AND p.account_id = v_acc.account_id
                                    AND p.period_start > v_acc.period_start
                                    AND p.period_end IS NOT NULL) THEN
                    -- Never closed, but a later period was: it was opened by hand while
                    -- this one ran, and its close took this one's units. Closing this
                    -- one now would expire them twice, and opening the periods between
                    -- would grant days nobody opened: move on to the earliest period
                    -- opened after it.
                    SELECT min(p.period_start) INTO v_move_to FROM meter.periods p
                    WHERE p.namespace = v_acc.namespace
                      AND p.account_id = v_acc.account_id
                      AND p.period_start > v_acc.period_start AND p.opened_at IS NOT NULL;
                ELSIF v_current_end IS NOT NULL
                      AND EXISTS (SELECT 1 FROM meter.periods p
                                  WHERE p.namespace = v_acc.namespace
                                    AND p.account_id = v_acc.account_id
                                    AND p.period_start = v_next
                                    AND p.opened_at IS NOT NULL) THEN
                    -- a walk through recorded periods (a start stored before 024): this
                    -- one was closed and the next is open
                    v_move_to := v_next;
                ELSE
                    v_close_to := v_next - 1;
                END IF;
            END IF;
            IF v_move_to IS NOT NULL THEN
                -- nothing to write but the current start: not a step, not reported
                UPDATE meter.accounts a SET period_start = v_move_to, updated_at = now()
                WHERE a.namespace = v_acc.namespace AND a.account_id = v_acc.account_id;
                v_again := true;
            ELSIF NOT v_done THEN
                status := CASE WHEN v_close_to IS NULL AND v_next = v_acc.period_start
                               THEN 'opened' ELSE 'rolled' END;
                IF v_close_to IS NOT NULL THEN
                    -- The sum of the ledger dated after this period's end. Summed in
                    -- full once per account and call; for each later step, less the
                    -- rows dated between the two ends, but for the allocation the last
                    -- step posted there. So a catch-up reads each row once, not once
                    -- per period. Only this call writes the account's rows meanwhile
                    -- (it holds the account), and its close rows are dated at an end,
                    -- never after it.
                    v_close_end := (v_close_to + 1)::timestamp AT TIME ZONE 'UTC'
                                   - interval '1 microsecond';
                    IF v_later IS NULL THEN
                        SELECT coalesce(sum(l.amount), 0) INTO v_later FROM meter.ledger l
                        WHERE l.namespace = v_acc.namespace
                          AND l.account_id = v_acc.account_id
                          AND l.event_time > v_close_end;
                    ELSE
                        v_later := v_later + v_posted
                            - (SELECT coalesce(sum(l.amount), 0) FROM meter.ledger l
                               WHERE l.namespace = v_acc.namespace
                                 AND l.account_id = v_acc.account_id
                                 AND l.event_time > v_end
                                 AND l.event_time <= v_close_end);
                    END IF;
                    v_end := v_close_end;
                    SELECT * INTO v_close
                    FROM meter._close_period(v_acc.user_id, v_acc.event_type,
                                             v_acc.unit, v_acc.resource, v_close_to,
                                             v_acc.namespace, v_later);
                    closed_period_end := v_close_to;
                    expired := v_close.expired;
                    carried_over := v_close.carried_over;
                END IF;
                v_posted := 0;
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
                    v_posted := v_acc.period_allocation;  -- dated at v_next
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
        CONTINUE WHEN v_again;  -- not a step: nothing was written but the current start
        v_steps := v_steps + 1;
        RETURN NEXT;
    END LOOP;
END
$$;
REVOKE EXECUTE ON FUNCTION meter._roll_account(text, bigint, date, integer) FROM PUBLIC;

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
    v_cand record;
    v_step record;
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
          AND (NOT EXISTS (SELECT 1 FROM meter.periods p
                           WHERE p.namespace = a.namespace AND p.account_id = a.account_id
                             AND p.period_start = a.period_start
                             AND p.opened_at IS NOT NULL)
               -- the next start is start + interval or later, but for recorded periods
               -- (the current one closed, or a later one opened); only those accounts
               -- need the exact (plpgsql) figure, and no account is locked unless due
               -- 042: a period from before the current start still runs (the current
               -- one opened ahead of its day, or by hand past the roll):
               -- meter._running_before written out, on the index of open periods (a call
               -- per account cost a roll with nothing due 2.7 times its time)
               OR EXISTS (SELECT 1 FROM meter.periods q
                          WHERE q.namespace = a.namespace AND q.account_id = a.account_id
                            AND q.period_end IS NULL AND q.opened_at IS NOT NULL
                            AND q.period_start < a.period_start
                            AND NOT EXISTS (SELECT 1 FROM meter.periods p
                                            WHERE p.namespace = a.namespace
                                              AND p.account_id = a.account_id
                                              AND p.period_end IS NOT NULL
                                              AND (p.period_start > q.period_start
                                                   OR p.period_end >= q.period_start)))
               OR ((CASE WHEN a.period_interval < interval '1000 years'  -- no overflow
                         THEN (a.period_start + a.period_interval)::date <= v_today
                         ELSE false END
                    OR EXISTS (SELECT 1 FROM meter.periods p
                               WHERE p.namespace = a.namespace
                                 AND p.account_id = a.account_id
                                 AND p.period_start >= a.period_start
                                 AND (p.period_start > a.period_start
                                      OR p.period_end IS NOT NULL)))
                   AND meter._next_period_start(a.namespace, a.account_id, a.period_start,
                                                a.period_interval) <= v_today))
        ORDER BY a.namespace, coalesce(a.user_id, ''), a.event_type, a.resource, a.unit
    LOOP
        EXIT WHEN v_steps >= p_batch_size;
        FOR v_step IN
            SELECT * FROM meter._roll_account(v_cand.namespace, v_cand.account_id, v_today,
                                              p_batch_size - v_steps)
        LOOP
            namespace := v_step.namespace; user_id := v_step.user_id;
            event_type := v_step.event_type; resource := v_step.resource; unit := v_step.unit;
            status := v_step.status; closed_period_end := v_step.closed_period_end;
            expired := v_step.expired; carried_over := v_step.carried_over;
            opened_period_start := v_step.opened_period_start;
            allocation := v_step.allocation; balance := v_step.balance; error := v_step.error;
            RETURN NEXT;
            -- a failed step is not counted: accounts that fail at every call must not use
            -- up the batch of the ones after them
            IF v_step.status <> 'error' THEN
                v_steps := v_steps + 1;
            END IF;
        END LOOP;
    END LOOP;

    IF coalesce(v_actor, '') = '' THEN
        PERFORM set_config('meter.actor_id', coalesce(v_actor, ''), true);
    END IF;
END
$$;
