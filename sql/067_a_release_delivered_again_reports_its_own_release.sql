-- A release delivered again after it applied reports true, not false, to the same event.
--
-- Why (a review of the pipeline's results): a release's message whose worker committed the
-- release and then died (or lost Redis) before storing the result and acking was
-- delivered again; the second application found the hold no longer active, and the false
-- of meter.release was stored: the producer's wait() read False for a release that
-- happened, by that very message. Nothing recorded which event released a hold (the
-- worker sets no actor context), so the second delivery could not tell its own release
-- from another caller's, or from an expiry or a commit.
--
-- Now a release event may carry an idempotency_key (the worker derives one from its task,
-- task:<id> or task:<batch>:<idx>, as for the keyed ops; a producer may send its own),
-- which the release that releases the hold records in the new column
-- reservations.release_key, in the same transaction. A release of a hold no longer active
-- whose status is 'released' with that same key returns released = true, status
-- 'replayed'. A hold released by anyone else (the SDK, another message: no key or another
-- one), expired, or committed still gives false. An event without a key is as before.
--
-- The key is only matched against the hold's release_key, never claimed in
-- meter.idempotency_keys: it lives as long as the reservation row, and it is scoped to its
-- hold. The same key given to the releases of two holds releases each (one release of
-- each: nor is there anything to replay), and a key another op claimed (a consume's)
-- neither conflicts with a release nor replays one; a hold released under one key reports
-- false to a release under another, and a hold expired or committed to any. Its length is
-- checked as every idempotency key's (MT001 naming idempotency_key past 256 characters).
--
-- Migrations once applied are never edited: 008's _event_args and 032's _apply_one are
-- replaced whole; only the lines marked 067 changed. Locks: as before (release takes the
-- reservation, then its account; the UPDATE touches the reservation row it holds).

ALTER TABLE meter.reservations ADD COLUMN release_key text;  -- the event that released it

-- The arguments each op accepts in an event's "args" (008's; 067: release takes a key).
CREATE OR REPLACE FUNCTION meter._event_args(p_op text) RETURNS text[]
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE p_op
        WHEN 'consume'  THEN ARRAY['user_id', 'event_type', 'amount', 'unit', 'resource',
                                   'check_balance', 'idempotency_key', 'event_time', 'metadata']
        WHEN 'allocate' THEN ARRAY['user_id', 'event_type', 'amount', 'unit', 'resource',
                                   'idempotency_key', 'event_time', 'metadata']
        WHEN 'adjust'   THEN ARRAY['user_id', 'event_type', 'amount', 'unit', 'resource',
                                   'reference_id', 'idempotency_key', 'metadata']
        WHEN 'reserve'  THEN ARRAY['user_id', 'event_type', 'amount', 'unit', 'resource',
                                   'ttl_seconds', 'idempotency_key', 'metadata',
                                   'reservation_id']
        WHEN 'commit'   THEN ARRAY['reservation_id', 'actual_amount', 'metadata']
        WHEN 'release'  THEN ARRAY['reservation_id', 'idempotency_key']  -- 067
    END
$$;

-- Apply one event through its op's API function (032's; the lines marked 067 are new). Returns {status, result}: status
-- 'applied', 'replayed', 'refused' or 'not_found'. Raises what the function raises.
CREATE OR REPLACE FUNCTION meter._apply_one(p_event jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_op text := p_event->>'op';
    v_ns text := p_event->>'namespace';
    a jsonb := p_event->'args';
    v_meta jsonb;
    v_bad text;
    v_type text;
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
    -- 032: each argument in the JSON type it takes (text in a string, a number as a string
    -- or a JSON number); metadata and check_balance are named by their own checks
    SELECT x.k, jsonb_typeof(x.v) INTO v_bad, v_type FROM jsonb_each(a) x(k, v)
    WHERE NOT meter._arg_type_ok(x.k, x.v)
    ORDER BY x.k LIMIT 1;
    IF v_bad IS NOT NULL THEN
        PERFORM meter._fail('MT001', v_bad,
                            format('must be %s, got a JSON %s',
                                   CASE WHEN v_bad IN ('amount', 'actual_amount', 'ttl_seconds',
                                                       'reference_id')
                                        THEN 'a number or a string' ELSE 'a string' END,
                                   v_type));
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
                           coalesce(meter._ttl_seconds(a->>'ttl_seconds'), 300),
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
        PERFORM meter._ident('idempotency_key', a->>'idempotency_key', 256, true);  -- 067
        IF NOT EXISTS (SELECT 1 FROM meter.reservations r
                       WHERE r.namespace = v_ns AND r.reservation_id = a->>'reservation_id') THEN
            v_status := 'not_found';
            v_result := jsonb_build_object('released', false);
        ELSE
            v_seen := meter.release(a->>'reservation_id', v_ns);  -- 067: released now
            IF v_seen AND a->>'idempotency_key' IS NOT NULL THEN  -- 067
                -- 067: under the reservation's lock, which release took
                UPDATE meter.reservations r SET release_key = a->>'idempotency_key'  -- 067
                WHERE r.namespace = v_ns AND r.reservation_id = a->>'reservation_id';  -- 067
            END IF;  -- 067
            -- 067: released before by this very event (its message delivered again, its
            -- reply lost): what it returned then, not the false of a hold no longer active
            v_result := jsonb_build_object('released', v_seen OR (  -- 067
                a->>'idempotency_key' IS NOT NULL  -- 067
                AND EXISTS (SELECT 1 FROM meter.reservations r  -- 067
                            WHERE r.namespace = v_ns  -- 067
                              AND r.reservation_id = a->>'reservation_id'  -- 067
                              AND r.status = 'released'  -- 067
                              AND r.release_key = a->>'idempotency_key')));  -- 067
            v_status := CASE WHEN v_seen THEN 'applied' ELSE 'replayed' END;  -- 067
        END IF;
    END CASE;
    RETURN jsonb_build_object('status', v_status, 'result', v_result);
END
$$;

REVOKE EXECUTE ON FUNCTION meter._event_args(text), meter._apply_one(jsonb) FROM PUBLIC;
