-- Beat: the bookkeeping of periodic maintenance, the period roll-over and key pruning.
--
-- The cluster-wide functions here are for privileged callers only (superuser, schema owner,
-- member of meter_maintenance, with no tenant set): sql/roles.sql grants EXECUTE on every
-- API function to meter_app as well, so each one checks the caller itself
-- (meter._require_maintenance) rather than relying on grants alone. roll_periods for one
-- namespace and get_periods are tenant-scoped like the rest of the API (meter._guard).
--
-- Time can be driven in tests: roll_periods and prune_idempotency_keys take `p_now` (default
-- now()), the instant they act as of. It may not be more than 24 hours after the database
-- clock, the same bound as an event_time, since ledger rows cannot be dated later.

-- Refuse a caller who may not run cluster-wide maintenance (MT004; p_what says what).
CREATE FUNCTION meter._require_maintenance(p_what text) RETURNS void
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF nullif(current_setting('meter.tenant', true), '') IS NOT NULL
       OR NOT meter._is_privileged(session_user) THEN
        RAISE EXCEPTION 'namespace: % needs a privileged role (meter_maintenance) and no tenant',
                        p_what
            USING ERRCODE = 'MT004', COLUMN = 'namespace';
    END IF;
END
$$;

-- `p_now` of the time-driven functions: NULL means now(); later than 24 hours after the
-- database clock is refused (MT001 'now').
CREATE FUNCTION meter._now(p_value timestamptz) RETURNS timestamptz
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF p_value IS NULL THEN
        RETURN now();
    END IF;
    IF NOT isfinite(p_value) THEN
        PERFORM meter._fail('MT001', 'now', 'must be a finite time');
    END IF;
    IF p_value > now() + interval '24 hours' THEN
        PERFORM meter._fail('MT001', 'now',
            format('%s is more than 24 hours after the database clock', p_value));
    END IF;
    RETURN p_value;
END
$$;

------------------------------------------------------------------------------------------
-- The last run of each periodic task (what `meter status` shows as "last beat run").
-- Cluster-wide operations data, not tenant data: it has no namespace column (the one table
-- whose key does not start with namespace) and no row-level security; it is read and written
-- only through the two functions below, by privileged callers.
CREATE TABLE meter.maintenance_runs (
    task             text        PRIMARY KEY,
    last_started_at  timestamptz,
    last_finished_at timestamptz,
    last_ok_at       timestamptz,
    last_result      jsonb,
    last_error       text,
    runs             bigint      NOT NULL DEFAULT 0
);

