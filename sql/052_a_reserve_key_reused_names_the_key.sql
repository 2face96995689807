-- A reserve whose key was used for another reserve names the key, not a derived id.
--
-- Why (found by a review of the reservation lifecycle, reproduced by
-- test_a_reserve_key_reused_for_another_request_names_the_key): MeterClient.reserve and
-- MeterProducer.reserve give a keyed reserve without a reservation id of the caller's the
-- id meter.types.keyed_reservation_id derives from the namespace and the key. A second
-- reserve under that key with another request (another amount, TTL, account...) finds
-- the first hold by that id before it looks the key up, and was refused with
-- "reservation_id: '<uuid>' was already used for a different reservation", COLUMN
-- reservation_id: a parameter and an id the caller never gave (SPEC 4: messages name the
-- offending parameter). Every other keyed write names idempotency_key.
--
-- What: when the hold found by the id was reserved under this same key, the conflict
-- names idempotency_key, with _replay's message for a reserve ("idempotency_key: 'k' was
-- already used for a different reserve request"). A hold reserved under no key or under
-- another key is still named as reservation_id. SQLSTATE (MT002), what is refused and
-- what is replayed are unchanged; only the lines marked 052 changed.
--
-- Lock order unchanged (019/028): the reservation id's advisory lock, the key's, then
-- the account (and, refused, meter._expire_due's: the account, then its due holds).
-- Migrations once applied are never edited: 028's reserve is replaced whole.

-- reserve (028)
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
    v_account bigint;
    v_due numeric;
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
                -- 052: the hold of this very key (an id derived from the key, as the SDK
                -- and the producer derive it): the caller's reused parameter is the key
                IF v_existing.idempotency_key = p_idempotency_key THEN
                    RAISE EXCEPTION 'idempotency_key: % was already used for a different reserve request',
                                    quote_literal(p_idempotency_key)
                        USING ERRCODE = 'MT002', COLUMN = 'idempotency_key';
                END IF;
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
        SELECT acc.balance, acc.balance - acc.reserved, acc.account_id,
               p_idempotency_key IS NOT NULL AND NOT EXISTS (SELECT FROM claim)
        INTO balance, available, v_account, v_lost FROM acc, hold;
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
    IF balance - available > v_amount THEN
        -- 028: other holds; those past their TTL reserve nothing, and the stored results
        -- (the hold's, the key's) say the same
        v_due := meter._due_held(p_namespace, v_account);  -- by id: cheaper than _peek by key
        IF v_due > 0 THEN
            available := available + v_due;
            UPDATE meter.reservations h
            SET reserve_result = h.reserve_result || jsonb_build_object('available', available)
            WHERE h.namespace = p_namespace AND h.reservation_id = v_id;
            PERFORM meter._restate_claim(p_namespace, p_idempotency_key, 'available', available);
        END IF;
    END IF;
    granted := true;
    reservation_id := v_id;
    expires_at := v_expires;
    RETURN NEXT;
END
$$;

