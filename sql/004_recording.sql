-- Recording: allocate, consume, adjust, reserve, commit, release.
--
-- Shape of every write (docs/internals.md):
--   1. guard the tenant, validate every argument, create the ledger partition the row needs;
--   2. when an idempotency key (or a client-chosen reservation id) is given, take a
--      transaction advisory lock on its hash, then look it up: the same request replays its
--      stored result, a different one is refused (MT002). The lock makes concurrent requests
--      with one key queue behind each other, so each sees the one before it committed;
--   3. lock the reservation row (commit, release);
--   4. apply in one statement: update the account (which takes its row lock, and carries the
--      balance condition of a checked consume or a reserve), append the ledger row, and claim
--      the key with the result.
-- Lock order: key advisory lock(s) (reservation id before idempotency key), reservation row,
-- account row. One account per call; the sweep takes several in account_id order.
-- Everything is in the caller's transaction: a refusal raised anywhere undoes it all.

------------------------------------------------------------------------------------------
-- Internal helpers (SECURITY INVOKER: they run with the rights of the API function calling
-- them and are granted to no one).

-- Serialize the requests that share an idempotency key (or reservation id) until commit.
-- A 64-bit hash: a collision only makes two unrelated requests wait for each other.
CREATE FUNCTION meter._lock_key(p_namespace text, p_kind text, p_key text) RETURNS void
LANGUAGE sql AS $$
    SELECT pg_advisory_xact_lock(hashtextextended(p_kind || chr(31) || p_namespace || chr(31) || p_key, 0))
$$;

-- Lock an idempotency key (meter._lock_key) and return its stored result: NULL when the key
-- is new, the result when it was used for the same request, MT002 when it was used for a
-- different one. The lock is held to commit, so the caller's effect and claim follow safely.
CREATE FUNCTION meter._replay(p_namespace text, p_key text, p_operation text,
                              p_request_hash text) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v meter.idempotency_keys;
BEGIN
    PERFORM meter._lock_key(p_namespace, 'key', p_key);
    SELECT * INTO v FROM meter.idempotency_keys k
    WHERE k.namespace = p_namespace AND k.key = p_key;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF v.operation <> p_operation OR v.request_hash <> p_request_hash THEN
        RAISE EXCEPTION 'idempotency_key: % was already used for a different % request',
                        quote_literal(p_key), v.operation
            USING ERRCODE = 'MT002', COLUMN = 'idempotency_key';
    END IF;
    RETURN v.result;
END
$$;

-- A stable fingerprint of a request: equal for equal arguments after normalisation (amounts
-- without trailing zeros, timestamps in UTC, resource ''), different otherwise.
CREATE FUNCTION meter._hash(VARIADIC p_parts text[]) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT md5(array_to_string(p_parts, chr(31), chr(30)))
$$;

-- Create an account if it does not exist yet (zero balance).
CREATE FUNCTION meter._create_account(p_namespace text, p_user_id text, p_event_type text,
                                      p_resource text, p_unit text) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO meter.accounts (namespace, user_id, event_type, resource, unit)
    VALUES (p_namespace, p_user_id, p_event_type, p_resource, p_unit)
    ON CONFLICT DO NOTHING
$$;

-- Find and lock an account (for the period functions, which decide on its figures before
-- writing). NULL fields when it does not exist.
CREATE FUNCTION meter._lock_account(p_namespace text, p_user_id text, p_event_type text,
                                    p_resource text, p_unit text)
RETURNS meter.accounts
LANGUAGE plpgsql AS $$
DECLARE
    v meter.accounts;
BEGIN
    SELECT * INTO v FROM meter.accounts a
    WHERE a.namespace = p_namespace AND coalesce(a.user_id, '') = coalesce(p_user_id, '')
      AND a.event_type = p_event_type AND a.resource = p_resource AND a.unit = p_unit
    FOR UPDATE;
    RETURN v;
END
$$;

