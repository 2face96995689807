-- An event's values are read in the forms the wire format sends, and no others.
--
-- Why (found by a review of apply_events with hostile input; listed as not built since
-- this migration): apply_events, which meter_app may call directly as well as the worker,
-- read an event's text with PostgreSQL's own input functions, which take far more than
-- the wire format (meter.wire: amounts as decimal text or JSON numbers, event_time ISO
-- 8601 with its offset, identifiers as strings):
-- 1. event_time 'now', 'today', 'yesterday' or 'tomorrow', which are resolved when the
--    event is applied, so the request's fingerprint changed between deliveries: a
--    redelivered batch that had committed found its keys "used with a different request",
--    and dead-lettered every such event instead of replaying it. Also 'epoch', dates
--    written as 'Jan 2 2026', and times with no offset, read in the session's TimeZone
--    (another instant in a session with another zone).
-- 2. amounts and integers as '0x10', '0o20', '0b10000' or '1_000' (PostgreSQL 16 reads
--    them as 16 and 1000), which the SDK refuses.
-- 3. identifiers as JSON numbers, booleans, arrays or objects: {"user_id": 7} wrote to the
--    account "7", [1] to the account "[1]".
-- Now the one-by-one path (meter._apply_one, and through it every single-event task,
-- late reserve and dead-letter retry) refuses each, MT001 naming the argument, and the
-- batch's fast path leaves such events to it, so both paths agree (the property test of
-- tests/integration/test_apply_events.py draws these among its corruptions). Leading and
-- trailing white space around a number stays allowed, as the SDK strips it; a NaN or
-- infinite amount still reaches its API function, which names it as not finite.
--
-- The SQL API functions (consume, allocate, ...) take typed parameters, so their callers
-- convert: nothing changes there.
--
-- Cost: three inlined checks per event on the batch path (a regex for the amount's text,
-- one for event_time when given, and the JSON type of six arguments), measured in
-- docs/benchmarks.md ("Batch apply"); on the one-by-one path one pass over the event's
-- arguments.
--
-- Migrations once applied are never edited: 008's parsers _num, _int and _time are
-- replaced, and 030's _apply_one and 028's apply_events whole; only the lines marked 032
-- changed, and their lock orders did not.

-- Decimal text as the SDK sends it (digits, an optional point and exponent, white space
-- around); what PostgreSQL's numeric input takes beyond that (hex, octal, binary,
-- underscores) is refused.
CREATE FUNCTION meter._decimal_text_ok(p_value text) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT p_value ~ '^\s*[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?\s*$'
$$;

-- A timestamp as ISO 8601 with its UTC offset: date, T or a space, hours and minutes,
-- optional seconds and fraction, then Z or +hh[:mm[:ss]].
CREATE FUNCTION meter._time_text_ok(p_value text) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT p_value ~ ('^[0-9]{4}-[0-9]{2}-[0-9]{2}[T ][0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]+)?)?'
                      '([zZ]|[+-][0-9]{2}(:?[0-9]{2}(:?[0-9]{2})?)?)$')
$$;

-- An event argument's JSON type: numbers as a string or a JSON number, check_balance and
-- metadata left to their own checks (which name them), every other argument a string.
-- JSON null is an argument not given.
CREATE FUNCTION meter._arg_type_ok(p_name text, p_value jsonb) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    -- p_value used once: inlined with a constant name, this folds to one type test
    SELECT p_name IN ('check_balance', 'metadata')
        OR coalesce(jsonb_typeof(p_value), 'null') = ANY (
               CASE WHEN p_name IN ('amount', 'actual_amount', 'ttl_seconds', 'reference_id')
                    THEN ARRAY['string', 'number', 'null'] ELSE ARRAY['string', 'null'] END)
$$;

