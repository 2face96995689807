-- Recording: allocate, consume, adjust, reserve, commit, release.
--
-- Shape of every write (docs/internals.md):
--   1. guard the tenant, validate every argument, create the ledger partition the row needs;
--   2. lock: the reservation row (commit, release), then the account row;
--   3. if an idempotency key was given, look it up: the same request replays its stored
--      result, a different one is refused (MT002);
--   4. apply: update the account and append the ledger row;
--   5. claim the key with the result. A concurrent *identical* request cannot get here too,
--      because it waits on the account lock in step 2 and then finds the key in step 3; a
--      concurrent *different* request with the same key waits on the key's unique index
--      here and is refused (MT002), its effects rolled back with its transaction.
-- Reads of the key happen after the account lock, so under READ COMMITTED they see every
-- transaction that held the lock before.

------------------------------------------------------------------------------------------
-- Internal helpers (SECURITY INVOKER: they run with the rights of the API function calling
-- them and are not granted to anyone).

-- Find and lock an account; create it first when p_create. Returns NULL fields when it does
-- not exist and p_create is false.
CREATE FUNCTION meter._lock_account(p_namespace text, p_user_id text, p_event_type text,
                                    p_resource text, p_unit text, p_create boolean)
RETURNS meter.accounts
LANGUAGE plpgsql AS $$
DECLARE
    v meter.accounts;
BEGIN
    SELECT * INTO v FROM meter.accounts a
    WHERE a.namespace = p_namespace AND coalesce(a.user_id, '') = coalesce(p_user_id, '')
      AND a.event_type = p_event_type AND a.resource = p_resource AND a.unit = p_unit
    FOR UPDATE;
    IF FOUND OR NOT p_create THEN
        RETURN v;
    END IF;
    INSERT INTO meter.accounts (namespace, user_id, event_type, resource, unit)
    VALUES (p_namespace, p_user_id, p_event_type, p_resource, p_unit)
    ON CONFLICT DO NOTHING;
    SELECT * INTO v FROM meter.accounts a
    WHERE a.namespace = p_namespace AND coalesce(a.user_id, '') = coalesce(p_user_id, '')
      AND a.event_type = p_event_type AND a.resource = p_resource AND a.unit = p_unit
    FOR UPDATE;
    RETURN v;
END
$$;

-- The stored result of an idempotency key: NULL when the key is new, the result when it was
-- used for the same request, MT002 when it was used for a different one.
CREATE FUNCTION meter._replay(p_namespace text, p_key text, p_operation text,
                              p_request_hash text) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v meter.idempotency_keys;
BEGIN
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

-- Claim a key for an effect just applied. Fails (MT002) when another transaction claimed it
-- first, which can only be a different request (see the header).
CREATE FUNCTION meter._claim(p_namespace text, p_key text, p_operation text,
                             p_request_hash text, p_result jsonb, p_account_id bigint,
                             p_reservation_id text DEFAULT NULL) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO meter.idempotency_keys
        (namespace, key, operation, request_hash, result, account_id, reservation_id)
    VALUES (p_namespace, p_key, p_operation, p_request_hash, p_result, p_account_id,
            p_reservation_id)
    ON CONFLICT DO NOTHING;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'idempotency_key: % was used concurrently for a different request',
                        quote_literal(p_key)
            USING ERRCODE = 'MT002', COLUMN = 'idempotency_key';
    END IF;
END
$$;

-- A stable fingerprint of a request: equal for equal arguments after normalisation (amounts
-- without trailing zeros, timestamps in UTC, resource ''), different otherwise.
CREATE FUNCTION meter._hash(VARIADIC p_parts text[]) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT md5(array_to_string(p_parts, chr(31), chr(30)))
$$;

-- Append a ledger row to a locked account and move its balance (and reserved, for commits).
CREATE FUNCTION meter._post(p_namespace text, p_account_id bigint, p_entry_type text,
                            p_amount numeric, p_event_time timestamptz, p_idempotency_key text,
                            p_reservation_id text, p_reference_id bigint, p_metadata jsonb,
                            p_reserved_delta numeric DEFAULT 0,
                            OUT entry_id bigint, OUT balance numeric, OUT reserved numeric)
