-- The period roll counts only the months its steps may date rows in, not every month an
-- account's history ever spanned.
--
-- Why (found by a review of 055, reproduced: test_races.py
-- test_a_roll_making_no_month_holds_no_partition_lock_for_months_retention_dropped): 055's
-- roll takes the ledger's partition lock (SHARE UPDATE EXCLUSIVE, to its end) before its
-- first account when a month its steps may date rows in has no partition, and not
-- otherwise, so that a caller's transaction that holds an account and then makes a month
-- does not wait for a roll that makes none while the roll waits for that account. But it
-- counted those months from the earliest period the candidate ever had (the minimum over
-- all its periods), and retention drops those months (036 keeps only what the roll still
-- needs: from its next start on). Once an account's periods went back further than the
-- retention window, every roll with that account due took the lock at its start: every
-- writer making a month (a backdated event, a month made ahead) waited for the whole roll,
-- and a caller's transaction holding the account then making a month deadlocked with it
-- (40P01; the roll, the victim, retried whole).
--
-- Now the earliest day is that of the step 042's _roll_account may begin from: the
-- candidate's configured start, or the latest period opened when that is earlier (case 0:
-- a configured start inside recorded periods moves back to it, never further), less a day
-- (the day before a step's start, case 1). Every step goes forward from there. What the
-- steps date is unchanged, and so is the lock order (055's).
--
-- And the latest period opened counts only where the roll moves back to it (found by a
-- review of the above, reproduced: test_races.py
-- test_a_roll_opening_a_new_plan_after_an_old_history_holds_no_partition_lock): the
-- above counts the months its steps may date rows in (for 055's ledger lock before its
-- first account) from the day before the configured start, or before the latest period
-- opened when that is earlier. But the roll moves back to that period only in 042's case 0:
-- the configured start lies inside recorded periods (one closed on or after it, or one
-- opened after it, and then the latest opened is not earlier). A configured start after
-- every recorded period (a plan change, or a plan set again after a lapse) is case 1: the
-- roll closes the period still running at the day before the start and opens the start,
-- and dates nothing earlier. Counted from the earlier period (a year back for yearly
-- periods, years back after a lapse), months retention had dropped took the lock at the
-- roll that made no month, and a caller's transaction that held the account and then
-- made a month deadlocked with it (40P01, the case 055 meant to spare).
--
-- Now the latest period opened counts only when an opened period ends on or after the
-- configured start (then case 0 may move back to it); otherwise the day before the
-- configured start, where case 1 dates its close. Every step goes forward from there, as
-- above; what the steps date and the lock order (055's) are unchanged.
--
-- Migrations once applied are never edited: 055's roll_periods is replaced whole; only
-- the lines marked 060 changed.

-- roll_periods (055's; the lines marked 060 changed)
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
    v_months_locked boolean := false;  -- 055
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
        SELECT a.namespace, a.account_id, a.user_id, a.event_type, a.resource, a.unit,
               -- 055: the earliest day any candidate's steps may date a row from (its
               -- configured start, or an earlier period it may move back to), less a day
               -- 060: the latest period opened (case 0 moves back to it, no further),
               -- not the earliest period ever: retention drops the months of a history
               -- no step dates a row in again, and counting them took the lock at
               -- every roll
               -- 060: and only when one opened ends on or after the start (case 0 may
               -- move back then): a start after them all is case 1, which dates its
               -- close the day before the start and nothing earlier
               min(least(a.period_start,
                         coalesce((SELECT max(p.period_start) FROM meter.periods p     -- 060
                                   WHERE p.namespace = a.namespace
                                     AND p.account_id = a.account_id
                                     AND p.opened_at IS NOT NULL                        -- 060
                                   HAVING bool_or(p.period_end >= a.period_start)),     -- 060
                                  a.period_start)))                                     -- 060
                   OVER () - 1 AS earliest                                              -- 055
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
        -- 055: before the first account, when a step may make a month (one from the
        -- earliest day a candidate may date a row to today has no partition), the
        -- ledger's partition lock, which making a month takes (ATTACH) and holds to the
        -- end: made under the accounts rolled before, it deadlocked with a writer that
        -- had made a month and then waited for one of them. Taken here, such a writer
        -- waits for the roll before its month, holding no account. Not taken when every
        -- month exists (as a rule): a caller's transaction that holds an account and
        -- then makes a month would wait for it while the roll waits for that account
        IF NOT v_months_locked THEN                                                     -- 055
            IF EXISTS (SELECT 1
                       FROM generate_series(date_trunc('month',
                                                       greatest(v_cand.earliest,
                                                                date '1900-01-01')::timestamp),
                                            v_today::timestamp, interval '1 month') m(month)
                       WHERE to_regclass(format('meter.ledger_%s',
                                                to_char(m.month, 'YYYY_MM'))) IS NULL) THEN
                LOCK TABLE ONLY meter.ledger IN SHARE UPDATE EXCLUSIVE MODE;            -- 055
            END IF;                                                                     -- 055
            v_months_locked := true;                                                    -- 055
        END IF;                                                                         -- 055
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

