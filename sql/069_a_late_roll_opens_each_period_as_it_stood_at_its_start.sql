-- A late roll records each period's opening balance as it stood at the period's start.
--
-- Why (found by a review, reproduced): a period's open_balance (get_periods, "opened at"
-- in `meter periods show`) and the roll's step `balance` were the account's balance when
-- the roll ran, after the allocation. Rolled on time that is the balance at the start; a
-- roll that catches up (beat down, or set_period_config's catch-up, 026/065) ran months
-- later, and recorded every period it opened with the usage of the periods after it
-- included: 1000 a month, 300 carried, 850 used in the second month, and that month opened
-- at 450 instead of 1300. Even on time, usage dated between the start and the roll's run
-- (beat runs every 60 s; a write dated at the start's first instant) was counted. Units
-- were right (no row changed); the recorded history was not. 024 made close_balance "as it
-- stood at the end"; open_balance was left as it stood at the roll.
--
-- Now meter._roll_account records, for a period it opens, the balance at its start: what
-- open_period returns less the ledger dated on or after the start (the allocation it just
-- posted aside, read before it). After a close that is the close's p_later, the sum the
-- roll keeps already (a close's rows are dated at the microsecond before the start);
-- otherwise one sum is read. The step reports the same figure. For a period opened by hand
-- already (kept), the step reports the balance at the start likewise (its allocation
-- included); its open_balance stays what that open_period recorded.
--
-- What "at the start" means: by the ledger as recorded when the roll opens the period. A
-- row dated before the start but recorded after the roll (a backdated write) changes the
-- balance, not the recorded open_balance, as it leaves close_balance alone; a later roll
-- would include it. So a late roll equals an on-time one whenever every row dated before a
-- start was recorded before the on-time roll of that start; it no longer matters when
-- the rows dated after the start arrived.
--
-- Not changed, on purpose: open_period called by hand records the balance at the call, as
-- SPEC 3.4 and Appendix A have it return it ("new balance"; a repeat returns the first
-- result, which is the recorded figure), and close_period by hand what it returns (the
-- balance at the call, or as it stood at the end when a later period is recorded: 041).
-- set_period_config's catch-up rolls through meter._roll_account, so it records the
-- start's balance now too.
--
-- Locks: unchanged (042's _roll_account; 064/065 call it). Migrations once applied are
-- never edited: 042's _roll_account is replaced whole; only the lines marked 069 changed.

-- One account's roll (042's; the lines marked 069 are new): steps until
-- its current period has not ended by p_today, p_budget steps were taken, or a step failed
-- (reported with status 'error', the account left for the next call). Each step is a
-- subtransaction. Each period it closes is recorded as it stood at its end (024), and each
-- period it opens or keeps with the balance as it stood at its start, its allocation
-- included (069): the step's balance and the opened period's open_balance leave out what
-- is dated on or after the start, so a roll that catches up records what an on-time roll
-- records. Locks: per step, the months it dates rows in, then the account (held to
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
    v_from_start numeric;  -- 069: the ledger dated on or after the opened period's start
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
                -- 069: what is dated on or after the start (a close's rows are dated
                -- before it): the sum after the close's end when this step closed (its
                -- end is the microsecond before the start), else read now
                IF v_close_to IS NOT NULL THEN                                      -- 069
                    v_from_start := v_later;                                        -- 069
                ELSE                                                                -- 069
                    SELECT coalesce(sum(l.amount), 0) INTO v_from_start             -- 069
                    FROM meter.ledger l                                             -- 069
                    WHERE l.namespace = v_acc.namespace                             -- 069
                      AND l.account_id = v_acc.account_id                           -- 069
                      AND l.event_time >= v_next::timestamp AT TIME ZONE 'UTC';     -- 069
                END IF;                                                             -- 069
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
                    -- 069: as it stood at the start, with the allocation posted there by
                    -- hand (none when it was 0); the period's open_balance stays what
                    -- open_period recorded (a repeat of that call returns it)
                    balance := balance - v_from_start + v_prior.allocation;         -- 069
                ELSE
                    allocation := v_acc.period_allocation;
                    balance := meter.open_period(v_acc.user_id, v_acc.event_type,
                                                 v_acc.unit, v_acc.resource, v_next,
                                                 NULL, v_acc.namespace)
                               - v_from_start;  -- 069: as it stood at the start
                    -- 069: open_period recorded the balance now, later usage included
                    UPDATE meter.periods p SET open_balance = balance               -- 069
                    WHERE p.namespace = v_acc.namespace                             -- 069
                      AND p.account_id = v_acc.account_id                           -- 069
                      AND p.period_start = v_next AND p.opened_at IS NOT NULL;      -- 069
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
