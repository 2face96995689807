-- A delivery that waited for the same event is reported replayed, not applied.
--
-- Why (found by a failed `make test`, then reproduced): meter._apply_one, the one-by-one
-- path of apply_events (every single-event task), decided 'replayed' or 'applied' by
-- looking the idempotency key up before it called the API function. Two deliveries of the
-- same keyed event at once (a producer's retry, a message redelivered after a restart, two
-- worker children) both looked before either had committed; the second then waited in
-- consume for the key's lock and replayed the first's result, as it must (one ledger row,
-- one claim), but was reported 'applied'. The units were right; the task's status, the
-- producer's result and the worker's meter_events_total were not.
--
-- Now meter._replay, which looks a key up under its lock, says so when it replays (the
-- transaction-local setting meter.replayed), and _apply_one reports what it said. A
-- reserve's client-chosen id is looked up after taking the id's lock, which reserve takes
-- first too. A first version locked the key in _apply_one before the call (review: that
-- came before the month lock consume, allocate and adjust take first, a deadlock with a
-- direct call dated in a new month; it let one tenant's event wait on another's key; and
-- a batch's fast path, which claims keys without that lock, could still slip between
-- look-up and call). _apply_one now checks the tenant before it locks a reservation id
-- (the API functions check it themselves otherwise, so other events pay nothing more).
-- Migrations once applied are never edited, so 004's _replay and 008's _apply_one are
-- replaced whole; only the lines these comments name changed.