-- Apply one ledger entry to the account with this key, in one statement: move the balance
-- (taking the account's row lock), append the ledger row, and claim the idempotency key with
-- the result {balance, reserved, entry_id}. An unchecked entry (p_min_available NULL) creates
-- the account when it does not exist yet; a checked one applies nothing and returns NULLs
-- when the account does not exist or has less than p_min_available available.
CREATE FUNCTION meter._apply(p_namespace text, p_user_id text, p_event_type text,
                             p_resource text, p_unit text, p_entry_type text, p_amount numeric,
                             p_event_time timestamptz, p_min_available numeric,
                             p_reference_id bigint, p_metadata jsonb, p_key text,
                             p_operation text, p_hash text,
                             OUT entry_id bigint, OUT balance numeric, OUT reserved numeric)
LANGUAGE plpgsql AS $$
DECLARE
    v_lost boolean;
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
        EXIT WHEN entry_id IS NOT NULL OR p_min_available IS NOT NULL;
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
    EXIT WHEN entry_id IS NOT NULL OR p_min_available IS NOT NULL;
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

-- Append a ledger row to the account with this id and move its balance (and its reserved
-- amount by p_reserved_delta), in one statement. Used where the account is known by id
-- (commit, periods).
CREATE FUNCTION meter._post(p_namespace text, p_account_id bigint, p_entry_type text,
                            p_amount numeric, p_event_time timestamptz,
                            p_reservation_id text, p_metadata jsonb,
                            p_reserved_delta numeric DEFAULT 0,
                            OUT entry_id bigint, OUT balance numeric, OUT reserved numeric)
LANGUAGE plpgsql AS $$
BEGIN
    WITH acc AS (
        UPDATE meter.accounts t
        SET balance = t.balance + p_amount,
            reserved = t.reserved + p_reserved_delta,
            total_credited = t.total_credited + greatest(p_amount, 0),
            total_debited = t.total_debited + greatest(-p_amount, 0),
            updated_at = now()
        WHERE t.namespace = p_namespace AND t.account_id = p_account_id
        RETURNING t.account_id, t.user_id, t.event_type, t.resource, t.unit, t.balance,
                  t.reserved
    ), led AS (
        INSERT INTO meter.ledger (id, namespace, account_id, user_id, event_type, resource, unit,
                                  entry_type, amount, balance_after, event_time, reservation_id,
                                  actor_id, on_behalf_of, reason, request_id, metadata)
        SELECT nextval('meter.ledger_id_seq'), p_namespace, acc.account_id, acc.user_id,
               acc.event_type, acc.resource, acc.unit, p_entry_type, p_amount, acc.balance,
               p_event_time, p_reservation_id,
               nullif(current_setting('meter.actor_id', true), ''),
               nullif(current_setting('meter.on_behalf_of', true), ''),
               nullif(current_setting('meter.reason', true), ''),
               nullif(current_setting('meter.request_id', true), ''),
               p_metadata
        FROM acc
        WHERE p_amount <> 0
        RETURNING id
    )
    SELECT (SELECT led.id FROM led), acc.balance, acc.reserved
    INTO entry_id, balance, reserved FROM acc;
END
$$;

-- Move an account's reserved amount without a ledger row (holds taken and returned).
CREATE FUNCTION meter._hold(p_namespace text, p_account_id bigint, p_delta numeric,
                            OUT balance numeric, OUT reserved numeric)
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE meter.accounts t
    SET reserved = t.reserved + p_delta, updated_at = now()
    WHERE t.namespace = p_namespace AND t.account_id = p_account_id
    RETURNING t.balance, t.reserved INTO balance, reserved;
END
$$;

-- The account's current figures, unlocked (for reporting a refusal): zeros when unknown.
CREATE FUNCTION meter._peek(p_namespace text, p_user_id text, p_event_type text,
                            p_resource text, p_unit text,
                            OUT known boolean, OUT balance numeric, OUT reserved numeric)
LANGUAGE plpgsql STABLE AS $$
BEGIN
    SELECT true, a.balance, a.reserved INTO known, balance, reserved
    FROM meter.accounts a
    WHERE a.namespace = p_namespace AND coalesce(a.user_id, '') = coalesce(p_user_id, '')
      AND a.event_type = p_event_type AND a.resource = p_resource AND a.unit = p_unit;
    IF NOT FOUND THEN
        known := false; balance := 0; reserved := 0;
    END IF;
END
$$;

------------------------------------------------------------------------------------------
-- allocate: add quota or credits. Pools (user_id NULL) allowed. Creates the account.
-- Locks: the key's advisory lock, then the account.
CREATE FUNCTION meter.allocate(p_user_id text, p_event_type text, p_amount numeric,
                               p_unit text, p_resource text DEFAULT NULL,
                               p_idempotency_key text DEFAULT NULL,
                               p_event_time timestamptz DEFAULT NULL,
                               p_metadata jsonb DEFAULT NULL,
                               p_namespace text DEFAULT 'default')
RETURNS TABLE (balance numeric, entry_id bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_resource text;
    v_amount numeric;
    v_time timestamptz;
    v_hash text;
    v_replay jsonb;
    v_post record;
BEGIN
    -- Fast path: every check in one expression. Otherwise one by one, for the refusal.
    IF meter._fast_ok(p_namespace, p_user_id, true, p_event_type, p_unit, p_resource)
       AND (p_idempotency_key IS NULL OR meter._plain_ok(p_idempotency_key, 256))
       AND meter._metadata_ok(p_metadata) AND meter._amount_plain(p_amount, 'positive') THEN
        v_resource := coalesce(p_resource, '');
        v_amount := trim_scale(p_amount);
    ELSE
        v_resource := meter._resource(p_resource);
        PERFORM meter._guard(p_namespace);
        PERFORM meter._ident('user_id', p_user_id, 256, true),
                meter._ident('event_type', p_event_type, 256),
                meter._ident('unit', p_unit, 64),
                meter._ident('idempotency_key', p_idempotency_key, 256, true),
                meter._metadata(p_metadata);
        v_amount := meter._amount('amount', p_amount, 'positive');
    END IF;
    v_time := CASE WHEN p_event_time IS NULL AND meter._now_ok() THEN now()
                   ELSE meter._ledger_time('event_time', p_event_time) END;
    IF p_idempotency_key IS NOT NULL THEN
        v_hash := meter._hash('allocate', p_user_id, p_event_type, v_resource, p_unit,
                              v_amount::text, (p_event_time AT TIME ZONE 'UTC')::text,
                              p_metadata::text);
        v_replay := meter._replay(p_namespace, p_idempotency_key, 'allocate', v_hash);
        IF v_replay IS NOT NULL THEN
            balance := (v_replay->>'balance')::numeric;
            entry_id := (v_replay->>'entry_id')::bigint;
            RETURN NEXT;
            RETURN;
        END IF;
    END IF;

    v_post := meter._apply(p_namespace, p_user_id, p_event_type, v_resource, p_unit,
                           'allocation', v_amount, v_time, NULL, NULL, p_metadata,
                           p_idempotency_key, 'allocate', v_hash);
    balance := v_post.balance;
    entry_id := v_post.entry_id;
    RETURN NEXT;
END
$$;

------------------------------------------------------------------------------------------
-- consume: record usage. With p_check_balance, refuses (success=false, nothing written, no
-- account created, no key claimed) when available < amount; without, may drive the balance
-- negative, creating the account if needed.
-- Locks: the key's advisory lock, then the account.
CREATE FUNCTION meter.consume(p_user_id text, p_event_type text, p_amount numeric,
                              p_unit text, p_resource text DEFAULT NULL,
                              p_check_balance boolean DEFAULT false,
                              p_idempotency_key text DEFAULT NULL,
                              p_event_time timestamptz DEFAULT NULL,
                              p_metadata jsonb DEFAULT NULL,
                              p_namespace text DEFAULT 'default')
RETURNS TABLE (success boolean, balance numeric, available numeric, entry_id bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_resource text;
    v_check boolean := coalesce(p_check_balance, false);
    v_amount numeric;
    v_time timestamptz;
    v_hash text;
    v_replay jsonb;
    v_post record;
    v_peek record;
BEGIN
    -- Fast path: every check in one expression. Otherwise one by one, for the refusal.
    IF meter._fast_ok(p_namespace, p_user_id, false, p_event_type, p_unit, p_resource)
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
                meter._ident('idempotency_key', p_idempotency_key, 256, true),
                meter._metadata(p_metadata);
        v_amount := meter._amount('amount', p_amount, 'positive');
    END IF;
    v_time := CASE WHEN p_event_time IS NULL AND meter._now_ok() THEN now()
                   ELSE meter._ledger_time('event_time', p_event_time) END;
    IF p_idempotency_key IS NOT NULL THEN
        v_hash := meter._hash('consume', p_user_id, p_event_type, v_resource, p_unit,
                              v_amount::text, v_check::text,
                              (p_event_time AT TIME ZONE 'UTC')::text, p_metadata::text);
        v_replay := meter._replay(p_namespace, p_idempotency_key, 'consume', v_hash);
        IF v_replay IS NOT NULL THEN
            success := true;
            balance := (v_replay->>'balance')::numeric;
            available := balance - (v_replay->>'reserved')::numeric;
            entry_id := (v_replay->>'entry_id')::bigint;
            RETURN NEXT;
            RETURN;
        END IF;
    END IF;

    v_post := meter._apply(p_namespace, p_user_id, p_event_type, v_resource, p_unit,
                           'consumption', -v_amount, v_time,
                           CASE WHEN v_check THEN v_amount END, NULL, p_metadata,
                           p_idempotency_key, 'consume', v_hash);
    IF v_post.entry_id IS NULL THEN
        -- refused by the balance check (or no such account): report what is there
        v_peek := meter._peek(p_namespace, p_user_id, p_event_type, v_resource, p_unit);
        success := false;
        balance := v_peek.balance;
        available := v_peek.balance - v_peek.reserved;
        entry_id := NULL;
        RETURN NEXT;
        RETURN;
    END IF;
    success := true;
    balance := v_post.balance;
    available := v_post.balance - v_post.reserved;
    entry_id := v_post.entry_id;
    RETURN NEXT;
END
$$;

------------------------------------------------------------------------------------------
-- adjust: a correction or refund, either sign, never 0; may drive the balance negative.
-- p_reference_id, when given, must be a ledger entry of this namespace (MT003 otherwise).
-- Locks: the key's advisory lock, then the account.
CREATE FUNCTION meter.adjust(p_user_id text, p_event_type text, p_amount numeric,
                             p_unit text, p_resource text DEFAULT NULL,
                             p_reference_id bigint DEFAULT NULL,
                             p_idempotency_key text DEFAULT NULL,
                             p_metadata jsonb DEFAULT NULL,
                             p_namespace text DEFAULT 'default')
RETURNS TABLE (balance numeric, entry_id bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_resource text;
    v_amount numeric;
    v_time timestamptz;
    v_hash text;
    v_replay jsonb;
    v_post record;
BEGIN
    -- Fast path: every check in one expression. Otherwise one by one, for the refusal.
    IF meter._fast_ok(p_namespace, p_user_id, true, p_event_type, p_unit, p_resource)
       AND (p_idempotency_key IS NULL OR meter._plain_ok(p_idempotency_key, 256))
       AND meter._metadata_ok(p_metadata) AND meter._amount_plain(p_amount, 'nonzero') THEN
        v_resource := coalesce(p_resource, '');
        v_amount := trim_scale(p_amount);
    ELSE
        v_resource := meter._resource(p_resource);
        PERFORM meter._guard(p_namespace);
        PERFORM meter._ident('user_id', p_user_id, 256, true),
                meter._ident('event_type', p_event_type, 256),
                meter._ident('unit', p_unit, 64),
                meter._ident('idempotency_key', p_idempotency_key, 256, true),
                meter._metadata(p_metadata);
        v_amount := meter._amount('amount', p_amount, 'nonzero');
    END IF;
    IF p_reference_id IS NOT NULL AND NOT EXISTS (
        SELECT 1 FROM meter.ledger l WHERE l.namespace = p_namespace AND l.id = p_reference_id)
    THEN
        PERFORM meter._fail('MT003', 'reference_id',
            format('no ledger entry %s in this namespace', p_reference_id));
    END IF;
    v_time := CASE WHEN meter._now_ok() THEN now() ELSE meter._ledger_time('event_time', NULL) END;
    IF p_idempotency_key IS NOT NULL THEN
        v_hash := meter._hash('adjust', p_user_id, p_event_type, v_resource, p_unit,
                              v_amount::text, p_reference_id::text, p_metadata::text);
        v_replay := meter._replay(p_namespace, p_idempotency_key, 'adjust', v_hash);
        IF v_replay IS NOT NULL THEN
            balance := (v_replay->>'balance')::numeric;
            entry_id := (v_replay->>'entry_id')::bigint;
            RETURN NEXT;
            RETURN;
        END IF;
    END IF;

    v_post := meter._apply(p_namespace, p_user_id, p_event_type, v_resource, p_unit,
                           'adjustment', v_amount, v_time, NULL, p_reference_id,
                           p_metadata, p_idempotency_key, 'adjust', v_hash);
    balance := v_post.balance;
    entry_id := v_post.entry_id;
    RETURN NEXT;
END
$$;

------------------------------------------------------------------------------------------
-- reserve: hold quota for work whose size is known later. Granted only when
-- available >= amount; raises `reserved`, not `balance`; no ledger row. A not-granted
-- reserve writes nothing (no account, no key). p_reservation_id (client-chosen) is the
-- reserve's own idempotency key: the same request replays, a different one is MT002.
-- Locks: the reservation id's advisory lock, the key's, then the account.
CREATE FUNCTION meter.reserve(p_user_id text, p_event_type text, p_amount numeric,
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

------------------------------------------------------------------------------------------
-- commit: consume the actual amount of a hold and return the hold.
--   active, before expires_at -> status 'committed': one consumption row for actual (none
--       when 0), hold returned, released = max(hold - actual, 0);
--   expired (swept, or expires_at passed) -> status 'late': the usage is still recorded,
--       the hold returned if the sweep had not yet, released = 0;
--   committed -> 'replayed' with the original figures when actual (and metadata) match,
--       MT002 otherwise;
--   released -> success=false, 'released'; unknown -> success=false, 'not_found'.
-- actual may exceed the hold and may drive the balance negative.
-- Locks: the reservation, then its account.
CREATE FUNCTION meter.commit(p_reservation_id text, p_actual_amount numeric,
                             p_metadata jsonb DEFAULT NULL,
                             p_namespace text DEFAULT 'default')
RETURNS TABLE (success boolean, consumed numeric, released numeric, reserved_amount numeric,
               balance numeric, entry_id bigint, status text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_actual numeric;
    v_hash text;
    v_res meter.reservations;
    v_late boolean;
    v_released numeric;
    v_post record;
    v_now timestamptz := now();
BEGIN
    -- Fast path: every check in one expression. Otherwise one by one, for the refusal.
    IF current_setting('meter.tenant', true) = p_namespace
       AND meter._plain_ok(p_namespace, 1024)
       AND meter._plain_ok(p_reservation_id, 128)
       AND meter._metadata_ok(p_metadata)
       AND meter._amount_plain(p_actual_amount, 'nonnegative') THEN
        v_actual := trim_scale(p_actual_amount);
    ELSE
        PERFORM meter._guard(p_namespace);
        PERFORM meter._ident('reservation_id', p_reservation_id, 128),
                meter._metadata(p_metadata);
        v_actual := meter._amount('actual_amount', p_actual_amount, 'nonnegative');
    END IF;
    IF NOT meter._now_ok() THEN
        PERFORM meter._ledger_time('event_time', NULL);
    END IF;
    v_hash := meter._hash('commit', v_actual::text, p_metadata::text);

    SELECT * INTO v_res FROM meter.reservations r
    WHERE r.namespace = p_namespace AND r.reservation_id = p_reservation_id
    FOR UPDATE;
    IF NOT FOUND THEN
        success := false; status := 'not_found';
        RETURN NEXT;
        RETURN;
    END IF;

    IF v_res.status = 'committed' THEN
        IF v_res.commit_request_hash <> v_hash THEN
            RAISE EXCEPTION 'actual_amount: reservation % was already committed with actual amount %',
                            quote_literal(p_reservation_id), v_res.actual_amount
                USING ERRCODE = 'MT002', COLUMN = 'actual_amount';
        END IF;
        success := true;
        consumed := v_res.actual_amount;
        released := (v_res.commit_result->>'released')::numeric;
        reserved_amount := v_res.amount;
        balance := (v_res.commit_result->>'balance')::numeric;
        entry_id := v_res.entry_id;
        status := 'replayed';
        RETURN NEXT;
        RETURN;
    END IF;
    IF v_res.status = 'released' THEN
        success := false; reserved_amount := v_res.amount; status := 'released';
        RETURN NEXT;
        RETURN;
    END IF;

    -- active or expired: the usage happened and is recorded
    v_late := v_res.status = 'expired' OR v_now >= v_res.expires_at;
    v_released := CASE WHEN v_late THEN 0 ELSE greatest(v_res.amount - v_actual, 0) END;
    v_post := meter._post(p_namespace, v_res.account_id, 'consumption', -v_actual, v_now,
                          p_reservation_id, coalesce(p_metadata, v_res.metadata),
                          CASE WHEN v_res.status = 'active' THEN -v_res.amount ELSE 0 END);
    UPDATE meter.reservations r
    SET status = 'committed', completed_at = v_now, actual_amount = v_actual,
        entry_id = v_post.entry_id, commit_request_hash = v_hash,
        commit_result = jsonb_build_object('released', v_released, 'balance', v_post.balance,
                                           'late', v_late),
        completed_actor = meter._actor()
    WHERE r.namespace = p_namespace AND r.reservation_id = p_reservation_id;

    success := true;
    consumed := v_actual;
    released := v_released;
    reserved_amount := v_res.amount;
    balance := v_post.balance;
    entry_id := v_post.entry_id;
    status := CASE WHEN v_late THEN 'late' ELSE 'committed' END;
    RETURN NEXT;
END
$$;

------------------------------------------------------------------------------------------
-- release: drop an active hold; balance unchanged; no ledger row. Returns false for a hold
-- that is not active (released, expired, committed, unknown). A hold whose TTL has passed
-- but that the sweep has not reached yet is expired here (actor system:expiry), and false
-- is returned.
-- Locks: the reservation, then its account.
CREATE FUNCTION meter.release(p_reservation_id text, p_namespace text DEFAULT 'default')
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_res meter.reservations;
    v_expired boolean;
BEGIN
    PERFORM meter._guard(p_namespace);
    PERFORM meter._ident('reservation_id', p_reservation_id, 128);

    SELECT * INTO v_res FROM meter.reservations r
    WHERE r.namespace = p_namespace AND r.reservation_id = p_reservation_id
    FOR UPDATE;
    IF NOT FOUND OR v_res.status <> 'active' THEN
        RETURN false;
    END IF;
    v_expired := now() >= v_res.expires_at;
    PERFORM meter._hold(p_namespace, v_res.account_id, -v_res.amount);
    UPDATE meter.reservations r
    SET status = CASE WHEN v_expired THEN 'expired' ELSE 'released' END,
        completed_at = now(),
        completed_actor = CASE WHEN v_expired THEN '{"actor_id": "system:expiry"}'::jsonb
                               ELSE meter._actor() END
    WHERE r.namespace = p_namespace AND r.reservation_id = p_reservation_id;
    RETURN NOT v_expired;
END
$$;

REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA meter FROM PUBLIC;
