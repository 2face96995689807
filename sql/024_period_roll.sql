-- The period roll: monthly periods keep their day, a late roll closes each period as it
-- stood at its end, a roll through recorded periods only replays them, a configuration's
-- start neither skips nor repeats periods, and one tenant's configuration cannot stop the
-- roll of the others.
--
-- 1. Monthly periods keep the day they were configured on.
--    Why: roll_periods started each period at the previous start plus the interval. A
--    month is cut short where the next month has fewer days, and the cut stuck: configured
--    on Jan 31, periods began on Feb 28, then Mar 28, Apr 28 and the 28th ever after, so
--    every period from March on began up to three days early. A billing user expects the
--    anchor to hold (Jan 31, Feb 28, Mar 31, Apr 30), as a subscription's billing day does.
--    Now meter._next_period_start gives the configured start (the anchor, in
--    meter.period_config_changes) plus a whole number of intervals. Only a start on the
--    last day of its month can differ from start + interval, so only such a start looks
--    the configurations up (by the new index), newest first: one that restates the current
--    start on its own day, a month's last day (to raise the allocation, as the SDK's
--    docstring invites), says nothing of the day it was cut from, and an older one on the
--    same grid is asked (found by the second review; the third found that a configuration
--    on another day, Mar 28, must end the search: it chose its day). A period off the
--    grid (opened by hand on another day, or a configuration on a new day) is followed, as
--    before, by its start plus the interval. Day intervals never cut.
--
-- 2. What is recorded wins (found by review, reproduced). A configuration re-applied with
--    an earlier start makes the roll walk through recorded periods again. Where its rule
--    for the next start differs from the one that made them (the old slide to the 28th, a
--    new interval, periods opened or closed by hand), it closed and opened periods on top
--    of them: 200 units granted twice. A period that was closed now ends where it was
--    closed, and a later period already opened before the computed start is the next one;
--    the walk only replays them. An account that slid under the old rule keeps its day:
--    the migration moves no one's billing day.
--
-- 3. A roll closes each period as it stood at its end (found by an audit, reproduced).
--    Why: close_period expires what is available now. Rolled on time, now is the period's
--    end. But a roll that catches up (beat was down) closed each missed period with the
--    balance of today, later periods' usage included: with 100 a month, carry-over limit
--    50, 100 unused in September and 150 used in October, the on-time roll ends November
--    at 100 and the late one at 150, 50 units that no period granted.
--    Now roll_periods closes through meter._close_period with p_later, the sum of the
--    ledger dated after the period's end: what was available is the balance less that,
--    less what the holds made by the end still held at it (not past their TTL, not yet
--    committed, released or expired; found by the new index; the window in seconds, as a
--    day on a timestamptz follows the session's TimeZone). The period's close_balance
--    is recorded as it stood at the end, after the close. A catch-up sums each ledger row
--    once, not once per period. A call of close_period is unchanged: SPEC 3.4 has it
--    expire what is available now.
--
-- 4. The roll's candidates are exact: an account whose period has not ended is not locked
--    (review: from Sep 30, start + 1 month is Oct 30 but the period runs to Oct 30, and
--    every roll on that day locked each such account in a subtransaction of its own).
--
-- 5. A configuration moved on closes the period still open (second review, reproduced).
--    A plan change configured from Sep 15 while the period of Sep 1 ran: the roll opened
--    Sep 15 and never closed Sep 1, so its unused units ran on into the new period past
--    a carry-over limit of 0. The open period now ends the day before the new start.
--
-- 6. Period intervals are at most 100 years (second review, reproduced). One tenant's
--    '200000000 days' overflowed the date arithmetic of the roll's candidate query, so
--    beat's roll failed for every tenant. set_period_config refuses it; an interval stored
--    before is left out of the candidates (its next start is 'infinity').
--
-- 7. Starts that would skip or repeat periods (third review, reproduced).
--    - set_period_config refuses a start past the next start of the period still open:
--      the periods between would never open (Sep 1 open, a start on Nov 15: October's
--      allocation lost, and a late roll differed from an on-time one). A start up to
--      that next start is a plan change at the period's end or in its middle.
--    - A start rewound inside recorded periods, on a day no period started on (Aug 15 in a
--      closed August): the roll opened it, granting its days twice. What is recorded wins:
--      the latest period opened becomes current again, and the roll goes on from it.
--
-- 8. The fourth review, reproduced:
--    - The same set_period_config made twice was refused: a pending configuration (a later
--      start) ended the grid search. Pending configurations, and ones whose start never
--      became a period (item 7's rewinds), are passed over.
--    - A restatement on Feb 28 did not reach the 31st grid (Feb 28 + 2 months is Apr 28):
--      a month's last day is on the grid of every month's last day.
--    - The refusal of item 7 read a pending configuration's interval, and missed periods
--      closed by hand: it now reads the latest period opened before the start, closed or
--      not, and the interval it was opened under.
--    - A period left open because the next was opened by hand early had its units taken by
--      that next period's close; a later walk through it (a configuration re-applied)
--      closed it again, expiring them twice. The walk now only moves on past it.
--
-- 9. The fifth review simulated a year of billing traffic (signups on any day, plan
--    changes, nightly re-provisioning, beat outages) against a model of on-time rolling:
--    no unit lost, doubled or invented, no period skipped or repeated. It found, and this
--    fixes:
--    - set_period_config with a start before the latest period opened (a configuration
--      re-applied with its first start, nightly) sent the roll back through every
--      recorded period, each reported as 'rolled' (304 for a daily account) though
--      nothing was written. Such a start now leaves the roll at the earliest period from
--      it on that is still open, else at the latest opened; and a walk step that writes
--      nothing (a start stored before 024) is neither counted nor reported.
--    - The refusal of item 7 read the interval a period was opened under, not the one the
--      roll goes by after a restatement (monthly restated as annual: every later start was
--      refused until the year ended). It reads the latest configuration of a start up to
--      the open period's.
--    A sixth review found the move-on of item 8 incomplete: with a period opened by hand
--    that skipped one (Nov 1 while Sep 1 ran) and closed by hand, a re-applied
--    configuration made the roll close September again (its units expired twice) and open
--    October. A period never closed while a later one was now moves the roll on to the
--    earliest period opened after it, whether or not its computed next start was opened.
--
-- Migrations once applied are never edited, so close_period and roll_periods are replaced
-- whole: close_period's body moved to meter._close_period (only the block under p_later
-- is new); set_period_config gained its refusals (6, 7) and where it leaves the current
-- start (9); roll_periods changed in its candidate filter, in cases 0 and 1 of its step
-- (7, 5) and where it computes the next start and closes.

-- set_period_config (022's), with two refusals more: an interval over 100 years (item 6)
-- and a start past the next start of the period still open (item 7); and where it leaves
-- the current start (item 9).
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
    v_open_interval interval;
    v_current date;
    v_due date;
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

    PERFORM meter._create_account(p_namespace, p_user_id, p_event_type, v_resource, p_unit);
    v_acc := meter._lock_account(p_namespace, p_user_id, p_event_type, v_resource, p_unit);
    -- A start past the next start of the period still open would leave the periods between
    -- unopened (their allocations lost). That next start is reckoned from the latest period
    -- opened before the start, closed or not, with the interval the roll goes by from it:
    -- the latest configuration of a start up to it (a restatement's, not a pending one's).
    SELECT p.period_start INTO v_open FROM meter.periods p
    WHERE p.namespace = p_namespace AND p.account_id = v_acc.account_id
      AND p.opened_at IS NOT NULL AND p.period_start < p_period_start
    ORDER BY p.period_start DESC LIMIT 1;
    IF v_open IS NOT NULL AND v_acc.period_interval IS NOT NULL THEN
        SELECT c.period_interval INTO v_open_interval FROM meter.period_config_changes c
        WHERE c.namespace = p_namespace AND c.account_id = v_acc.account_id
          AND c.period_start <= v_open
        ORDER BY c.change_id DESC LIMIT 1;
        v_due := meter._next_period_start(p_namespace, v_acc.account_id, v_open,
                                          coalesce(v_open_interval, v_acc.period_interval));
        IF p_period_start > v_due THEN
            PERFORM meter._fail('MT001', 'period_start',
                format('%s is after %s, when the next period after the one open since %s '
                       'starts: a later start would skip the periods between; choose a '
                       'start no later than %s, or set it once the periods have rolled '
                       'up to it', to_char(p_period_start, 'YYYY-MM-DD'),
                       to_char(v_due, 'YYYY-MM-DD'), to_char(v_open, 'YYYY-MM-DD'),
                       to_char(v_due, 'YYYY-MM-DD')));
        END IF;
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

CREATE INDEX period_config_changes_account
    ON meter.period_config_changes (namespace, account_id, change_id);
-- The holds an account had at a period's end (meter._close_period). By account_id (an
-- identity, unique across namespaces) rather than namespace first: a plan cached while the
-- table was empty took a (namespace, ...) index for commit's look-up by primary key, and
-- commit then read every hold of the namespace (reserve + commit at half speed).
CREATE INDEX reservations_account_created ON meter.reservations (account_id, created_at);

-- The first day of the period after the one starting p_start, for an account whose
-- periods last p_interval (whole days or whole months, meter._period_interval).
-- What is recorded wins: a period that was closed ends where it was closed, and a later
-- period already opened before the computed start is the next one, so a roll that walks
-- through recorded periods again (a configuration re-applied with an earlier start) only
-- replays them. Otherwise the grid of the latest configuration.
CREATE FUNCTION meter._next_period_start(p_namespace text, p_account_id bigint,
                                         p_start date, p_interval interval)
RETURNS date
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_next date;
    v_step integer := (extract(year FROM p_interval) * 12 + extract(month FROM p_interval))::integer;
    v_recorded date;
    v_anchor date;
    v_interval interval;
    v_months integer;
    v_month_end boolean;
BEGIN
    IF p_interval >= interval '1000 years' THEN
        RETURN 'infinity';  -- stored before intervals were bounded; date arithmetic overflows
    END IF;
    v_next := (p_start + p_interval)::date;
    SELECT p.period_end + 1 INTO v_recorded FROM meter.periods p
    WHERE p.namespace = p_namespace AND p.account_id = p_account_id
      AND p.period_start = p_start AND p.period_end IS NOT NULL;
    IF v_recorded IS NOT NULL THEN
        RETURN v_recorded;
    END IF;
    -- Adding months cuts a day only past a shorter month's end, so a start that is not the
    -- last day of its month was not cut, and start + interval is on the grid already.
    IF v_step > 0 AND extract(day FROM p_start + 1) = 1 THEN
        -- The configurations, newest first, as long as p_start is on their grid: the first
        -- whose day is later than p_start's is the day p_start was cut from. One on a
        -- month's last day (a change that restated a cut start, say to raise the
        -- allocation) says nothing about it, so an older one is asked; one on another day
        -- chose that day (Mar 28: the 28th from then on). A configuration of a later start
        -- (pending), or one whose start never became a period (rewound into recorded
        -- periods, which won), says nothing of p_start's grid and is passed over.
        FOR v_anchor, v_interval IN
            SELECT c.period_start, c.period_interval FROM meter.period_config_changes c
            WHERE c.namespace = p_namespace AND c.account_id = p_account_id
            ORDER BY c.change_id DESC
        LOOP
            EXIT WHEN v_interval::text <> p_interval::text;
            CONTINUE WHEN v_anchor > p_start
                          OR NOT EXISTS (SELECT 1 FROM meter.periods p
                                         WHERE p.namespace = p_namespace
                                           AND p.account_id = p_account_id
                                           AND p.period_start = v_anchor
                                           AND p.opened_at IS NOT NULL);
            v_months := (extract(year FROM p_start) * 12 + extract(month FROM p_start))::integer
                        - (extract(year FROM v_anchor) * 12 + extract(month FROM v_anchor))::integer;
            v_month_end := extract(day FROM v_anchor + 1) = 1;
            -- off this grid (opened by hand on another day): start + interval. A month's
            -- last day is on the grid of every month's last day, which p_start is.
            EXIT WHEN v_months % v_step <> 0
                      OR (NOT v_month_end
                          AND (v_anchor + make_interval(months => v_months))::date <> p_start);
            IF extract(day FROM v_anchor) > extract(day FROM p_start) THEN
                v_next := (v_anchor + make_interval(months => v_months + v_step))::date;
                EXIT;
            END IF;
            EXIT WHEN NOT v_month_end;
        END LOOP;
    END IF;
    SELECT coalesce(min(p.period_start), v_next) INTO v_next FROM meter.periods p
    WHERE p.namespace = p_namespace AND p.account_id = p_account_id
      AND p.period_start > p_start AND p.period_start < v_next AND p.opened_at IS NOT NULL;
    RETURN v_next;