LANGUAGE plpgsql AS $$
DECLARE
    a record;
    v_id bigint := nextval('meter.ledger_id_seq');
BEGIN
    UPDATE meter.accounts t
    SET balance = t.balance + p_amount,
        reserved = t.reserved + p_reserved_delta,
        total_credited = t.total_credited + greatest(p_amount, 0),
        total_debited = t.total_debited + greatest(-p_amount, 0),
        updated_at = now()
    WHERE t.namespace = p_namespace AND t.account_id = p_account_id
    RETURNING t.user_id, t.event_type, t.resource, t.unit, t.balance, t.reserved INTO a;

    INSERT INTO meter.ledger (id, namespace, account_id, user_id, event_type, resource, unit,
                              entry_type, amount, balance_after, event_time, idempotency_key,
                              reservation_id, reference_id, actor_id, on_behalf_of, reason,
                              request_id, metadata)
    VALUES (v_id, p_namespace, p_account_id, a.user_id, a.event_type, a.resource, a.unit,
            p_entry_type, p_amount, a.balance, p_event_time, p_idempotency_key,
            p_reservation_id, p_reference_id,
            nullif(current_setting('meter.actor_id', true), ''),
            nullif(current_setting('meter.on_behalf_of', true), ''),
            nullif(current_setting('meter.reason', true), ''),
            nullif(current_setting('meter.request_id', true), ''),
            p_metadata);
    entry_id := v_id;
    balance := a.balance;
    reserved := a.reserved;
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

------------------------------------------------------------------------------------------
-- allocate: add quota or credits. Pools (user_id NULL) allowed. Creates the account.
-- Locks: the account.
CREATE FUNCTION meter.allocate(p_user_id text, p_event_type text, p_amount numeric,
                               p_unit text, p_resource text DEFAULT NULL,
                               p_idempotency_key text DEFAULT NULL,
                               p_event_time timestamptz DEFAULT NULL,
                               p_metadata jsonb DEFAULT NULL,
                               p_namespace text DEFAULT 'default')