-- The same rule for the arguments of the batch's fast path (consume, allocate and adjust
-- with no reference_id; metadata and check_balance are checked there already), one
-- look-up each: cheaper than a pass over every argument. Inlined, each name is a
-- constant, so the planner folds _arg_type_ok's CASE to the one test that name takes.
CREATE FUNCTION meter._fast_arg_types_ok(p_args jsonb) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT meter._arg_type_ok('user_id', p_args->'user_id')
       AND meter._arg_type_ok('event_type', p_args->'event_type')
       AND meter._arg_type_ok('unit', p_args->'unit')
       AND meter._arg_type_ok('resource', p_args->'resource')
       AND meter._arg_type_ok('idempotency_key', p_args->'idempotency_key')
       AND meter._arg_type_ok('event_time', p_args->'event_time')
       AND meter._arg_type_ok('amount', p_args->'amount')
$$;

CREATE OR REPLACE FUNCTION meter._num(p_param text, p_value text) RETURNS numeric
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF p_value IS NULL THEN
        RETURN NULL;
    END IF;
    IF NOT pg_input_is_valid(p_value, 'numeric') THEN
        PERFORM meter._fail('MT001', p_param, format('is not a number: %s', left(p_value, 64)));
    END IF;
    -- 032: NaN and the infinities pass on, for the API function to name as not finite
    IF NOT meter._decimal_text_ok(p_value)
       AND p_value::numeric NOT IN ('NaN', 'Infinity', '-Infinity') THEN
        PERFORM meter._fail('MT001', p_param,
                            format('must be decimal digits (as 12.5 or 1e3), got %s',
                                   left(p_value, 64)));
    END IF;
    RETURN p_value::numeric;
END
$$;

