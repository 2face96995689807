-- A late commit keeps the expiry it came after; a commit conflict names what differs; an
-- adjust replays even after retention dropped the entry it refers to; an event's
-- ttl_seconds past integer's range is refused by name.
--
-- Why (found by two reviews of the rules of SPEC Appendix C and section 3):
-- 1. The audit trail lost a transition. get_audit_events builds a reservation's
--    transitions from its row: 'reservation.active', then one completion from status,
--    completed_at and completed_actor. A hold the sweep (or a write's expiry of due holds,
--    or close_period) had expired, committed late afterwards, showed active -> committed:
--    the expiry by system:expiry was overwritten. Now commit keeps it in two new columns,
--    expired_at and expired_actor, when it completes an expired hold, and
--    get_audit_events lists it as 'reservation.expired' between the two (the seq that
--    orders events of one time is renumbered to make room for it: the order of the others
--    is unchanged). Holds committed
--    late before this migration have lost it for good.
-- 2. A second commit of a reservation with the same actual amount and other metadata was
--    refused (MT002, rightly: metadata counts) with a message and COLUMN naming
--    actual_amount. It now names metadata.
-- 3. adjust checked that p_reference_id is a ledger entry of the namespace before it looked
--    up its idempotency key. Once retention had dropped that entry's month, a replay of
--    the adjustment (a retry, the pipeline's redelivery) was refused, NotFoundError, for
--    a write that had happened. The check now comes after the replay, so it applies only
--    to a new adjustment.
-- 4. apply_events (meter._apply_one) read an event's ttl_seconds as bigint and cast it to
--    integer: past 2^31 the cast failed with 22003 "integer out of range", naming no
--    parameter, in the dead letter. meter._ttl_seconds refuses it as MT001 naming
--    ttl_seconds, with reserve's own message.
-- commit, get_audit_events and adjust are otherwise 004's and 005's, and _apply_one 027's,
-- unchanged; so are their lock orders.

ALTER TABLE meter.reservations
    ADD COLUMN expired_at timestamptz,
    ADD COLUMN expired_actor jsonb;

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
CREATE OR REPLACE FUNCTION meter.commit(p_reservation_id text, p_actual_amount numeric,
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
            IF v_res.actual_amount = v_actual THEN  -- then only the metadata differs
                RAISE EXCEPTION 'metadata: reservation % was already committed with other metadata',
                                quote_literal(p_reservation_id)
                    USING ERRCODE = 'MT002', COLUMN = 'metadata';
            END IF;
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
        completed_actor = meter._actor(),
        -- a late commit of a hold the sweep expired keeps that transition for the audit
        expired_at = CASE WHEN v_res.status = 'expired' THEN v_res.completed_at END,
        expired_actor = CASE WHEN v_res.status = 'expired' THEN v_res.completed_actor END
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

-- One time-ordered trail (newest first) of ledger entries, reservation transitions, period
-- openings/closings and period-config changes, with the actor context of each. Filters are
-- ANDed; NULL means "any". p_limit as in get_ledger.
CREATE OR REPLACE FUNCTION meter.get_audit_events(p_user_id text DEFAULT NULL,
                                       p_actor_id text DEFAULT NULL,
                                       p_kinds text[] DEFAULT NULL,
                                       p_start_time timestamptz DEFAULT NULL,
                                       p_end_time timestamptz DEFAULT NULL,
                                       p_limit integer DEFAULT 100,
                                       p_namespace text DEFAULT 'default')
RETURNS TABLE (kind text, at timestamptz, user_id text, event_type text, resource text,
               unit text, amount numeric, reservation_id text, entry_id bigint,
               actor_id text, on_behalf_of text, reason text, request_id text,
               metadata jsonb)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_limit integer := meter._limit('limit', p_limit, 100, 10000);
BEGIN
    PERFORM meter._guard(p_namespace);
    PERFORM meter._ident('user_id', p_user_id, 256, true),
            meter._ident('actor_id', p_actor_id, 256, true);
    RETURN QUERY
    WITH events AS (
        SELECT 'ledger.' || l.entry_type AS kind, l.created_at AS at, l.user_id, l.event_type,
               l.resource, l.unit, l.amount, l.reservation_id, l.id AS entry_id, l.actor_id,
               l.on_behalf_of, l.reason, l.request_id, l.metadata, 2 AS seq
        FROM meter.ledger l
        WHERE l.namespace = p_namespace
        UNION ALL
        SELECT 'reservation.active', r.created_at, r.user_id, r.event_type, r.resource, r.unit,
               r.amount, r.reservation_id, NULL, r.actor->>'actor_id',
               r.actor->>'on_behalf_of', r.actor->>'reason', r.actor->>'request_id',
               r.metadata, 0
        FROM meter.reservations r
        WHERE r.namespace = p_namespace
        UNION ALL
        SELECT 'reservation.' || r.status, r.completed_at, r.user_id, r.event_type, r.resource,
               r.unit, CASE WHEN r.status = 'committed' THEN r.actual_amount ELSE r.amount END,
               r.reservation_id, r.entry_id, r.completed_actor->>'actor_id',
               r.completed_actor->>'on_behalf_of', r.completed_actor->>'reason',
               r.completed_actor->>'request_id', r.metadata, 3
        FROM meter.reservations r
        WHERE r.namespace = p_namespace AND r.status <> 'active'
        UNION ALL
        -- the sweep's expiry of a hold committed late after it (the row's completion is
        -- the commit's). Its seq puts it after the hold's active and before the commit's
        -- ledger row and completion when they share a time (one transaction).
        SELECT 'reservation.expired', r.expired_at, r.user_id, r.event_type, r.resource,
               r.unit, r.amount, r.reservation_id, NULL, r.expired_actor->>'actor_id',
               r.expired_actor->>'on_behalf_of', r.expired_actor->>'reason',
               r.expired_actor->>'request_id', r.metadata, 1
        FROM meter.reservations r
        WHERE r.namespace = p_namespace AND r.expired_at IS NOT NULL
        UNION ALL
        SELECT 'period.open', p.opened_at, p.user_id, p.event_type, p.resource, p.unit,
               p.allocation, NULL, p.open_entry_id, p.opened_actor->>'actor_id',
               p.opened_actor->>'on_behalf_of', p.opened_actor->>'reason',
               p.opened_actor->>'request_id',
               jsonb_build_object('period_start', p.period_start), 4
        FROM meter.periods p
        WHERE p.namespace = p_namespace AND p.opened_at IS NOT NULL
        UNION ALL
        SELECT 'period.close', p.closed_at, p.user_id, p.event_type, p.resource, p.unit,
               p.expired, NULL, NULL, p.closed_actor->>'actor_id',
               p.closed_actor->>'on_behalf_of', p.closed_actor->>'reason',
               p.closed_actor->>'request_id',
               jsonb_build_object('period_end', p.period_end, 'expired', p.expired,
                                  'carried_over', p.carried_over,
                                  'new_balance', p.close_balance), 5
        FROM meter.periods p
        WHERE p.namespace = p_namespace AND p.closed_at IS NOT NULL
        UNION ALL
        SELECT 'period.config', c.changed_at, c.user_id, c.event_type, c.resource, c.unit,
               c.period_allocation, NULL, NULL, c.actor->>'actor_id',
               c.actor->>'on_behalf_of', c.actor->>'reason', c.actor->>'request_id',
               jsonb_build_object('period_start', c.period_start,
                                  'period_allocation', c.period_allocation,
                                  'carry_over_limit', c.carry_over_limit,
                                  'period_interval', c.period_interval::text), 6
        FROM meter.period_config_changes c
        WHERE c.namespace = p_namespace
    )
    SELECT e.kind, e.at, e.user_id, e.event_type, e.resource, e.unit, e.amount,
           e.reservation_id, e.entry_id, e.actor_id, e.on_behalf_of, e.reason, e.request_id,
           e.metadata
    FROM events e
    WHERE (p_user_id IS NULL OR e.user_id = p_user_id)
      AND (p_actor_id IS NULL OR e.actor_id = p_actor_id)
      AND (p_kinds IS NULL OR e.kind = ANY (p_kinds))
      AND e.at >= coalesce(p_start_time, '-infinity')
      AND e.at < coalesce(p_end_time, 'infinity')
    ORDER BY e.at DESC, e.seq DESC, e.entry_id DESC NULLS LAST
    LIMIT v_limit;
END
$$;

------------------------------------------------------------------------------------------
-- adjust: a correction or refund, either sign, never 0; may drive the balance negative.
-- p_reference_id, when given, must be a ledger entry of this namespace (MT003 otherwise).
-- Locks: the key's advisory lock, then the account.
CREATE OR REPLACE FUNCTION meter.adjust(p_user_id text, p_event_type text, p_amount numeric,
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
    -- After the replay: a replay answers even when retention has dropped the entry since.
    IF p_reference_id IS NOT NULL AND NOT EXISTS (
        SELECT 1 FROM meter.ledger l WHERE l.namespace = p_namespace AND l.id = p_reference_id)
    THEN
        PERFORM meter._fail('MT003', 'reference_id',
            format('no ledger entry %s in this namespace', p_reference_id));
    END IF;

    v_post := meter._apply(p_namespace, p_user_id, p_event_type, v_resource, p_unit,
                           'adjustment', v_amount, v_time, NULL, p_reference_id,
                           p_metadata, p_idempotency_key, 'adjust', v_hash);
    balance := v_post.balance;
    entry_id := v_post.entry_id;
    RETURN NEXT;
END
$$;

REVOKE EXECUTE ON FUNCTION meter.commit(text, numeric, jsonb, text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION meter.adjust(text, text, numeric, text, text, bigint, text, jsonb,
                                        text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION meter.get_audit_events(text, text, text[], timestamptz, timestamptz,
                                                  integer, text) FROM PUBLIC;

-- An event's ttl_seconds as reserve's p_ttl_seconds (integer): out of integer's range is
-- out of reserve's 1..86400 too, refused here with reserve's message.
CREATE FUNCTION meter._ttl_seconds(p_value text) RETURNS integer
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    v bigint := meter._int('ttl_seconds', p_value);
BEGIN
    IF v NOT BETWEEN -2147483648 AND 2147483647 THEN
        PERFORM meter._fail('MT001', 'ttl_seconds',
                            format('must be between 1 and 86400, got %s', v));
    END IF;
    RETURN v::integer;
END
$$;
REVOKE EXECUTE ON FUNCTION meter._ttl_seconds(text) FROM PUBLIC;

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
