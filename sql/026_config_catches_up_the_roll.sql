-- set_period_config catches a late roll up before it judges a start.
--
-- Why (found by the fifth review of 024, reproduced): set_period_config refuses a start
-- past the next start of the period still open, because the periods between would never
-- open (024, item 7). But it judged that by the periods recorded, so when that next start
-- was already due and the roll simply had not come yet (beat down, or not yet round), it
-- refused a start that the same call accepts once beat has rolled: Sep 1 open, Oct 1 due
-- but not rolled, a plan change from Oct 15 was a ValidationError naming period_start.
-- An integration that takes a ValidationError as final drops the change.
--
-- Now a start that would be refused while the account's roll is behind (roll_periods'
-- candidate test: its configured period not opened yet, or the next start due) first rolls
-- this one account up to today, as beat would have, and is then judged against the periods
-- that roll recorded: October opened with its allocation, then the change from Oct 15, as
-- when beat had rolled first. Also a start past a pending configuration whose start is due
-- (found by review): that period is opened first, and the limit follows it. A start past a
-- next start that is not due yet is refused as before (the periods between have not
-- begun), and a refusal still changes nothing, the roll it began included (one
-- transaction). Should the roll fail for the account, the refusal says why.
--
-- How: roll_periods' loop over one account's steps moved into meter._roll_account, which
-- both call, with one change (found by review): a step no longer asks for the month of a
-- day before 1900, so that a period configured from 1900-01-01 (the earliest start
-- set_period_config accepts) rolls instead of failing at every call. The limit the refusal
-- reads (the next start after the latest period opened before the start) moved into
-- meter._period_start_limit, read once without locks to decide whether to roll, and again
-- under the account's lock to decide. Locks (three reviews): the catch-up first creates the
-- months the roll will date rows in (each period's first day and the day before it, on the
-- densest grid the account was configured with, from its configured start or the latest
-- period opened if that is earlier, the roll moving back to it), then runs the steps, each
-- of which locks the account and decides on what it reads under that lock; a roll_periods
-- under way on the account is waited for there, and one that comes later finds nothing to
-- do. It takes no roll lock: a first version took roll_periods' advisory lock after the
-- account locks a caller may hold, and deadlocked with beat's roll; a second created months
-- as its steps went, under the account's lock, and deadlocked with a beat that had created
-- one and waited for the account. A caller that already holds the account in its own
-- transaction can still deadlock with a beat that is creating a month the catch-up needs
-- (40P01; the SDK retries it only for calls that are their own transaction), as any
-- transaction that creates a month while holding account locks. A start past today plus the
-- longest interval the account was configured with (3 days more; compared as dates, as an
-- interval counts a month as 30 days; intervals stored before 024's bound left out) is
-- refused without a catch-up: no roll up to today could accept it, and an account years
-- behind would be rolled, then rolled back, at every retry. The steps are recorded as the
-- roll's: actor 'system:periods', no on_behalf_of or reason (the caller's request_id kept,
-- to find them by). A refusal after a catch-up reads the periods as rolled (and then undone
-- with it).
--
-- Not changed: a start the limit accepts does not roll first, so a configuration made
-- while the roll is behind acts on the periods as last rolled. A change from the due next
-- start itself (00:00 on a renewal day, or Oct 1 with beat down since September) gives
-- the new allocation to that period, where rolled first it would give it from the next.
-- A configuration whose start is due but not yet opened, replaced by one with a later
-- start the limit accepts, never opens its periods (rolled first, they would have opened,
-- and the later start might have been refused): in a review's random scenarios, about one
-- in five configurations made while the roll was behind ended otherwise than rolled first.
-- Rolling first on every call would settle these, but the period tests drive time through
-- roll_periods' p_now, which set_period_config does not take; scheduled configuration
-- changes (an effective time) are not built.
-- Migrations once applied are never edited, so roll_periods and set_period_config are
-- replaced whole; their other lines are 024's.

-- The latest start set_period_config accepts for an account: the next start after the
-- latest period opened before p_start (closed or not), by the interval the roll goes by
-- from it (the latest configuration of a start up to it, a restatement's rather than a
-- pending one's). NULL when there is no such period or no configuration: any start.
CREATE FUNCTION meter._period_start_limit(p_namespace text, p_account_id bigint,
                                          p_start date)
RETURNS date
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_open date;
    v_interval interval;
    v_open_interval interval;
BEGIN
    SELECT a.period_interval INTO v_interval FROM meter.accounts a
    WHERE a.namespace = p_namespace AND a.account_id = p_account_id;
    SELECT p.period_start INTO v_open FROM meter.periods p
    WHERE p.namespace = p_namespace AND p.account_id = p_account_id
      AND p.opened_at IS NOT NULL AND p.period_start < p_start
    ORDER BY p.period_start DESC LIMIT 1;
    IF v_open IS NULL OR v_interval IS NULL THEN
        RETURN NULL;
    END IF;
    SELECT c.period_interval INTO v_open_interval FROM meter.period_config_changes c
    WHERE c.namespace = p_namespace AND c.account_id = p_account_id
      AND c.period_start <= v_open
    ORDER BY c.change_id DESC LIMIT 1;
    RETURN meter._next_period_start(p_namespace, p_account_id, v_open,
                                    coalesce(v_open_interval, v_interval));
END
$$;
REVOKE EXECUTE ON FUNCTION meter._period_start_limit(text, bigint, date) FROM PUBLIC;

-- One account's roll (roll_periods' loop, 024's, but for months before 1900): steps until
-- its current period has not ended by p_today, p_budget steps were taken, or a step failed
-- (reported with status 'error', the account left for the next call). Each step is a
-- subtransaction. Locks: per step, the months it dates rows in, then the account (held to
-- commit), and it decides on what it reads under that lock. The caller sets the actor.
CREATE FUNCTION meter._roll_account(p_namespace text, p_account_id bigint, p_today date,
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
                                  OR p.period_end >= v_acc.period_start)) THEN
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

-- set_period_config (024's), catching a late roll up first (above).
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
    -- be refused only because the roll has not come: roll this account up to today first,
    -- as beat would have, then judge it (below, under the account's lock). The roll's
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
    WHERE a.namespace = p_namespace AND a.account_id = v_account
      AND p_period_start > meter._period_start_limit(p_namespace, v_account, p_period_start)
      -- behind: roll_periods' candidate test, for this account
      AND a.period_allocation IS NOT NULL AND a.period_interval IS NOT NULL
      AND a.period_start <= v_today
      AND (NOT EXISTS (SELECT 1 FROM meter.periods p
                       WHERE p.namespace = a.namespace AND p.account_id = a.account_id
                         AND p.period_start = a.period_start AND p.opened_at IS NOT NULL)
           OR meter._next_period_start(a.namespace, a.account_id, a.period_start,
                                       a.period_interval) <= v_today)
      -- and a start that a roll up to today could accept: none past today plus the longest
      -- interval the account was configured with (3 days more for a month's end; compared
      -- as dates, since intervals compare a month as 30 days), else a refusal would first
      -- roll, for nothing, what may be years of periods
      AND p_period_start <= v_reach + 3;
    IF FOUND THEN
        -- The months the roll's steps date rows in (each period's first day and the day
        -- before it, on the densest grid the account had), created before any step locks
        -- the account: a step that created one under the account's lock could deadlock
        -- with beat's roll, which creates months as it goes and then waits for accounts.
        -- A step still creates what this missed (a period opened by hand off the grid).
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
