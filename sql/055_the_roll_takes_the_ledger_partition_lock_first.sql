-- The period roll takes the ledger's partition lock before its first account.
--
-- Why (found by a review of the lock order, reproduced: test_races.py
-- test_the_period_roll_and_a_write_making_a_month_never_deadlock): roll_periods holds
-- every account it has rolled to its end, and a step makes the months it dates rows in
-- (meter.create_partition: ATTACH PARTITION, the ledger's SHARE UPDATE EXCLUSIVE lock,
-- held to the end of the transaction) before it locks its own account, but after the
-- accounts before it. A write dated in a month with no partition makes that month first
-- (the order every writer keeps: months, then accounts) and holds the same lock while it
-- waits for its account. With the roll holding account a and about to make a month for
-- account z, and a consume of a dated in 1999 holding that lock and waiting for a, each
-- waited for the other: 40P01, the victim the write or the whole roll (retried).
--
-- Now roll_periods, when one of the months its steps may date rows in has no partition
-- (from the day before the earliest start a candidate may roll from, to today), takes
-- the ledger's SHARE UPDATE EXCLUSIVE lock before its first account, so every month it
-- makes is made under a lock it holds already, and a writer making a month meanwhile
-- waits for the roll before it holds any account. Writes and reads pass that lock; only
-- the making of a month and a retention drop wait for the roll's commit (a drop waited
-- for any roll that had read the ledger already). When every such month exists (as a
-- rule, once partitions are made ahead and the roll keeps up), it takes no lock more than
-- before: a caller's transaction that holds an account and then makes a month would wait
-- for that lock while the roll waits for its account (test_beat_sql's catch-up in a
-- transaction holding the account). create_partition takes the ledger's lock before the
-- month's advisory lock (ATTACH took it after): a creator that waited for the roll
-- holding the month's advisory lock deadlocked with a roll making the same month.
-- Still open: a month made by a step outside that range (none known), and a caller's
-- transaction that makes a month while it holds an account a roll making months waits
-- for (as before, 026's header).
--
-- Lock order, where it changed: create_partition: the ledger's SHARE UPDATE EXCLUSIVE,
-- then (19781, yyyymm) [0x4D45], then the new table. roll_periods: (19782, 1) [0x4D46,
-- 1], then, with an account due and a month to make, the ledger's SHARE UPDATE
-- EXCLUSIVE, then per step the months (under that lock) and the account (accounts one
-- at a time in key order, each held to the end).
--
-- Corrections to earlier headers (landed migrations are never edited): close_period
-- (034's header: "holds past their TTL with SKIP LOCKED, then the account") takes the
-- month of its end first, then the account, then its due holds with SKIP LOCKED (040's
-- _expire_due, called holding the account: the account first since 040). allocate's and
-- adjust's "the key's advisory lock, then the account" (004, 017, 030) leave out what
-- 035 and 036 put between and before: the month (a past one: the ledger's ROW EXCLUSIVE
-- first), the key, the account's advisory lock (in a transaction with no row yet), the
-- account.
--
-- Migrations once applied are never edited: 021's create_partition and 042's
-- roll_periods are replaced whole; only the lines marked 055 are new.

-- create_partition (021's; the lines marked 055 are new)
CREATE OR REPLACE FUNCTION meter.create_partition(p_year integer, p_month integer) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_name text;
    v_from timestamptz;
BEGIN
    IF p_year IS NULL OR p_year < 1900 OR p_year > 9999 THEN
        PERFORM meter._fail('MT001', 'year', format('must be between 1900 and 9999, got %s',
                                                    coalesce(p_year::text, 'NULL')));
    END IF;
    IF p_month IS NULL OR p_month < 1 OR p_month > 12 THEN
        PERFORM meter._fail('MT001', 'month', format('must be between 1 and 12, got %s',
                                                     coalesce(p_month::text, 'NULL')));
    END IF;
    v_name := format('ledger_%s_%s', lpad(p_year::text, 4, '0'), lpad(p_month::text, 2, '0'));
    IF to_regclass('meter.' || v_name) IS NOT NULL THEN
        RETURN NULL;
    END IF;
    -- 055: the ledger's partition lock (ATTACH's, SHARE UPDATE EXCLUSIVE, held to the end
    -- of the transaction) before the month's advisory lock, not after it: a roll holds
    -- the ledger's lock from before its first account (below), and a creator that waited
    -- for it holding the month's advisory lock deadlocked with that roll making the month
    LOCK TABLE ONLY meter.ledger IN SHARE UPDATE EXCLUSIVE MODE;                        -- 055
    PERFORM pg_advisory_xact_lock(19781, p_year * 100 + p_month);
    IF to_regclass('meter.' || v_name) IS NOT NULL THEN
        RETURN NULL;
    END IF;
    v_from := make_timestamptz(p_year, p_month, 1, 0, 0, 0, 'UTC');
    BEGIN
        EXECUTE format('CREATE TABLE meter.%I (LIKE meter.ledger INCLUDING DEFAULTS '
                       'INCLUDING CONSTRAINTS)', v_name);
    EXCEPTION WHEN duplicate_table THEN
        RETURN NULL;  -- created by the caller we waited for (see above)
    END;
    -- Attached rather than created as PARTITION OF: that takes ACCESS EXCLUSIVE on the
    -- ledger until this transaction ends, blocking every writer meanwhile (and a writer
    -- holding an account this transaction then needs was a deadlock). ATTACH takes SHARE
    -- UPDATE EXCLUSIVE, which writers and readers pass; the table is empty, so its check
    -- of the bounds costs nothing, and the ledger's indexes, constraint and row trigger
    -- come to it as with PARTITION OF.
    EXECUTE format('ALTER TABLE meter.ledger ATTACH PARTITION meter.%I FOR VALUES FROM (%L) TO (%L)',
                   v_name, v_from, v_from + interval '1 month');
    EXECUTE format('CREATE TRIGGER ledger_no_truncate BEFORE TRUNCATE ON meter.%I '
                   'FOR EACH STATEMENT EXECUTE FUNCTION meter._refuse_change()', v_name);
    RETURN v_name;
END
$$;

-- roll_periods (042's; the lines marked 055 are new)
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
               min(least(a.period_start,
                         coalesce((SELECT min(p.period_start) FROM meter.periods p
                                   WHERE p.namespace = a.namespace
                                     AND p.account_id = a.account_id), a.period_start)))
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