CREATE OR REPLACE FUNCTION meter._int(p_param text, p_value text) RETURNS bigint
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF p_value IS NULL THEN
        RETURN NULL;
    END IF;
    -- 032: decimal digits only (PostgreSQL's input also takes hex, octal, binary, '_')
    IF p_value !~ '^\s*[+-]?[0-9]+\s*$' OR NOT pg_input_is_valid(p_value, 'bigint') THEN
        PERFORM meter._fail('MT001', p_param, format('is not an integer: %s', left(p_value, 64)));
    END IF;
    RETURN p_value::bigint;
END
$$;

CREATE OR REPLACE FUNCTION meter._time(p_param text, p_value text) RETURNS timestamptz
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF p_value IS NULL THEN
        RETURN NULL;
    END IF;
    -- 032: ISO 8601 with its offset only (no 'now', no time read in the session's zone)
    IF NOT meter._time_text_ok(p_value) OR NOT pg_input_is_valid(p_value, 'timestamptz') THEN
        PERFORM meter._fail('MT001', p_param,
                            format('must be an ISO 8601 timestamp with its UTC offset '
                                   '(as 2026-11-28T12:00:00Z), got %s', left(p_value, 64)));
    END IF;
    RETURN p_value::timestamptz;
END
$$;

-- Apply one event through its op's API function (030's; the lines marked 032 are new). Returns {status, result}: status
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

-- apply_events (028's; the lines marked 032 are new)
CREATE OR REPLACE FUNCTION meter.apply_events(p_events jsonb, p_source text DEFAULT NULL,
                                   p_results boolean DEFAULT true)
RETURNS TABLE (idx integer, ok boolean, status text, result jsonb, error_sqlstate text,
               error_message text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET datestyle = 'ISO, MDY'  -- as set by 017 (CREATE OR REPLACE resets the settings)
AS $$
DECLARE
    v_fast meter._event[];
    v_slow integer[];
    v_out jsonb[];
    v_replays jsonb[];
    v_month timestamptz;
    v_i integer;
    v_event jsonb;
    v_one jsonb;
    v_state text;
    v_message text;
    v_allowed text[];
    v_fast_ns text[];
    v_keys text[];
    v_constraint text;
    v_lock record;
    v_locking jsonb[];
    v_held jsonb;
    v_actor text := nullif(current_setting('meter.actor_id', true), '');
    v_behalf text := nullif(current_setting('meter.on_behalf_of', true), '');
    v_reason text := nullif(current_setting('meter.reason', true), '');
    v_request text := nullif(current_setting('meter.request_id', true), '');
BEGIN
    IF p_events IS NULL OR jsonb_typeof(p_events) <> 'array' THEN
        PERFORM meter._fail('MT001', 'events', 'must be a JSON array');
    END IF;
    IF jsonb_array_length(p_events) > 100000 THEN
        PERFORM meter._fail('MT001', 'events', 'at most 100000 events per call');
    END IF;
    IF p_results IS NULL THEN
        PERFORM meter._fail('MT001', 'results', 'must be true or false, got NULL');
    END IF;

    -- namespaces the caller may write, checked once each (materialized: a qual pushed down
    -- into the scan would run the privilege look-up once per event)
    WITH d AS MATERIALIZED (
        SELECT DISTINCT e->>'namespace' AS ns FROM jsonb_array_elements(p_events) e
        WHERE jsonb_typeof(e) = 'object'
    )
    SELECT coalesce(array_agg(d.ns), '{}') INTO v_allowed
    FROM d WHERE meter._ident_ok(d.ns, 1024) AND meter._tenant_ok(d.ns);

    IF jsonb_array_length(p_events) = 1 THEN
        -- one event (a single-event task): straight to the one-by-one path (step 4), which
        -- creates its partition itself; classifying a set of one costs more than it saves
        v_slow := '{0}';
    ELSE
        -- 1. partitions for every month an event is dated in (and this month), before any lock
        FOR v_month IN
            SELECT DISTINCT date_trunc('month', t AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
            FROM (SELECT now() AS t
                  UNION ALL
                  SELECT (e->'args'->>'event_time')::timestamptz
                  FROM jsonb_array_elements(p_events) e
                  WHERE jsonb_typeof(e) = 'object' AND jsonb_typeof(e->'args') = 'object'
                    AND pg_input_is_valid(e->'args'->>'event_time', 'timestamptz')
                    AND (e->'args'->>'event_time')::timestamptz
                        BETWEEN '1900-01-01 00:00:00+00' AND now() + interval '24 hours') m
        LOOP
            PERFORM meter._ledger_time('event_time', v_month);
        END LOOP;


        -- 2. classify: the fast path takes valid unchecked consume/allocate/adjust events (the
        --    first of each key in the batch); everything else goes one by one. Identifiers
        --    shared by many events (event_type, unit, resource, user_id) are checked once per
        --    distinct value; an event with any bad one goes to the slow path, which names it.
        WITH raw AS (
            SELECT (e.ord - 1)::integer AS idx, e.value AS ev, e.value->>'op' AS op,
                   e.value->>'namespace' AS ns, e.value->'args' AS a
            FROM jsonb_array_elements(p_events) WITH ORDINALITY AS e(value, ord)
        ), parsed AS MATERIALIZED (
            SELECT r.idx, r.op, r.ns, r.a,
                   r.a->>'user_id' AS user_id, r.a->>'event_type' AS event_type,
                   coalesce(r.a->>'resource', '') AS resource, r.a->>'unit' AS unit,
                   CASE WHEN pg_input_is_valid(r.a->>'amount', 'numeric')
                        THEN trim_scale((r.a->>'amount')::numeric) END AS amount,
                   r.a->>'idempotency_key' AS key,
                   CASE WHEN pg_input_is_valid(r.a->>'event_time', 'timestamptz')
                        THEN (r.a->>'event_time')::timestamptz END AS event_time,
                   CASE WHEN jsonb_typeof(r.a->'metadata') = 'null' THEN NULL
                        ELSE r.a->'metadata' END AS metadata
            FROM raw r
            WHERE jsonb_typeof(r.ev) = 'object' AND jsonb_typeof(r.a) = 'object'
              AND r.op IN ('consume', 'allocate', 'adjust')
              AND r.ns = ANY (v_allowed)
              -- no argument the op does not take (jsonb minus the allowed names leaves none)
              AND r.a - meter._event_args(r.op) = '{}'::jsonb
              AND (r.a->'check_balance' IS NULL OR r.a->'check_balance' IN ('false', 'null'))
              AND r.a->'reference_id' IS NULL
        ), bad_ident AS MATERIALIZED (
            SELECT v.kind, v.value
            FROM (SELECT DISTINCT 'u' AS kind, p.user_id AS value FROM parsed p
                  UNION ALL SELECT DISTINCT 'e', p.event_type FROM parsed p
                  UNION ALL SELECT DISTINCT 'n', p.unit FROM parsed p
                  UNION ALL SELECT DISTINCT 'r', p.resource FROM parsed p) v
            WHERE NOT coalesce(CASE v.kind WHEN 'u' THEN meter._ident_ok(v.value, 256)
                                           WHEN 'e' THEN meter._ident_ok(v.value, 256)
                                           WHEN 'n' THEN meter._ident_ok(v.value, 64)
                                           ELSE v.value = '' OR meter._ident_ok(v.value, 256) END,
                               v.kind = 'u')
        ), eligible AS (
            SELECT p.*,
                   row_number() OVER (PARTITION BY p.ns, p.key ORDER BY p.idx) AS key_rank
            FROM parsed p
            WHERE (p.op <> 'consume' OR p.user_id IS NOT NULL)
              AND NOT EXISTS (SELECT 1 FROM bad_ident b
                              WHERE (b.kind = 'u' AND b.value = p.user_id)
                                 OR (b.kind = 'e' AND b.value IS NOT DISTINCT FROM p.event_type)
                                 OR (b.kind = 'n' AND b.value IS NOT DISTINCT FROM p.unit)
                                 OR (b.kind = 'r' AND b.value = p.resource))
              AND (p.key IS NULL OR meter._ident_ok(p.key, 256))
              AND meter._amount_ok(p.amount, CASE WHEN p.op = 'adjust' THEN 'nonzero'
                                                  ELSE 'positive' END)
              -- 032: the strict text forms, and each argument in its JSON type
              AND meter._decimal_text_ok(p.a->>'amount')
              AND meter._fast_arg_types_ok(p.a)
              AND (p.a->>'event_time' IS NULL
                   OR (meter._time_text_ok(p.a->>'event_time')
                       AND p.event_time BETWEEN '1900-01-01 00:00:00+00'
                                            AND now() + interval '24 hours'))
              AND (p.metadata IS NULL OR (jsonb_typeof(p.metadata) = 'object'
                                          AND octet_length(p.metadata::text) <= 65536))
        )
        SELECT array_agg(ROW(e.idx, e.ns, e.op, e.user_id, e.event_type, e.resource, e.unit,
                             CASE WHEN e.op = 'consume' THEN -e.amount ELSE e.amount END,
                             e.key, coalesce(e.event_time, now()), e.event_time IS NOT NULL,
                             e.metadata,
                             CASE WHEN e.key IS NULL THEN NULL
                                  WHEN e.op = 'consume' THEN
                                      meter._hash('consume', e.user_id, e.event_type, e.resource,
                                                  e.unit, e.amount::text, 'false',
                                                  (e.event_time AT TIME ZONE 'UTC')::text,
                                                  e.metadata::text)
                                  WHEN e.op = 'allocate' THEN
                                      meter._hash('allocate', e.user_id, e.event_type, e.resource,
                                                  e.unit, e.amount::text,
                                                  (e.event_time AT TIME ZONE 'UTC')::text,
                                                  e.metadata::text)
                                  ELSE
                                      meter._hash('adjust', e.user_id, e.event_type, e.resource,
                                                  e.unit, e.amount::text, NULL, e.metadata::text)
                             END)::meter._event ORDER BY e.idx),
               array_agg(DISTINCT e.ns), array_agg(e.key) FILTER (WHERE e.key IS NOT NULL)
        INTO v_fast, v_fast_ns, v_keys
        FROM eligible e
        WHERE e.key IS NULL OR e.key_rank = 1;

        SELECT array_agg(i ORDER BY i) INTO v_slow
        FROM generate_series(0, jsonb_array_length(p_events) - 1) i
        WHERE i NOT IN (SELECT f.idx FROM unnest(v_fast) f);

        -- 2b. With events for the one-by-one path, take the whole batch's locks first, in the
        --     one order single calls and the sweep use: the advisory locks of reservation
        --     ids, then of idempotency keys; the reservations committed or released; then
        --     every existing account of the batch in key order. Taken event by event after
        --     the fast path's accounts, they deadlocked with the sweep (which holds a
        --     reservation while it waits for its account) and with single calls (which
        --     hold a key's lock while they wait for its account). Accounts created by the
        --     batch are new to it alone.
        IF v_slow IS NOT NULL THEN
            -- the one-by-one events that may take locks: those of namespaces allowed here
            SELECT array_agg(p_events->s.i) INTO v_locking FROM unnest(v_slow) s(i)
            WHERE p_events->s.i->>'namespace' = ANY (v_allowed);
            FOR v_lock IN
                SELECT DISTINCT n.kind_order, n.kind, n.ns, n.name,
                       hashtextextended(n.kind || chr(31) || n.ns || chr(31) || n.name, 0) AS h
                FROM (SELECT 0 AS kind_order, 'reservation' AS kind, e->>'namespace' AS ns,
                             e->'args'->>'reservation_id' AS name
                      FROM unnest(v_locking) e WHERE e->>'op' = 'reserve'
                      UNION ALL
                      SELECT 1, 'key', e->>'namespace', e->'args'->>'idempotency_key'
                      FROM unnest(v_locking) e) n
                WHERE n.name IS NOT NULL
                ORDER BY n.kind_order, h
            LOOP
                PERFORM meter._lock_key(v_lock.ns, v_lock.kind, v_lock.name);
            END LOOP;
            PERFORM 1 FROM meter.reservations r
            WHERE (r.namespace, r.reservation_id) IN (
                SELECT e->>'namespace', e->'args'->>'reservation_id' FROM unnest(v_locking) e
                WHERE e->>'op' IN ('commit', 'release'))
            ORDER BY r.namespace, r.reservation_id
            FOR UPDATE;
            PERFORM 1 FROM meter.accounts a
            WHERE (a.namespace, coalesce(a.user_id, ''), a.event_type, a.resource, a.unit) IN (
                SELECT e->>'namespace', coalesce(e->'args'->>'user_id', ''),
                       e->'args'->>'event_type', coalesce(e->'args'->>'resource', ''),
                       e->'args'->>'unit'
                FROM jsonb_array_elements(p_events) e
                WHERE e->>'op' IN ('consume', 'allocate', 'adjust', 'reserve')
                  AND e->>'namespace' = ANY (v_allowed)
                UNION ALL
                SELECT r.namespace, coalesce(r.user_id, ''), r.event_type, r.resource, r.unit
                FROM meter.reservations r
                WHERE (r.namespace, r.reservation_id) IN (
                    SELECT e->>'namespace', e->'args'->>'reservation_id' FROM unnest(v_locking) e
                    WHERE e->>'op' IN ('commit', 'release')))
            ORDER BY a.namespace, coalesce(a.user_id, ''), a.event_type, a.resource, a.unit
            FOR UPDATE OF a;
        END IF;

        -- 3a. keys seen before: replay the same request, refuse a different one. The look-up
        --     goes through the key's index (meter._seen_keys: never a scan of the whole,
        --     ever-growing, key table, whatever plan is cached).
        WITH seen AS (
            SELECT f.idx, f.op, f.key, f.hash, k.operation, k.request_hash, k.result
            FROM meter._seen_keys(v_fast_ns, v_keys) k
            JOIN unnest(v_fast) f ON k.namespace = f.namespace AND k.key = f.key
        )
        SELECT array_agg(jsonb_build_object(
                   'idx', s.idx,
                   'ok', s.operation = s.op AND s.request_hash = s.hash,
                   'status', CASE WHEN s.operation = s.op AND s.request_hash = s.hash
                                  THEN 'replayed' ELSE 'error' END,
                   'result', CASE WHEN p_results AND s.operation = s.op
                                       AND s.request_hash = s.hash THEN
                                 CASE WHEN s.op = 'consume' THEN
                                     jsonb_build_object('success', true,
                                         'balance', s.result->'balance',
                                         'available', (s.result->>'balance')::numeric
                                                      - (s.result->>'reserved')::numeric,
                                         'entry_id', s.result->'entry_id')
                                 ELSE jsonb_build_object('balance', s.result->'balance',
                                                         'entry_id', s.result->'entry_id') END
                             END,
                   'error_sqlstate', CASE WHEN s.operation = s.op AND s.request_hash = s.hash
                                          THEN NULL ELSE 'MT002' END,
                   'error_message', CASE WHEN s.operation = s.op AND s.request_hash = s.hash
                                         THEN NULL
                                         ELSE format('idempotency_key: %s was already used for a different %s request',
                                                     quote_literal(s.key), s.operation) END))
        INTO v_replays
        FROM seen s;
        IF v_replays IS NOT NULL THEN
            SELECT array_agg(f ORDER BY f.idx) INTO v_fast
            FROM unnest(v_fast) f
            WHERE f.idx NOT IN (SELECT (r->>'idx')::integer FROM unnest(v_replays) r);
        END IF;

        IF v_fast IS NOT NULL THEN
            -- 3b. one statement: per account, add the batch's net amount (creating the account
            --     if missing; the upsert takes each row lock, in key order, so concurrent
            --     batches cannot deadlock on each other's fast paths), append the ledger rows
            --     with running balances, claim the keys, and build the results. The claim is
            --     a plain insert: a key claimed by another transaction since 3a fails it
            --     with unique_violation, raised as 40001 for the whole batch below (ON
            --     CONFLICT DO NOTHING paid a speculative insertion for every key).
            BEGIN
                WITH delta AS (
                    SELECT f.namespace, f.user_id, f.event_type, f.resource, f.unit,
                           sum(f.amount) AS delta, sum(greatest(f.amount, 0)) AS credited,
                           sum(greatest(-f.amount, 0)) AS debited
                    FROM unnest(v_fast) f
                    GROUP BY 1, 2, 3, 4, 5
                ), acc AS (
                    INSERT INTO meter.accounts AS a (namespace, user_id, event_type, resource, unit,
                                                     balance, total_credited, total_debited)
                    SELECT d.namespace, d.user_id, d.event_type, d.resource, d.unit,
                           d.delta, d.credited, d.debited
                    FROM delta d
                    ORDER BY d.namespace, coalesce(d.user_id, ''), d.event_type, d.resource, d.unit
                    ON CONFLICT (namespace, (coalesce(user_id, '')), event_type, resource, unit)
                    DO UPDATE SET balance = a.balance + excluded.balance,
                                  total_credited = a.total_credited + excluded.total_credited,
                                  total_debited = a.total_debited + excluded.total_debited,
                                  updated_at = now()
                    RETURNING a.namespace, a.account_id, a.user_id, a.event_type, a.resource, a.unit,
                              a.balance, a.reserved
                ), posted AS MATERIALIZED (
                    -- acc.balance is after the whole batch: take the batch's sum back out, add
                    -- the running sum up to each event
                    SELECT f.*, acc.account_id, acc.reserved,
                           acc.balance - sum(f.amount) OVER (PARTITION BY acc.account_id)
                               + sum(f.amount) OVER (PARTITION BY acc.account_id ORDER BY f.idx)
                               AS balance_after,
                           nextval('meter.ledger_id_seq') AS entry_id
                    FROM unnest(v_fast) f
                    JOIN acc ON acc.namespace = f.namespace
                            AND coalesce(acc.user_id, '') = coalesce(f.user_id, '')
                            AND acc.event_type = f.event_type AND acc.resource = f.resource
                            AND acc.unit = f.unit
                ), ins AS (
                    INSERT INTO meter.ledger (id, namespace, account_id, user_id, event_type, resource,
                                              unit, entry_type, amount, balance_after, event_time,
                                              idempotency_key, actor_id, on_behalf_of, reason,
                                              request_id, metadata)
                    SELECT p.entry_id, p.namespace, p.account_id, p.user_id, p.event_type, p.resource,
                           p.unit,
                           CASE p.op WHEN 'consume' THEN 'consumption' WHEN 'allocate' THEN 'allocation'
                                     ELSE 'adjustment' END,
                           p.amount, p.balance_after, p.event_time, p.key,
                           v_actor, v_behalf, v_reason, v_request,
                           p.metadata
                    FROM posted p
                ), claim AS (
                    INSERT INTO meter.idempotency_keys
                        (namespace, key, operation, request_hash, result, account_id)
                    SELECT p.namespace, p.key, p.op, p.hash,
                           jsonb_build_object('balance', p.balance_after, 'reserved', p.reserved,
                                              'entry_id', p.entry_id),
                           p.account_id
                    FROM posted p
                    WHERE p.key IS NOT NULL
                )
                SELECT array_agg(jsonb_build_object(
                           'idx', p.idx, 'ok', true, 'status', 'applied',
                           'result', CASE WHEN NOT p_results THEN NULL
                                         WHEN p.op = 'consume' THEN
                                         jsonb_build_object('success', true, 'balance', p.balance_after,
                                                            'available', p.balance_after - p.reserved,
                                                            'entry_id', p.entry_id)
                                     ELSE jsonb_build_object('balance', p.balance_after,
                                                             'entry_id', p.entry_id) END)),
                       -- 028: the consumes on accounts with holds, for _restate_due_holds
                       -- (only consume reports `available`; allocate and adjust store
                       -- `reserved` as their single calls do, without restating it)
                       jsonb_agg(jsonb_build_object('idx', p.idx, 'namespace', p.namespace,
                                                    'account_id', p.account_id, 'key', p.key))
                           FILTER (WHERE p.reserved > 0 AND p.op = 'consume')
                INTO v_out, v_held
                FROM posted p;
            EXCEPTION WHEN unique_violation THEN
                GET STACKED DIAGNOSTICS v_constraint = CONSTRAINT_NAME;
                IF v_constraint IS DISTINCT FROM 'idempotency_keys_pkey' THEN
                    RAISE;
                END IF;
                RAISE EXCEPTION 'events: an idempotency key of this batch was claimed concurrently; retry the batch to replay it'
                    USING ERRCODE = '40001';
            END;
            IF v_held IS NOT NULL THEN
                v_out := meter._restate_due_holds(v_out, v_held);
            END IF;
        END IF;
    END IF;
    v_out := coalesce(v_out, '{}') || coalesce(v_replays, '{}');

    -- 4. the rest, one by one, each in its own subtransaction
    FOREACH v_i IN ARRAY coalesce(v_slow, '{}') LOOP
        v_event := p_events->v_i;
        BEGIN
            v_one := meter._apply_one(v_event);
            v_out := v_out || jsonb_build_object(
                'idx', v_i, 'ok', v_one->>'status' <> 'not_found',
                'status', v_one->>'status',
                'result', CASE WHEN p_results THEN v_one->'result' END);
        EXCEPTION WHEN OTHERS THEN
            GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE, v_message = MESSAGE_TEXT;
            -- transient: the whole batch is retried
            IF v_state IN ('40001', '40P01', '55P03', '57014') OR v_state LIKE '08%'
               OR v_state LIKE '53%' OR v_state LIKE '57P%' OR v_state LIKE '58%' THEN
                RAISE;
            END IF;
            v_out := v_out || jsonb_build_object(
                'idx', v_i, 'ok', false, 'status', 'error',
                'error_sqlstate', v_state, 'error_message', v_message);
        END;
    END LOOP;

    -- dead letters for every event that can never succeed (fast-path conflicts included);
    -- with p_source (the caller's message id), a redelivered batch counts an attempt on
    -- the same dead letter instead of adding another
    PERFORM meter.record_dead_letter(coalesce(p_events->(o->>'idx')::integer->>'op', '?'),
                                     p_events->(o->>'idx')::integer,
                                     o->>'error_sqlstate', o->>'error_message',
                                     p_source || '/' || (o->>'idx'),
                                     CASE WHEN p_events->(o->>'idx')::integer->>'namespace' = ANY (v_allowed)
                                          THEN p_events->(o->>'idx')::integer->>'namespace'
                                          ELSE '' END)
    FROM unnest(v_out) o
    WHERE o->>'status' = 'error';

    RETURN QUERY
    SELECT (o->>'idx')::integer, (o->>'ok')::boolean, o->>'status',
           -- SQL NULL, not a JSON null the client would parse, when no results were asked
           CASE WHEN p_results THEN o->'result' END,
           o->>'error_sqlstate', o->>'error_message'
    FROM unnest(v_out) o
    ORDER BY 1;
END
$$;