-- Lock an idempotency key and return its stored result (004's), saying when it replays.
CREATE OR REPLACE FUNCTION meter._replay(p_namespace text, p_key text, p_operation text,
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
    PERFORM set_config('meter.replayed', 'on', true);  -- for meter._apply_one's status
    RETURN v.result;
END
$$;

-- Apply one event through its op's API function (008's). Returns {status, result}: status
-- 'applied', 'replayed', 'refused' or 'not_found'. Raises what the function raises.
CREATE OR REPLACE FUNCTION meter._apply_one(p_event jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_op text := p_event->>'op';
    v_ns text := p_event->>'namespace';
    a jsonb := p_event->'args';
    v_meta jsonb;
    v_bad text;
    v_seen boolean := false;
    v_result jsonb;
    v_status text;
BEGIN
    IF jsonb_typeof(p_event) IS DISTINCT FROM 'object' THEN
        PERFORM meter._fail('MT001', 'event', 'must be a JSON object');
    END IF;
    IF meter._event_args(v_op) IS NULL THEN
        PERFORM meter._fail('MT001', 'op', format('unknown operation %s', coalesce(v_op, 'NULL')));
    END IF;
    IF jsonb_typeof(a) IS DISTINCT FROM 'object' THEN
        PERFORM meter._fail('MT001', 'args', 'must be a JSON object');
    END IF;
    SELECT k INTO v_bad FROM jsonb_object_keys(a) k
    WHERE k <> ALL (meter._event_args(v_op)) LIMIT 1;
    IF v_bad IS NOT NULL THEN
        PERFORM meter._fail('MT001', 'args', format('%s does not take %s', v_op, v_bad));
    END IF;
    v_meta := CASE WHEN jsonb_typeof(a->'metadata') = 'null' THEN NULL ELSE a->'metadata' END;
    -- Whether the event was seen before is decided under the lock its API function takes:
    -- a delivery that waited for a concurrent one of the same event then sees it
    -- committed. A reserve's client-chosen id is locked here first, as reserve does first
    -- (it dates no ledger row, so no month lock comes before it), and only for the
    -- caller's own tenant. An idempotency key's replay is reported by meter._replay itself,
    -- under the key's lock, through meter.replayed: locking the key here would come before
    -- the month lock that consume, allocate and adjust take first (a deadlock).
    IF v_op = 'reserve' AND a->>'reservation_id' IS NOT NULL THEN
        PERFORM meter._guard(v_ns);
        PERFORM meter._lock_key(v_ns, 'reservation', a->>'reservation_id');
    END IF;
    PERFORM set_config('meter.replayed', '', true);

    CASE v_op
    WHEN 'consume' THEN
        SELECT to_jsonb(r) INTO v_result
        FROM meter.consume(a->>'user_id', a->>'event_type', meter._num('amount', a->>'amount'),
                           a->>'unit', a->>'resource',
                           coalesce(meter._bool('check_balance', a->'check_balance'), false),
                           a->>'idempotency_key', meter._time('event_time', a->>'event_time'),
                           v_meta, v_ns) r;
        v_status := CASE WHEN NOT (v_result->>'success')::boolean THEN 'refused'
                         WHEN v_seen OR current_setting('meter.replayed', true) = 'on'
                              THEN 'replayed' ELSE 'applied' END;
    WHEN 'allocate' THEN
        SELECT to_jsonb(r) INTO v_result
        FROM meter.allocate(a->>'user_id', a->>'event_type', meter._num('amount', a->>'amount'),
                            a->>'unit', a->>'resource', a->>'idempotency_key',
                            meter._time('event_time', a->>'event_time'), v_meta, v_ns) r;
        v_status := CASE WHEN v_seen OR current_setting('meter.replayed', true) = 'on'
                              THEN 'replayed' ELSE 'applied' END;
    WHEN 'adjust' THEN
        SELECT to_jsonb(r) INTO v_result
        FROM meter.adjust(a->>'user_id', a->>'event_type', meter._num('amount', a->>'amount'),
                          a->>'unit', a->>'resource',
                          meter._int('reference_id', a->>'reference_id'),
                          a->>'idempotency_key', v_meta, v_ns) r;
        v_status := CASE WHEN v_seen OR current_setting('meter.replayed', true) = 'on'
                              THEN 'replayed' ELSE 'applied' END;
    WHEN 'reserve' THEN
        IF a->>'reservation_id' IS NOT NULL THEN
            v_seen := v_seen OR EXISTS (SELECT 1 FROM meter.reservations r
                                        WHERE r.namespace = v_ns
                                          AND r.reservation_id = a->>'reservation_id');
        END IF;
        SELECT to_jsonb(r) INTO v_result
        FROM meter.reserve(a->>'user_id', a->>'event_type', meter._num('amount', a->>'amount'),
                           a->>'unit', a->>'resource',
                           coalesce(meter._int('ttl_seconds', a->>'ttl_seconds')::integer, 300),
                           a->>'idempotency_key', v_meta, v_ns, a->>'reservation_id') r;
        v_status := CASE WHEN NOT (v_result->>'granted')::boolean THEN 'refused'
                         WHEN v_seen OR current_setting('meter.replayed', true) = 'on'
                              THEN 'replayed' ELSE 'applied' END;
    WHEN 'commit' THEN
        SELECT to_jsonb(r) INTO v_result
        FROM meter.commit(a->>'reservation_id',
                          meter._num('actual_amount', a->>'actual_amount'), v_meta, v_ns) r;
        v_status := CASE v_result->>'status'
                        WHEN 'not_found' THEN 'not_found'
                        WHEN 'replayed' THEN 'replayed'
                        WHEN 'released' THEN 'refused'
                        ELSE 'applied' END;
    WHEN 'release' THEN
        PERFORM meter._guard(v_ns);
        PERFORM meter._ident('reservation_id', a->>'reservation_id', 128);
        IF NOT EXISTS (SELECT 1 FROM meter.reservations r
                       WHERE r.namespace = v_ns AND r.reservation_id = a->>'reservation_id') THEN
            v_status := 'not_found';
            v_result := jsonb_build_object('released', false);
        ELSE
            v_result := jsonb_build_object('released',
                                           meter.release(a->>'reservation_id', v_ns));
            v_status := CASE WHEN (v_result->>'released')::boolean THEN 'applied'
                             ELSE 'replayed' END;
        END IF;
    END CASE;
    RETURN jsonb_build_object('status', v_status, 'result', v_result);
END
$$;