END
$$;
REVOKE EXECUTE ON FUNCTION meter._next_period_start(text, bigint, date, interval) FROM PUBLIC;

-- close_period's body, with one choice: what is available. p_later NULL (a call of
-- close_period): what is available now, as SPEC 3.4 says. Otherwise (roll_periods): what
-- was available at the period's end, p_later being the sum of the account's ledger amounts
-- dated after that end. Locks: as close_period (holds past their TTL with SKIP LOCKED,
-- then the account).
CREATE FUNCTION meter._close_period(p_user_id text, p_event_type text, p_unit text,
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
    -- Holds past their TTL reserve nothing any more: expire them (SKIP LOCKED, so taking
    -- them after the account waits on nothing), or their amount would survive the close.
    IF meter._expire_due(p_namespace, p_user_id, p_event_type, v_resource, p_unit, NULL) THEN
        v_acc := meter._lock_account(p_namespace, p_user_id, p_event_type, v_resource, p_unit);
    END IF;

    v_available := v_acc.balance - v_acc.reserved;
    IF p_later IS NOT NULL THEN
        -- What the period left unused at its end, by the ledger's event times: the balance
        -- without what is dated after the end (p_later, the caller's sum), less what the
        -- holds made by then still held at the end: not past their TTL, and not committed,
        -- released or expired yet (a TTL is at most 86400 s, hence the bound on created_at;
        -- in seconds, since a day on a timestamptz follows the session's TimeZone).
        SELECT v_acc.balance - p_later - coalesce(sum(r.amount), 0) INTO v_available
        FROM meter.reservations r
        WHERE r.namespace = p_namespace AND r.account_id = v_acc.account_id
          AND r.created_at > v_time - interval '86400 seconds' AND r.created_at <= v_time
          AND r.expires_at > v_time AND (r.completed_at IS NULL OR r.completed_at > v_time);
    END IF;
    v_balance := v_acc.balance;
    IF v_available > 0 THEN
        v_carry := CASE WHEN v_acc.carry_over_limit IS NULL THEN v_available
                        ELSE least(v_available, v_acc.carry_over_limit) END;
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
    IF p_later IS NOT NULL THEN
        v_balance := v_balance - p_later;  -- recorded as it stood at the end, after the close
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
REVOKE EXECUTE ON FUNCTION meter._close_period(text, text, text, text, date, text, numeric)
    FROM PUBLIC;

-- Close a billing period (SPEC 3.4): expire what is available above the carry-over limit,
-- carry the rest. Unchanged; the body moved to meter._close_period.
CREATE OR REPLACE FUNCTION meter.close_period(p_user_id text, p_event_type text, p_unit text,
                                   p_resource text, p_period_end date,
                                   p_namespace text DEFAULT 'default')
RETURNS TABLE (expired numeric, carried_over numeric, new_balance numeric)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN QUERY SELECT * FROM meter._close_period(p_user_id, p_event_type, p_unit,
                                                   p_resource, p_period_end, p_namespace,
                                                   NULL);
END
$$;

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
    v_again boolean;
    v_later numeric;
    v_end timestamptz;
    v_close_end timestamptz;
    v_close_to date;
    v_move_to date;
    v_opened boolean;
    v_current_end date;
    v_posted numeric;
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
        v_later := NULL;
        LOOP
            EXIT WHEN v_steps >= p_batch_size;
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
                    IF v_month <= v_today AND to_regclass(
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
                   OR v_acc.period_start > v_today THEN
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
                    IF v_next > v_today THEN
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
    END LOOP;

    IF coalesce(v_actor, '') = '' THEN
        PERFORM set_config('meter.actor_id', coalesce(v_actor, ''), true);
    END IF;
END
$$;
