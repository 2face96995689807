-- set_period_config's catch-up takes the ledger's partition lock before the account when
-- a month its roll may date rows in is missing.
--
-- Why (reasoned by a review, reproduced: test_races.py
-- test_a_configuration_catching_up_the_roll_never_deadlocks_with_a_write_making_a_month):
-- the catch-up (026, 029) made the months of the periods' grid (each start and the day
-- before it, from the start by the shortest interval the account had) before the roll's
-- first step locked the account, and each step made what that missed before re-locking
-- the account; from the second step on, the account was held already (the first step's
-- row lock lasts to the end of the transaction). A step dating rows off that grid (after a
-- period opened by hand on another day, or by years where an earlier configuration had a
-- grid of 5 months) made its month holding the account, so waited for the ledger's SHARE
-- UPDATE EXCLUSIVE lock (create_partition's ATTACH) while a writer that had made a month
-- (holding that lock to its end) waited for the account: 40P01, the victim the
-- configuration or the write. With beat's roll waiting for the account too, the same cycle
-- ran through three.
--
-- Now, after the grid's months, when any month from the day before the earliest day its
-- steps may date a row (the configured start, or the latest period opened when one ends on
-- or after it, where 042's case 0 moves back: roll_periods' count since 060) to today has
-- no partition, set_period_config takes the ledger's SHARE UPDATE EXCLUSIVE lock before
-- the account, as roll_periods does before its first account (055). A writer making a
-- month meanwhile waits for it holding no account; the step makes its month under a lock
-- held already. The lock may be taken for a month no step makes (one retention dropped
-- inside that range): it is then held to the end of the call, as a month made was before.
-- Still open (as 026's header): a caller's transaction that holds the account, or makes a
-- month while holding it, can deadlock with this catch-up as with any transaction making
-- months.
--
-- And the start it counts from is read under the account's lock (found by a review of
-- the above, reproduced: test_races.py
-- test_a_configuration_catching_up_after_another_moved_the_start_back_never_deadlocks):
-- read without it, a set_period_config holding the account, not committed, that moved the
-- start back into a month with no partition (within the limit, so with no catch-up of its
-- own) was not seen by a second one catching up; the second took no partition lock, its
-- first step waited for the account, read the new start under that lock and made the month
-- holding the account (40P01 with a writer that had made a month, as above; 064 closed the
-- same window in roll_periods). Now the catch-up locks the account (in a subtransaction)
-- before it reads that start; when a month is missing it takes the ledger's lock without
-- waiting; held by another, the subtransaction is undone (the account's lock goes with it)
-- and the lock is waited for holding no account. A configuration that commits a start
-- moved back after that has waited for this account behind the catch-up, and is judged
-- after it.
--
-- Lock order of the catch-up, where it changed: the grid's months (each the ledger's SHARE
-- UPDATE EXCLUSIVE, then (19781, yyyymm)), then the account, then, a month missing, the
-- ledger's SHARE UPDATE EXCLUSIVE without waiting (or, held by another, the account let
-- go, that lock, then the account again), then per step the account (the step's months
-- under that lock first), then the account again for the judgment. Migrations once applied
-- are never edited: 029's set_period_config is replaced whole; only the lines marked 065
-- changed.

