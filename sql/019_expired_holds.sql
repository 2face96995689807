-- A hold past its TTL reserves nothing, swept or not.
--
-- Why: Appendix C says a hold is expired once now() >= expires_at, swept or not, and
-- `reserved` is what active holds reserve. But accounts.reserved keeps an expired hold's
-- amount until the sweep (beat) reaches it, and three decisions read it: a checked consume
-- and a reserve were refused for quota that expired holds no longer held, and close_period
-- left their amount out of what it expires, so it survived the close (found by an audit:
-- carry_over_limit 0, an expired hold of 30, and 30 was still there after the close and the
-- sweep).
--
-- Now:
-- - meter._expire_due expires an account's active holds past their TTL, as the sweep does
--   (status 'expired', actor system:expiry, the amount back to available). It locks the
--   holds with SKIP LOCKED (a hold being committed or released right now is left to that
--   call), then the account: the sweep's order, and it never waits on a hold, so it cannot
--   deadlock with a caller holding the account either.
-- - A checked consume (meter._apply) or a reserve that is refused expires the account's
--   due holds, if that frees enough for it, and tries once more: a refusal still changes
--   nothing (SPEC: a refused consume "changes nothing"). The call that succeeds at once
--   pays nothing.
-- - close_period expires them before it reads what is available (not on a repeat, which
--   changes nothing).
-- - A refusal reports `available` without expired holds (meter._peek), so the figure it
--   gives is what a next call can really have.
-- Migrations once applied are never edited, so the functions are replaced whole; only
-- the lines marked by the comments above changed.

-- The account's current figures, unlocked (for reporting a refusal): zeros when unknown.
-- `reserved` leaves out holds past their TTL, which reserve nothing any more.
CREATE OR REPLACE FUNCTION meter._peek(p_namespace text, p_user_id text, p_event_type text,
                                       p_resource text, p_unit text,
                                       OUT known boolean, OUT balance numeric,
                                       OUT reserved numeric)
LANGUAGE plpgsql STABLE AS $$
BEGIN
    SELECT true, a.balance,
           a.reserved - coalesce((SELECT sum(r.amount) FROM meter.reservations r
                                  WHERE r.namespace = a.namespace
                                    AND r.account_id = a.account_id
                                    AND r.status = 'active' AND r.expires_at <= now()), 0)
    INTO known, balance, reserved
    FROM meter.accounts a
    WHERE a.namespace = p_namespace AND coalesce(a.user_id, '') = coalesce(p_user_id, '')
      AND a.event_type = p_event_type AND a.resource = p_resource AND a.unit = p_unit;
    IF NOT FOUND THEN
        known := false; balance := 0; reserved := 0;
    END IF;
END
$$;

-- Expire the active holds of one account whose TTL has passed, when that frees enough:
-- with p_needed, only if available would then reach p_needed (otherwise nothing changes);
-- with p_needed NULL, always. True when it expired any.
-- Locks: those holds (SKIP LOCKED), then the account.
CREATE FUNCTION meter._expire_due(p_namespace text, p_user_id text, p_event_type text,
                                  p_resource text, p_unit text, p_needed numeric)
RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_account bigint;
    v_ids text[];
    v_total numeric;
    v_available numeric;
BEGIN
    SELECT a.account_id INTO v_account FROM meter.accounts a
    WHERE a.namespace = p_namespace AND coalesce(a.user_id, '') = coalesce(p_user_id, '')
      AND a.event_type = p_event_type AND a.resource = p_resource AND a.unit = p_unit
      AND a.reserved > 0;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    SELECT array_agg(d.reservation_id), sum(d.amount) INTO v_ids, v_total
    FROM (SELECT r.reservation_id, r.amount FROM meter.reservations r
          WHERE r.namespace = p_namespace AND r.account_id = v_account
            AND r.status = 'active' AND r.expires_at <= now()
          FOR UPDATE SKIP LOCKED) d;
    IF v_total IS NULL THEN
        RETURN false;
    END IF;
    SELECT a.balance - a.reserved INTO v_available FROM meter.accounts a
    WHERE a.namespace = p_namespace AND a.account_id = v_account
    FOR UPDATE;
    IF p_needed IS NOT NULL AND v_available + v_total < p_needed THEN
        RETURN false;  -- still not enough: a refusal changes nothing
    END IF;
    UPDATE meter.reservations r
    SET status = 'expired', completed_at = now(),
        completed_actor = '{"actor_id": "system:expiry"}'::jsonb
    WHERE r.namespace = p_namespace AND r.reservation_id = ANY (v_ids);
    UPDATE meter.accounts a SET reserved = a.reserved - v_total, updated_at = now()
    WHERE a.namespace = p_namespace AND a.account_id = v_account;
    RETURN true;