RETURNS TABLE (balance numeric, entry_id bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_resource text := meter._resource(p_resource);
    v_amount numeric;
    v_time timestamptz;
    v_hash text;
    v_acc meter.accounts;
    v_replay jsonb;
    v_post record;
BEGIN
    PERFORM meter._guard(p_namespace);
    PERFORM meter._ident('user_id', p_user_id, 256, true),
            meter._ident('event_type', p_event_type, 256),
            meter._ident('unit', p_unit, 64),
            meter._metadata(p_metadata);
    v_amount := meter._amount('amount', p_amount, 'positive');
    v_time := meter._ledger_time('event_time', p_event_time);
    IF p_idempotency_key IS NOT NULL THEN
        PERFORM meter._ident('idempotency_key', p_idempotency_key, 256);
        v_hash := meter._hash('allocate', p_user_id, p_event_type, v_resource, p_unit,
                              v_amount::text, (p_event_time AT TIME ZONE 'UTC')::text,
                              p_metadata::text);
    END IF;

    v_acc := meter._lock_account(p_namespace, p_user_id, p_event_type, v_resource, p_unit, true);

    IF p_idempotency_key IS NOT NULL THEN
        v_replay := meter._replay(p_namespace, p_idempotency_key, 'allocate', v_hash);
        IF v_replay IS NOT NULL THEN
            balance := (v_replay->>'balance')::numeric;
            entry_id := (v_replay->>'entry_id')::bigint;
            RETURN NEXT;
            RETURN;
        END IF;
    END IF;

    v_post := meter._post(p_namespace, v_acc.account_id, 'allocation', v_amount, v_time,
                          p_idempotency_key, NULL, NULL, p_metadata);
    balance := v_post.balance;
    entry_id := v_post.entry_id;
    IF p_idempotency_key IS NOT NULL THEN
        PERFORM meter._claim(p_namespace, p_idempotency_key, 'allocate', v_hash,
                             jsonb_build_object('balance', balance, 'entry_id', entry_id),
                             v_acc.account_id);
    END IF;
    RETURN NEXT;
END
$$;

------------------------------------------------------------------------------------------
-- consume: record usage. With p_check_balance, refuses (success=false, nothing written, no
-- account created) when available < amount; without, may drive the balance negative.
-- Locks: the account.
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
    v_resource text := meter._resource(p_resource);
    v_check boolean := coalesce(p_check_balance, false);
    v_amount numeric;
    v_time timestamptz;
    v_hash text;
    v_acc meter.accounts;
    v_replay jsonb;
    v_post record;
BEGIN
    PERFORM meter._guard(p_namespace);
    PERFORM meter._ident('user_id', p_user_id, 256),
            meter._ident('event_type', p_event_type, 256),
            meter._ident('unit', p_unit, 64),
            meter._metadata(p_metadata);
    v_amount := meter._amount('amount', p_amount, 'positive');
    v_time := meter._ledger_time('event_time', p_event_time);
    IF p_idempotency_key IS NOT NULL THEN
        PERFORM meter._ident('idempotency_key', p_idempotency_key, 256);
        v_hash := meter._hash('consume', p_user_id, p_event_type, v_resource, p_unit,
                              v_amount::text, v_check::text,
                              (p_event_time AT TIME ZONE 'UTC')::text, p_metadata::text);
    END IF;

    v_acc := meter._lock_account(p_namespace, p_user_id, p_event_type, v_resource, p_unit,
                                 NOT v_check);

    IF p_idempotency_key IS NOT NULL THEN
        v_replay := meter._replay(p_namespace, p_idempotency_key, 'consume', v_hash);
        IF v_replay IS NOT NULL THEN
            success := (v_replay->>'success')::boolean;
            balance := (v_replay->>'balance')::numeric;
            available := (v_replay->>'available')::numeric;
            entry_id := (v_replay->>'entry_id')::bigint;
            RETURN NEXT;
            RETURN;
        END IF;
    END IF;

    IF v_acc.account_id IS NULL THEN
        -- checked consume on an account that does not exist: nothing is available
        success := false; balance := 0; available := 0; entry_id := NULL;
        RETURN NEXT;
        RETURN;
    END IF;
    IF v_check AND v_acc.balance - v_acc.reserved < v_amount THEN
        success := false;
        balance := v_acc.balance;
        available := v_acc.balance - v_acc.reserved;
        entry_id := NULL;
        RETURN NEXT;
        RETURN;
    END IF;

    v_post := meter._post(p_namespace, v_acc.account_id, 'consumption', -v_amount, v_time,
                          p_idempotency_key, NULL, NULL, p_metadata);
    success := true;
    balance := v_post.balance;
    available := v_post.balance - v_post.reserved;
    entry_id := v_post.entry_id;
    IF p_idempotency_key IS NOT NULL THEN
        PERFORM meter._claim(p_namespace, p_idempotency_key, 'consume', v_hash,
                             jsonb_build_object('success', true, 'balance', balance,
                                                'available', available, 'entry_id', entry_id),
                             v_acc.account_id);
    END IF;
    RETURN NEXT;
END
$$;

------------------------------------------------------------------------------------------
-- adjust: a correction or refund, either sign, never 0; may drive the balance negative.
-- p_reference_id, when given, must be a ledger entry of this namespace.
-- Locks: the account.
CREATE FUNCTION meter.adjust(p_user_id text, p_event_type text, p_amount numeric,
                             p_unit text, p_resource text DEFAULT NULL,
                             p_reference_id bigint DEFAULT NULL,
                             p_idempotency_key text DEFAULT NULL,
                             p_metadata jsonb DEFAULT NULL,
                             p_namespace text DEFAULT 'default')
RETURNS TABLE (balance numeric, entry_id bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_resource text := meter._resource(p_resource);
    v_amount numeric;
    v_time timestamptz;
    v_hash text;
    v_acc meter.accounts;
    v_replay jsonb;
    v_post record;
BEGIN
    PERFORM meter._guard(p_namespace);
    PERFORM meter._ident('user_id', p_user_id, 256, true),
            meter._ident('event_type', p_event_type, 256),
            meter._ident('unit', p_unit, 64),
            meter._metadata(p_metadata);
    v_amount := meter._amount('amount', p_amount, 'nonzero');
    IF p_reference_id IS NOT NULL AND NOT EXISTS (
        SELECT 1 FROM meter.ledger l WHERE l.namespace = p_namespace AND l.id = p_reference_id)
    THEN
        PERFORM meter._fail('MT003', 'reference_id',
            format('no ledger entry %s in this namespace', p_reference_id));
    END IF;
    v_time := meter._ledger_time('event_time', NULL);
    IF p_idempotency_key IS NOT NULL THEN
        PERFORM meter._ident('idempotency_key', p_idempotency_key, 256);
        v_hash := meter._hash('adjust', p_user_id, p_event_type, v_resource, p_unit,
                              v_amount::text, p_reference_id::text, p_metadata::text);
    END IF;

    v_acc := meter._lock_account(p_namespace, p_user_id, p_event_type, v_resource, p_unit, true);

    IF p_idempotency_key IS NOT NULL THEN
        v_replay := meter._replay(p_namespace, p_idempotency_key, 'adjust', v_hash);
        IF v_replay IS NOT NULL THEN
            balance := (v_replay->>'balance')::numeric;
            entry_id := (v_replay->>'entry_id')::bigint;
            RETURN NEXT;
            RETURN;
        END IF;
    END IF;

    v_post := meter._post(p_namespace, v_acc.account_id, 'adjustment', v_amount, v_time,
                          p_idempotency_key, NULL, p_reference_id, p_metadata);
    balance := v_post.balance;
    entry_id := v_post.entry_id;
    IF p_idempotency_key IS NOT NULL THEN
        PERFORM meter._claim(p_namespace, p_idempotency_key, 'adjust', v_hash,
                             jsonb_build_object('balance', balance, 'entry_id', entry_id),
                             v_acc.account_id);
    END IF;
    RETURN NEXT;
END
$$;

------------------------------------------------------------------------------------------
-- reserve: hold quota for work whose size is known later. Granted only when
-- available >= amount; raises `reserved`, not `balance`; no ledger row. A not-granted
-- reserve writes nothing (no account, no key). p_reservation_id (client-chosen) is the
-- reserve's own idempotency key: the same request replays, a different one is MT002.
-- Locks: the account (the new reservation row is inserted after it).
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
    v_resource text := meter._resource(p_resource);
    v_ttl integer := coalesce(p_ttl_seconds, 300);
    v_amount numeric;
    v_hash text;
    v_acc meter.accounts;
    v_existing meter.reservations;
    v_replay jsonb;
    v_hold record;
    v_id text;
    v_result jsonb;
BEGIN
    PERFORM meter._guard(p_namespace);
    PERFORM meter._ident('user_id', p_user_id, 256),
            meter._ident('event_type', p_event_type, 256),
            meter._ident('unit', p_unit, 64),
            meter._ident('reservation_id', p_reservation_id, 128, true),
            meter._ident('idempotency_key', p_idempotency_key, 256, true),
            meter._metadata(p_metadata);
    v_amount := meter._amount('amount', p_amount, 'positive');
    IF v_ttl < 1 OR v_ttl > 86400 THEN
        PERFORM meter._fail('MT001', 'ttl_seconds',
                            format('must be between 1 and 86400, got %s', v_ttl));
    END IF;
    v_hash := meter._hash('reserve', p_user_id, p_event_type, v_resource, p_unit,
                          v_amount::text, v_ttl::text, p_metadata::text, p_reservation_id,
                          p_idempotency_key);

    v_acc := meter._lock_account(p_namespace, p_user_id, p_event_type, v_resource, p_unit, false);

    IF p_reservation_id IS NOT NULL THEN
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

    IF v_acc.account_id IS NULL OR v_acc.balance - v_acc.reserved < v_amount THEN
        granted := false;
        reservation_id := NULL;
        balance := coalesce(v_acc.balance, 0);
        available := coalesce(v_acc.balance - v_acc.reserved, 0);
        expires_at := NULL;
        RETURN NEXT;
        RETURN;
    END IF;

    v_id := coalesce(p_reservation_id, gen_random_uuid()::text);
    v_hold := meter._hold(p_namespace, v_acc.account_id, v_amount);
    granted := true;
    reservation_id := v_id;
    balance := v_hold.balance;
    available := v_hold.balance - v_hold.reserved;
    expires_at := now() + make_interval(secs => v_ttl);
    v_result := jsonb_build_object('reservation_id', v_id, 'balance', balance,
                                   'available', available, 'expires_at', expires_at);

    INSERT INTO meter.reservations AS r
        (namespace, reservation_id, account_id, user_id, event_type, resource, unit, amount,
         ttl_seconds, expires_at, idempotency_key, metadata, request_hash, reserve_result, actor)
    VALUES (p_namespace, v_id, v_acc.account_id, p_user_id, p_event_type, v_resource, p_unit,
            v_amount, v_ttl, expires_at, p_idempotency_key, p_metadata, v_hash, v_result,
            meter._actor())
    ON CONFLICT DO NOTHING;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'reservation_id: % was used concurrently for a different reservation',
                        quote_literal(v_id)
            USING ERRCODE = 'MT002', COLUMN = 'reservation_id';
    END IF;
    IF p_idempotency_key IS NOT NULL THEN
        PERFORM meter._claim(p_namespace, p_idempotency_key, 'reserve', v_hash, v_result,
                             v_acc.account_id, v_id);
    END IF;
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
    v_return numeric;
    v_post record;
    v_now timestamptz := now();
BEGIN
    PERFORM meter._guard(p_namespace);
    PERFORM meter._ident('reservation_id', p_reservation_id, 128),
            meter._metadata(p_metadata);
    v_actual := meter._amount('actual_amount', p_actual_amount, 'nonnegative');
    PERFORM meter._ledger_time('event_time', NULL);
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
        consumed := (v_res.commit_result->>'consumed')::numeric;
        released := (v_res.commit_result->>'released')::numeric;
        reserved_amount := v_res.amount;
        balance := (v_res.commit_result->>'balance')::numeric;
        entry_id := (v_res.commit_result->>'entry_id')::bigint;
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
    v_return := CASE WHEN v_res.status = 'active' THEN -v_res.amount ELSE 0 END;
    PERFORM 1 FROM meter.accounts a
    WHERE a.namespace = p_namespace AND a.account_id = v_res.account_id
    FOR UPDATE;
    IF v_actual > 0 THEN
        v_post := meter._post(p_namespace, v_res.account_id, 'consumption', -v_actual, v_now,
                              NULL, p_reservation_id, NULL,
                              coalesce(p_metadata, v_res.metadata), v_return);
    ELSE
        SELECT NULL::bigint AS entry_id, h.balance, h.reserved INTO v_post
        FROM meter._hold(p_namespace, v_res.account_id, v_return) h;
    END IF;

    success := true;
    consumed := v_actual;
    released := CASE WHEN v_late THEN 0 ELSE greatest(v_res.amount - v_actual, 0) END;
    reserved_amount := v_res.amount;
    balance := v_post.balance;
    entry_id := v_post.entry_id;
    status := CASE WHEN v_late THEN 'late' ELSE 'committed' END;

    UPDATE meter.reservations r
    SET status = 'committed', completed_at = v_now, actual_amount = v_actual,
        entry_id = v_post.entry_id, commit_request_hash = v_hash,
        commit_result = jsonb_build_object('consumed', v_actual, 'released', released,
                                           'balance', v_post.balance,
                                           'entry_id', v_post.entry_id, 'late', v_late),
        completed_actor = meter._actor()
    WHERE r.namespace = p_namespace AND r.reservation_id = p_reservation_id;
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