-- Record one finished run of a periodic task: `p_ok` and its result, or the error (kept
-- until the next run; a successful run clears it). `p_started_at` (default now()) is when
-- the run began. Concurrent runs of one task both count; the last to record wins.
CREATE FUNCTION meter.record_maintenance_run(p_task text, p_ok boolean, p_result jsonb DEFAULT NULL,
                                             p_error text DEFAULT NULL,
                                             p_started_at timestamptz DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    -- read once: a successful run's last_ok_at is exactly its last_finished_at
    v_finished timestamptz := clock_timestamp();
BEGIN
    PERFORM meter._require_maintenance('recording a maintenance run');
    PERFORM meter._ident('task', p_task, 128);
    IF p_ok IS NULL THEN
        PERFORM meter._fail('MT001', 'ok', 'is required');
    END IF;
    INSERT INTO meter.maintenance_runs AS m
        (task, last_started_at, last_finished_at, last_ok_at, last_result, last_error, runs)
    VALUES (p_task, coalesce(p_started_at, now()), v_finished,
            CASE WHEN p_ok THEN v_finished END, p_result,
            CASE WHEN NOT p_ok THEN coalesce(p_error, 'failed') END, 1)
    ON CONFLICT (task) DO UPDATE
    SET last_started_at = excluded.last_started_at,
        last_finished_at = excluded.last_finished_at,
        last_ok_at = coalesce(excluded.last_ok_at, m.last_ok_at),
        last_result = excluded.last_result,
        last_error = excluded.last_error,
        runs = m.runs + 1;
END
$$;

-- Every periodic task's last run, by task name.
CREATE FUNCTION meter.get_maintenance_runs()
RETURNS TABLE (task text, last_started_at timestamptz, last_finished_at timestamptz,
               last_ok_at timestamptz, last_result jsonb, last_error text, runs bigint)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM meter._require_maintenance('reading maintenance runs');
    RETURN QUERY
    SELECT m.task, m.last_started_at, m.last_finished_at, m.last_ok_at, m.last_result,
           m.last_error, m.runs
    FROM meter.maintenance_runs m ORDER BY m.task;
END
$$;

------------------------------------------------------------------------------------------
-- Period roll-over.
--
-- An account takes part when it has a period configuration (set_period_config: a
-- period_allocation and a period_interval). Its current period starts at accounts.period_start
-- and ends the day before period_start + period_interval. As of p_now (UTC date "today"),
-- roll_periods, for each such account in ascending account_id:
--   1. opens the current period if it was never opened and has started (open_period with the
--      configured allocation, dated at its start);
--   2. while the current period has ended (its next start <= today): closes it (close_period:
--      expiration and carry-over per the account's limit, dated at the last microsecond of its
--      last day), then opens the next one (open_period, dated at its first instant).
-- So a beat that was down for several periods catches up period by period, in order, with
-- every ledger row dated at the period boundaries rather than when the job ran.
--
-- At most p_batch_size steps (an open, or a close with the following open) per call, in one
-- transaction; the caller repeats until fewer rows than p_batch_size come back. Returns one
-- row per step: the period closed (NULL for a first open) and its figures, the period opened
-- and its allocation, the balance after the step; or, for an account whose step failed (say a
-- configuration dated before 1900, MT001), status 'error' and the message: that step is
-- undone, the account is left until fixed (reported again by every call) and the others
-- still roll. A next period already opened by hand is kept as it is.
--
-- Concurrency: one roller at a time (transaction advisory lock 0x4D46/1: a second caller
-- waits, then finds only what is still due); each account is locked (FOR UPDATE) before its figures
-- are read, and open/close are idempotent per period besides, so even without the lock a
-- period is never closed or opened twice. Lock order: the advisory lock, then per step the
-- ledger partitions it needs (created first, as every writer does) and its account; one
-- account at a time, in ascending account_id.
-- Ledger rows and period records carry actor `system:periods` unless the caller set one.
CREATE FUNCTION meter.roll_periods(p_namespace text DEFAULT NULL,
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
          AND ((a.period_start + a.period_interval)::date <= v_today
               OR NOT EXISTS (SELECT 1 FROM meter.periods p
                              WHERE p.namespace = a.namespace AND p.account_id = a.account_id
                                AND p.period_start = a.period_start
                                AND p.opened_at IS NOT NULL))
        ORDER BY a.account_id
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
                SELECT a.period_start, (a.period_start + a.period_interval)::date
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
                    v_next := (v_acc.period_start + v_acc.period_interval)::date;
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
                v_steps := v_steps + 1;
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

------------------------------------------------------------------------------------------
-- Idempotency-key pruning.
--
-- Delete up to p_batch_size keys created more than p_older_than_days (default 35) before
-- p_now; returns how many. The caller repeats until fewer than a batch come back. A key
-- pruned is forgotten: the same request sent again would apply again, so the window must
-- outlast every retry and replay path (producer retries, dead-letter replays).
-- Never pruned, whatever their age:
--   * the key of a reserve whose hold is still active: a retried reserve must replay, not
--     take a second hold while the first one still counts;
--   * a key that was still within the window when its account was last folded into a
--     retention checkpoint (drop_old_partitions) less than one window ago: the fold removed
--     the ledger row that also carried the key, so the key is the only remaining evidence
--     that the event was applied; it is kept one window past the fold. (Bounded: no key
--     outlives two windows because of this.)
-- Concurrency: keys are claimed FOR UPDATE SKIP LOCKED, so two pruners split the work and
-- a key is deleted once; nothing else is locked.
CREATE FUNCTION meter.prune_idempotency_keys(p_older_than_days integer DEFAULT 35,
                                             p_batch_size integer DEFAULT 10000,
                                             p_now timestamptz DEFAULT now())
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_now timestamptz;
    v_window interval;
    v_cutoff timestamptz;
    v_count integer;
BEGIN
    PERFORM meter._require_maintenance('pruning idempotency keys');
    IF p_older_than_days IS NULL OR p_older_than_days < 1 OR p_older_than_days > 36500 THEN
        PERFORM meter._fail('MT001', 'older_than_days',
            format('must be between 1 and 36500, got %s', coalesce(p_older_than_days::text, 'NULL')));
    END IF;
    IF p_batch_size IS NULL OR p_batch_size < 1 OR p_batch_size > 100000 THEN
        PERFORM meter._fail('MT001', 'batch_size', format('must be between 1 and 100000, got %s',
                                                          coalesce(p_batch_size::text, 'NULL')));
    END IF;
    v_now := meter._now(p_now);
    v_window := make_interval(days => p_older_than_days);
    v_cutoff := v_now - v_window;

    -- No index on created_at (it would cost every write): the scan stops at the first
    -- batch of old keys, which sit early in the table.
    WITH doomed AS (
        SELECT k.namespace, k.key FROM meter.idempotency_keys k
        WHERE k.created_at < v_cutoff
          AND NOT EXISTS (SELECT 1 FROM meter.reservations r
                          WHERE r.namespace = k.namespace AND r.reservation_id = k.reservation_id
                            AND r.status = 'active')
          AND NOT EXISTS (SELECT 1 FROM meter.ledger_checkpoints c
                          WHERE c.namespace = k.namespace AND c.account_id = k.account_id
                            AND c.updated_at >= v_cutoff
                            AND k.created_at >= c.updated_at - v_window)
        LIMIT p_batch_size
        FOR UPDATE OF k SKIP LOCKED
    ), gone AS (
        DELETE FROM meter.idempotency_keys k USING doomed d
        WHERE k.namespace = d.namespace AND k.key = d.key
        RETURNING 1
    )
    SELECT count(*) INTO v_count FROM gone;
    RETURN v_count;
END
$$;

------------------------------------------------------------------------------------------
-- An account holder's period history (`meter periods show`): every recorded period of the
-- user's accounts (p_user_id NULL: the namespace pool's), optionally of one event type /
-- unit / resource, newest first, at most p_limit (default 100, capped at 10000). Each row:
-- the account key, the period's dates and figures, when and by whom it was opened and
-- closed. A tenant-scoped read like get_ledger.
CREATE FUNCTION meter.get_periods(p_user_id text, p_event_type text DEFAULT NULL,
                                  p_unit text DEFAULT NULL, p_resource text DEFAULT NULL,
                                  p_limit integer DEFAULT 100,
                                  p_namespace text DEFAULT 'default')
RETURNS TABLE (event_type text, resource text, unit text, period_start date, period_end date,
               allocation numeric, open_balance numeric, expired numeric,
               carried_over numeric, close_balance numeric, opened_at timestamptz,
               opened_by text, closed_at timestamptz, closed_by text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_limit integer := meter._limit('limit', p_limit, 100, 10000);
BEGIN
    PERFORM meter._guard(p_namespace);
    PERFORM meter._ident('user_id', p_user_id, 256, true),
            meter._ident('event_type', p_event_type, 256, true),
            meter._ident('unit', p_unit, 64, true);
    IF p_resource IS NOT NULL AND p_resource <> '' THEN
        PERFORM meter._ident('resource', p_resource, 256);
    END IF;
    RETURN QUERY
    SELECT p.event_type, p.resource, p.unit, p.period_start, p.period_end, p.allocation,
           p.open_balance, p.expired, p.carried_over, p.close_balance, p.opened_at,
           p.opened_actor->>'actor_id', p.closed_at, p.closed_actor->>'actor_id'
    FROM meter.periods p
    WHERE p.namespace = p_namespace AND coalesce(p.user_id, '') = coalesce(p_user_id, '')
      AND (p_event_type IS NULL OR p.event_type = p_event_type)
      AND (p_unit IS NULL OR p.unit = p_unit)
      AND (p_resource IS NULL OR p.resource = meter._resource(p_resource))
    ORDER BY coalesce(p.period_start, p.period_end) DESC, p.period_id DESC
    LIMIT v_limit;
END
$$;

-- For databases whose roles exist already (sql/roles.sql grants the same on its next run).
-- roles.sql revokes the cluster-wide ones from meter_app again, and they refuse a tenant by
-- their own check too (roll_periods serves an application only for its own tenant).
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'meter_maintenance') THEN
        GRANT EXECUTE ON FUNCTION
            meter.record_maintenance_run(text, boolean, jsonb, text, timestamptz),
            meter.get_maintenance_runs(),
            meter.roll_periods(text, timestamptz, integer),
            meter.prune_idempotency_keys(integer, integer, timestamptz),
            meter.get_periods(text, text, text, text, integer, text)
        TO meter_maintenance;
        IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'meter_app') THEN
            GRANT EXECUTE ON FUNCTION meter.get_periods(text, text, text, text, integer, text),
                                      meter.roll_periods(text, timestamptz, integer)
            TO meter_app;
        END IF;
    END IF;
END
$$;

REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA meter FROM PUBLIC;