END
$$;
REVOKE EXECUTE ON FUNCTION meter._expire_due(text, text, text, text, text, numeric) FROM PUBLIC;

CREATE OR REPLACE FUNCTION meter._apply(p_namespace text, p_user_id text, p_event_type text,
                             p_resource text, p_unit text, p_entry_type text, p_amount numeric,
                             p_event_time timestamptz, p_min_available numeric,
                             p_reference_id bigint, p_metadata jsonb, p_key text,
                             p_operation text, p_hash text,
                             OUT entry_id bigint, OUT balance numeric, OUT reserved numeric)
LANGUAGE plpgsql AS $$
DECLARE
    v_lost boolean;
    v_swept boolean := false;
BEGIN
    LOOP
    IF p_key IS NULL THEN
        -- Without a key, the same statement minus the claim: an idle ModifyTable on
        -- idempotency_keys still costs its set-up in every execution.
        WITH acc AS (
            UPDATE meter.accounts t
            SET balance = t.balance + p_amount,
                total_credited = t.total_credited + greatest(p_amount, 0),
                total_debited = t.total_debited + greatest(-p_amount, 0),
                updated_at = now()
            WHERE t.namespace = p_namespace AND coalesce(t.user_id, '') = coalesce(p_user_id, '')
              AND t.event_type = p_event_type AND t.resource = p_resource AND t.unit = p_unit
              AND (p_min_available IS NULL OR t.balance - t.reserved >= p_min_available)
            RETURNING t.account_id, t.balance, t.reserved
        )
        INSERT INTO meter.ledger (id, namespace, account_id, user_id, event_type, resource, unit,
                                  entry_type, amount, balance_after, event_time, reference_id,
                                  actor_id, on_behalf_of, reason, request_id, metadata)
        SELECT nextval('meter.ledger_id_seq'), p_namespace, acc.account_id, p_user_id,
               p_event_type, p_resource, p_unit, p_entry_type, p_amount, acc.balance,
               p_event_time, p_reference_id,
               nullif(current_setting('meter.actor_id', true), ''),
               nullif(current_setting('meter.on_behalf_of', true), ''),
               nullif(current_setting('meter.reason', true), ''),
               nullif(current_setting('meter.request_id', true), ''),
               p_metadata
        FROM acc
        RETURNING id, balance_after, (SELECT acc.reserved FROM acc)
        INTO entry_id, balance, reserved;
        EXIT WHEN entry_id IS NOT NULL;
        IF p_min_available IS NOT NULL THEN
            -- refused: holds past their TTL reserve nothing any more; once, expire them
            EXIT WHEN v_swept OR NOT meter._expire_due(p_namespace, p_user_id, p_event_type,
                                                       p_resource, p_unit, p_min_available);
            v_swept := true;
            CONTINUE;
        END IF;
        PERFORM meter._create_account(p_namespace, p_user_id, p_event_type, p_resource, p_unit);
        CONTINUE;
    END IF;
    WITH acc AS (
        UPDATE meter.accounts t
        SET balance = t.balance + p_amount,
            total_credited = t.total_credited + greatest(p_amount, 0),
            total_debited = t.total_debited + greatest(-p_amount, 0),
            updated_at = now()
        WHERE t.namespace = p_namespace AND coalesce(t.user_id, '') = coalesce(p_user_id, '')
          AND t.event_type = p_event_type AND t.resource = p_resource AND t.unit = p_unit
          AND (p_min_available IS NULL OR t.balance - t.reserved >= p_min_available)
        RETURNING t.account_id, t.balance, t.reserved
    ), led AS (
        INSERT INTO meter.ledger (id, namespace, account_id, user_id, event_type, resource, unit,
                                  entry_type, amount, balance_after, event_time, idempotency_key,
                                  reference_id, actor_id, on_behalf_of, reason, request_id,
                                  metadata)
        SELECT nextval('meter.ledger_id_seq'), p_namespace, acc.account_id, p_user_id,
               p_event_type, p_resource, p_unit, p_entry_type, p_amount, acc.balance,
               p_event_time, p_key, p_reference_id,
               nullif(current_setting('meter.actor_id', true), ''),
               nullif(current_setting('meter.on_behalf_of', true), ''),
               nullif(current_setting('meter.reason', true), ''),
               nullif(current_setting('meter.request_id', true), ''),
               p_metadata
        FROM acc
        RETURNING id
    ), claim AS (
        INSERT INTO meter.idempotency_keys
            (namespace, key, operation, request_hash, result, account_id)
        SELECT p_namespace, p_key, p_operation, p_hash,
               jsonb_build_object('balance', acc.balance, 'reserved', acc.reserved,
                                  'entry_id', led.id),
               acc.account_id
        FROM acc, led
        WHERE p_key IS NOT NULL
        ON CONFLICT DO NOTHING
        RETURNING 1
    )
    SELECT led.id, acc.balance, acc.reserved,
           p_key IS NOT NULL AND NOT EXISTS (SELECT FROM claim)
    INTO entry_id, balance, reserved, v_lost FROM acc, led;
    EXIT WHEN entry_id IS NOT NULL;
    IF p_min_available IS NOT NULL THEN
        EXIT WHEN v_swept OR NOT meter._expire_due(p_namespace, p_user_id, p_event_type,
                                                   p_resource, p_unit, p_min_available);
        v_swept := true;
        CONTINUE;
    END IF;
    PERFORM meter._create_account(p_namespace, p_user_id, p_event_type, p_resource, p_unit);
    END LOOP;
    IF v_lost THEN
        -- Another path (a batch) claimed the key after our look-up; retrying replays it.
        RAISE EXCEPTION 'idempotency_key: % was claimed concurrently; retry to replay it',
                        quote_literal(p_key)
            USING ERRCODE = '40001', COLUMN = 'idempotency_key';
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION meter.reserve(p_user_id text, p_event_type text, p_amount numeric,
                              p_unit text, p_resource text DEFAULT NULL,
                              p_ttl_seconds integer DEFAULT 300,
                              p_idempotency_key text DEFAULT NULL,
                              p_metadata jsonb DEFAULT NULL,
                              p_namespace text DEFAULT 'default',
                              p_reservation_id text DEFAULT NULL)
