-- A start moved back during a roll no longer deadlocks it.
--
-- Why (the strict xfail of the last note, now passing: test_races.py
-- test_a_start_moved_back_during_a_roll_never_deadlocks_it): roll_periods decides, before
-- its first account, whether a step may make a month (055: then it takes the ledger's
-- partition lock first), from the starts its candidate query read. A set_period_config
-- committed while the roll waited for an account moved another candidate's start back
-- into a month with no partition; the roll came to it holding the accounts rolled before,
-- and its step waited for the ledger's partition lock to make that month, held by a
-- writer that had made a month and then waited for one of those accounts (40P01).
--
-- Now, when the roll took no partition lock at its start, it locks each candidate's
-- account (the step locks it next anyway, in the same key order) and reads its start
-- again under that lock; when a month its steps may date is missing, it takes the
-- partition lock without waiting (NOWAIT), or, held by another, ends the roll there: the
-- next roll sees the missing month and takes the lock before its first account (the beat
-- runs it every 60 s). Read without the account's lock (this migration's first version,
-- found by a review, reproduced: test_races.py
-- test_a_start_moved_back_during_a_roll_never_deadlocks_it[while_the_roll_waits_for_it]), a
-- set_period_config not yet committed when the roll came to the account still showed
-- the old start; the step waited for the account, then read the new start and made its
-- month under the accounts rolled before (40P01 again, for the whole length of the
-- configuration's transaction). A step that fails now leaves its account locked to the
-- roll's end (its subtransaction no longer took that lock first).
-- The test of a missing month moved to meter._ledger_months_missing, used by both checks;
-- the re-read is meter._lock_roll_earliest (set_period_config's catch-up uses it too, 065).
-- roll_periods is otherwise 060's (lines marked 064 changed). Lock order: (19782, 1),
-- then, before the first account when a month is missing, the ledger's SHARE UPDATE
-- EXCLUSIVE; per candidate its account, then (never waiting) that lock, then the step's
-- months (under it) and the account again.

-- Whether a ledger month from p_from's month to p_today's (none before 1900) has no
-- partition.
CREATE FUNCTION meter._ledger_months_missing(p_from date, p_today date) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT EXISTS (SELECT 1
                   FROM generate_series(date_trunc('month',
                                                   greatest(p_from, date '1900-01-01')::timestamp),
                                        p_today::timestamp, interval '1 month') m(month)
                   WHERE to_regclass(format('meter.ledger_%s',
                                            to_char(m.month, 'YYYY_MM'))) IS NULL)
$$;
REVOKE EXECUTE ON FUNCTION meter._ledger_months_missing(date, date) FROM PUBLIC;

-- The day before the earliest day a roll of the account may date a row in (060's count,
-- as roll_periods' candidate query makes it: the configured start, or the latest period
-- opened when one ends on or after it, where 042's case 0 moves back), read under the
-- account's row lock, which it takes (and holds to the end of the transaction).
CREATE FUNCTION meter._lock_roll_earliest(p_namespace text, p_account_id bigint) RETURNS date
LANGUAGE sql AS $$
    SELECT least(a.period_start,
                 coalesce((SELECT max(p.period_start) FROM meter.periods p
                           WHERE p.namespace = a.namespace
                             AND p.account_id = a.account_id
                             AND p.opened_at IS NOT NULL
                           HAVING bool_or(p.period_end >= a.period_start)),
                          a.period_start)) - 1
    FROM meter.accounts a
    WHERE a.namespace = p_namespace AND a.account_id = p_account_id
    FOR UPDATE OF a
$$;
REVOKE EXECUTE ON FUNCTION meter._lock_roll_earliest(text, bigint) FROM PUBLIC;

-- roll_periods (060's; the lines marked 064 changed)
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
    v_ledger_locked boolean := false;  -- 064: the ledger's partition lock is held
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
            IF meter._ledger_months_missing(v_cand.earliest, v_today) THEN              -- 064
                LOCK TABLE ONLY meter.ledger IN SHARE UPDATE EXCLUSIVE MODE;            -- 055
                v_ledger_locked := true;                                                -- 064
            END IF;                                                                     -- 055
            v_months_locked := true;                                                    -- 055
        END IF;                                                                         -- 064
        IF NOT v_ledger_locked THEN                                                     -- 064
            -- 064: a start moved back (set_period_config) since the candidates were
            -- read, under accounts this roll holds: its step would wait for the
            -- ledger's partition lock to make a month, while a writer holding that lock
            -- waits for one of them. Read the start again; when a month is missing, take
            -- the lock only if it is free, and otherwise end the roll here (the next one
            -- takes it before its first account).
            -- 064: under the account's lock, which the step takes next anyway: read
            -- without it, a configuration not committed yet showed the old start, and
            -- the step, waiting for the account, then read the new one
            IF meter._ledger_months_missing(                                            -- 064
                   meter._lock_roll_earliest(v_cand.namespace, v_cand.account_id),
                   v_today) THEN
                BEGIN
                    LOCK TABLE ONLY meter.ledger IN SHARE UPDATE EXCLUSIVE MODE NOWAIT;
                    v_ledger_locked := true;
                EXCEPTION WHEN lock_not_available THEN
                    EXIT;
                END;
            END IF;                                                                     -- 064
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