CREATE OR REPLACE FUNCTION meter.set_period_config(p_user_id text, p_event_type text, p_unit text,
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
    v_open date;
    v_current date;
    v_due date;
    v_account bigint;
    v_today date := (now() AT TIME ZONE 'UTC')::date;
    v_actor text := current_setting('meter.actor_id', true);
    v_behalf text;
    v_reason text;
    v_roll_error text;
    v_from date;
    v_month date;
    v_step interval;
    v_reach date;
    v_nowait boolean := false;  -- 065: the ledger's lock is being tried without waiting
BEGIN
    PERFORM meter._guard(p_namespace);
    PERFORM meter._ident('user_id', p_user_id, 256, true),
            meter._ident('event_type', p_event_type, 256),
            meter._ident('unit', p_unit, 64);
    IF v_interval > interval '100 years' THEN  -- longer overflowed the roll's date arithmetic
        PERFORM meter._fail('MT001', 'period_interval',
                            format('must be at most 100 years (36000 days), got %s',
                                   v_interval));
    END IF;
    IF p_period_start IS NULL OR NOT isfinite(p_period_start) THEN
        PERFORM meter._fail('MT001', 'period_start', 'is required (a finite date)');
    END IF;
    IF p_period_start < date '1900-01-01' THEN  -- no ledger row can be dated before 1900
        PERFORM meter._fail('MT001', 'period_start',
                            format('%s is before 1900', to_char(p_period_start, 'YYYY-MM-DD')));
    END IF;
    v_allocation := meter._amount('period_allocation', p_period_allocation, 'nonnegative');
    IF p_carry_over_limit IS NOT NULL THEN
        v_limit := meter._amount('carry_over_limit', p_carry_over_limit, 'nonnegative');
    END IF;

    -- A start refused while the account's roll is behind (beat down, or not yet round) may
    -- be refused only because the roll has not come; and a configured start that is due
    -- but not opened yet would be replaced before it ever opened (029): roll this account
    -- up to today first, as beat would have, then judge the start (below, under the
    -- account's lock). The roll's
    -- steps lock the account themselves, so this comes before the account is locked here,
    -- and the months they date rows in before that; they are recorded as the roll's
    -- ('system:periods'; the caller's request_id kept, to find them by).
    SELECT a.account_id INTO v_account FROM meter.accounts a
    WHERE a.namespace = p_namespace AND coalesce(a.user_id, '') = coalesce(p_user_id, '')
      AND a.event_type = p_event_type AND a.resource = v_resource AND a.unit = p_unit;
    -- The intervals the account was configured with (the roll goes by one of them), but
    -- those stored before intervals were bounded: their date arithmetic overflows.
    SELECT min(i.iv), max((v_today + i.iv)::date) INTO v_step, v_reach
    FROM (SELECT a.period_interval FROM meter.accounts a
          WHERE a.namespace = p_namespace AND a.account_id = v_account
          UNION ALL
          SELECT c.period_interval FROM meter.period_config_changes c
          WHERE c.namespace = p_namespace AND c.account_id = v_account) i(iv)
    WHERE i.iv <= interval '100 years';
    -- Where the roll goes on from: the configured start, or the latest period opened when
    -- that start lies inside recorded periods (the roll moves back to it).
    SELECT least(a.period_start, (SELECT max(p.period_start) FROM meter.periods p
                                  WHERE p.namespace = a.namespace
                                    AND p.account_id = a.account_id
                                    AND p.opened_at IS NOT NULL))
    INTO v_from FROM meter.accounts a
    CROSS JOIN LATERAL (SELECT NOT EXISTS (SELECT 1 FROM meter.periods p
                                           WHERE p.namespace = a.namespace
                                             AND p.account_id = a.account_id
                                             AND p.period_start = a.period_start
                                             AND p.opened_at IS NOT NULL) AS unopened) u
    WHERE a.namespace = p_namespace AND a.account_id = v_account
      AND a.period_allocation IS NOT NULL AND a.period_interval IS NOT NULL
      AND a.period_start <= v_today
      AND (-- 029: the configured start is due and not opened, and was configured before it
           -- began (whatever the new start: beat owed it a period by now). A backdated
           -- start replaced before beat came round is taken as corrected instead.
           (u.unopened
            AND EXISTS (SELECT 1 FROM meter.period_config_changes c
                        WHERE c.namespace = a.namespace AND c.account_id = a.account_id
                          AND c.period_start = a.period_start
                          AND c.changed_at < a.period_start::timestamp AT TIME ZONE 'UTC'))
           -- 026: the start would be refused, and the roll is behind (roll_periods'
           -- candidate test), and a roll up to today could accept it: none past today
           -- plus the longest interval the account was configured with (3 days more for a month's end; compared as dates, since
           -- intervals compare a month as 30 days), else a refusal would first roll, for
           -- nothing, what may be years of periods
           OR (p_period_start > meter._period_start_limit(p_namespace, v_account,
                                                          p_period_start)
               AND (u.unopened
                    OR meter._next_period_start(a.namespace, a.account_id, a.period_start,
                                                a.period_interval) <= v_today)
               AND p_period_start <= v_reach + 3));
    IF FOUND THEN
        -- The months the roll's steps date rows in (each period's first day and the day
        -- before it, on the densest grid the account had), created before any step locks
        -- the account: a step that created one under the account's lock could deadlock
        -- with beat's roll, which creates months as it goes and then waits for accounts.
        -- 065: a step still creates what this missed (a period opened by hand off the
        -- grid; a grid of 5 months where the roll goes by years), under the lock below.
        FOR v_month IN
            SELECT DISTINCT date_trunc('month', b.day)::date
            FROM generate_series(v_from, v_today, v_step) d(start),
                 LATERAL (VALUES (d.start::date - 1), (d.start::date)) b(day)
            WHERE b.day >= date '1900-01-01'
            ORDER BY 1
        LOOP
            IF to_regclass(format('meter.ledger_%s', to_char(v_month, 'YYYY_MM'))) IS NULL THEN
                PERFORM meter.create_partition(extract(year FROM v_month)::integer,
                                               extract(month FROM v_month)::integer);
            END IF;
        END LOOP;
        -- 065: a month its steps may date rows in still missing (from the day before the
        -- start, or the latest period opened when the roll may move back to it, as
        -- roll_periods counts them since 060, to today): the ledger's partition lock now,
        -- before the account, as roll_periods takes it before its first account (055).
        -- A later step made that month holding the account its first step locked, and
        -- waited for this lock held by a writer that had made a month and then waited for
        -- the account (40P01). Taken already when the loop above made a month.
        -- 065: the start is read under the account's lock, which the first step takes
        -- next anyway: read without it, a configuration holding the account (not committed)
        -- that moved the start back into a month with no partition still showed the old
        -- one; the first step waited for the account, read the new start, and made its
        -- month holding the account (40P01 again). The account is locked in a
        -- subtransaction: when a month is missing and another holds the ledger's lock,
        -- the subtransaction is undone, which lets the account go, and the lock is waited
        -- for holding no account (the steps lock the account again). Not waited for while
        -- holding the account: a writer holding that lock may be waiting for it.
        BEGIN                                                                           -- 065
            IF meter._ledger_months_missing(                                            -- 065
                   meter._lock_roll_earliest(p_namespace, v_account), v_today) THEN     -- 065
                v_nowait := true;                                                       -- 065
                LOCK TABLE ONLY meter.ledger IN SHARE UPDATE EXCLUSIVE MODE NOWAIT;     -- 065
            END IF;                                                                     -- 065
        EXCEPTION WHEN lock_not_available THEN                                          -- 065
            IF NOT v_nowait THEN  -- the account's lock (lock_timeout): the caller's     -- 065
                RAISE;                                                                  -- 065
            END IF;                                                                     -- 065
            LOCK TABLE ONLY meter.ledger IN SHARE UPDATE EXCLUSIVE MODE;                -- 065
        END;                                                                            -- 065
        v_behalf := current_setting('meter.on_behalf_of', true);
        v_reason := current_setting('meter.reason', true);
        PERFORM set_config('meter.actor_id', 'system:periods', true),
                set_config('meter.on_behalf_of', '', true),
                set_config('meter.reason', '', true);
        SELECT string_agg(r.error, '; ') INTO v_roll_error
        FROM meter._roll_account(p_namespace, v_account, v_today, 10000) r
        WHERE r.status = 'error';
        PERFORM set_config('meter.actor_id', coalesce(v_actor, ''), true),
                set_config('meter.on_behalf_of', coalesce(v_behalf, ''), true),
                set_config('meter.reason', coalesce(v_reason, ''), true);
    END IF;

    PERFORM meter._create_account(p_namespace, p_user_id, p_event_type, v_resource, p_unit);
    v_acc := meter._lock_account(p_namespace, p_user_id, p_event_type, v_resource, p_unit);
    -- A start past the next start of the period still open would leave the periods between
    -- unopened (their allocations lost): meter._period_start_limit.
    v_due := meter._period_start_limit(p_namespace, v_acc.account_id, p_period_start);
    IF p_period_start > v_due THEN
        SELECT p.period_start INTO v_open FROM meter.periods p
        WHERE p.namespace = p_namespace AND p.account_id = v_acc.account_id
          AND p.opened_at IS NOT NULL AND p.period_start < p_period_start
        ORDER BY p.period_start DESC LIMIT 1;
        PERFORM meter._fail('MT001', 'period_start',
            format('%s is after %s, when the next period after the one open since %s '
                   'starts: a later start would skip the periods between; choose a '
                   'start no later than %s, or set it once the periods have rolled '
                   'up to it%s', to_char(p_period_start, 'YYYY-MM-DD'),
                   to_char(v_due, 'YYYY-MM-DD'), to_char(v_open, 'YYYY-MM-DD'),
                   to_char(v_due, 'YYYY-MM-DD'),
                   coalesce(' (rolling this account up to today failed: ' || v_roll_error
                            || ')', '')));
    END IF;
    -- A start before the latest period opened (a configuration re-applied with its first
    -- start, nightly, say) leaves the roll where the recorded periods have it: at the
    -- earliest period from that start on that is still open (one left open when the next
    -- was opened by hand, for the roll to close), else at the latest opened. Walking the
    -- roll back through every recorded period only replayed them, at a cost that grew with
    -- the account's age.
    SELECT coalesce(min(p.period_start) FILTER (WHERE p.period_end IS NULL),
                    max(p.period_start))
    INTO v_current FROM meter.periods p
    WHERE p.namespace = p_namespace AND p.account_id = v_acc.account_id
      AND p.opened_at IS NOT NULL AND p.period_start >= p_period_start;
    UPDATE meter.accounts a
    SET period_start = coalesce(v_current, p_period_start), period_allocation = v_allocation,
        carry_over_limit = v_limit, period_interval = v_interval, updated_at = now()
    WHERE a.namespace = p_namespace AND a.account_id = v_acc.account_id;
    INSERT INTO meter.period_config_changes
        (namespace, account_id, user_id, event_type, resource, unit, period_start,
         period_allocation, carry_over_limit, period_interval, actor)
    VALUES (p_namespace, v_acc.account_id, p_user_id, p_event_type, v_resource, p_unit,
            p_period_start, v_allocation, v_limit, v_interval, meter._actor());
END
$$;