RETURNS TABLE (granted boolean, reservation_id text, balance numeric, available numeric,
               expires_at timestamptz)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_resource text;
    v_ttl integer := coalesce(p_ttl_seconds, 300);
    v_amount numeric;
    v_hash text;
    v_existing meter.reservations;
    v_replay jsonb;
    v_id text;
    v_expires timestamptz;
    v_peek record;
    v_lost boolean;
    v_swept boolean := false;
BEGIN
    -- Fast path: every check in one expression. Otherwise one by one, for the refusal.
    IF meter._fast_ok(p_namespace, p_user_id, false, p_event_type, p_unit, p_resource)
       AND (p_reservation_id IS NULL OR meter._plain_ok(p_reservation_id, 128))
       AND (p_idempotency_key IS NULL OR meter._plain_ok(p_idempotency_key, 256))
       AND meter._metadata_ok(p_metadata) AND meter._amount_plain(p_amount, 'positive') THEN
        v_resource := coalesce(p_resource, '');
        v_amount := trim_scale(p_amount);
    ELSE
        v_resource := meter._resource(p_resource);
        PERFORM meter._guard(p_namespace);
        PERFORM meter._ident('user_id', p_user_id, 256),
                meter._ident('event_type', p_event_type, 256),
                meter._ident('unit', p_unit, 64),
                meter._ident('reservation_id', p_reservation_id, 128, true),
                meter._ident('idempotency_key', p_idempotency_key, 256, true),
                meter._metadata(p_metadata);
        v_amount := meter._amount('amount', p_amount, 'positive');
    END IF;
    IF v_ttl < 1 OR v_ttl > 86400 THEN
        PERFORM meter._fail('MT001', 'ttl_seconds',
                            format('must be between 1 and 86400, got %s', v_ttl));
    END IF;
    v_hash := meter._hash('reserve', p_user_id, p_event_type, v_resource, p_unit,
                          v_amount::text, v_ttl::text, p_metadata::text, p_reservation_id,
                          p_idempotency_key);

    IF p_reservation_id IS NOT NULL THEN
        PERFORM meter._lock_key(p_namespace, 'reservation', p_reservation_id);
        SELECT * INTO v_existing FROM meter.reservations r
        WHERE r.namespace = p_namespace AND r.reservation_id = p_reservation_id;
        IF FOUND THEN
            IF v_existing.request_hash <> v_hash THEN
                RAISE EXCEPTION 'reservation_id: % was already used for a different reservation',
                                quote_literal(p_reservation_id)
                    USING ERRCODE = 'MT002', COLUMN = 'reservation_id';
            END IF;
            v_replay := v_existing.reserve_result;
        END IF;
    END IF;
    IF v_replay IS NULL AND p_idempotency_key IS NOT NULL THEN
        v_replay := meter._replay(p_namespace, p_idempotency_key, 'reserve', v_hash);
    END IF;
    IF v_replay IS NOT NULL THEN
        granted := true;
        reservation_id := v_replay->>'reservation_id';
        balance := (v_replay->>'balance')::numeric;
        available := (v_replay->>'available')::numeric;
        expires_at := (v_replay->>'expires_at')::timestamptz;
        RETURN NEXT;
        RETURN;
    END IF;

    v_id := coalesce(p_reservation_id, gen_random_uuid()::text);
    v_expires := now() + make_interval(secs => v_ttl);
    LOOP
        WITH acc AS (
            UPDATE meter.accounts t
            SET reserved = t.reserved + v_amount, updated_at = now()
            WHERE t.namespace = p_namespace AND coalesce(t.user_id, '') = p_user_id
              AND t.event_type = p_event_type AND t.resource = v_resource AND t.unit = p_unit
              AND t.balance - t.reserved >= v_amount
            RETURNING t.account_id, t.balance, t.reserved
        ), hold AS (
            INSERT INTO meter.reservations
                (namespace, reservation_id, account_id, user_id, event_type, resource, unit, amount,
                 ttl_seconds, expires_at, idempotency_key, metadata, request_hash, reserve_result,
                 actor)
            SELECT p_namespace, v_id, acc.account_id, p_user_id, p_event_type, v_resource, p_unit,
                   v_amount, v_ttl, v_expires, p_idempotency_key, p_metadata, v_hash,
                   jsonb_build_object('reservation_id', v_id, 'balance', acc.balance,
                                      'available', acc.balance - acc.reserved,
                                      'expires_at', v_expires),
                   meter._actor()
            FROM acc
            RETURNING reserve_result
        ), claim AS (
            INSERT INTO meter.idempotency_keys
                (namespace, key, operation, request_hash, result, account_id, reservation_id)
            SELECT p_namespace, p_idempotency_key, 'reserve', v_hash, hold.reserve_result,
                   acc.account_id, v_id
            FROM acc, hold
            WHERE p_idempotency_key IS NOT NULL
            ON CONFLICT DO NOTHING
            RETURNING 1
        )
        SELECT acc.balance, acc.balance - acc.reserved,
               p_idempotency_key IS NOT NULL AND NOT EXISTS (SELECT FROM claim)
        INTO balance, available, v_lost FROM acc, hold;
        -- not granted: holds past their TTL reserve nothing any more; once, expire them
        EXIT WHEN balance IS NOT NULL OR v_swept
                  OR NOT meter._expire_due(p_namespace, p_user_id, p_event_type, v_resource,
                                           p_unit, v_amount);
        v_swept := true;
    END LOOP;
    IF v_lost THEN
        RAISE EXCEPTION 'idempotency_key: % was claimed concurrently; retry to replay it',
                        quote_literal(p_idempotency_key)
            USING ERRCODE = '40001', COLUMN = 'idempotency_key';
    END IF;

    IF balance IS NULL THEN
        v_peek := meter._peek(p_namespace, p_user_id, p_event_type, v_resource, p_unit);
        granted := false;
        reservation_id := NULL;
        balance := v_peek.balance;
        available := v_peek.balance - v_peek.reserved;
        expires_at := NULL;
        RETURN NEXT;
        RETURN;
    END IF;
    granted := true;
    reservation_id := v_id;
    expires_at := v_expires;
    RETURN NEXT;
END
$$;

CREATE OR REPLACE FUNCTION meter.close_period(p_user_id text, p_event_type text, p_unit text,
                                   p_resource text, p_period_end date,
                                   p_namespace text DEFAULT 'default')
RETURNS TABLE (expired numeric, carried_over numeric, new_balance numeric)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
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
