-- Pipeline: applying batches of events, and the dead letters of events that never can be.
--
-- meter.apply_events applies a JSON array of events in the caller's transaction:
--   1. the ledger partitions every event needs are created first, before any lock;
--   2. the fast path: unchecked consume, allocate and adjust events that are valid and
--      carry no reference_id are applied set-based, with no per-event loop or
--      subtransaction: one statement parses and validates the whole array (identifiers
--      shared by many events checked once per distinct value), keys seen before replay (or
--      are refused) after one index look-up of all the batch's keys, and one statement
--      writes the rest -- one upsert per account with the batch's net amount (creating it
--      if missing; row locks taken in key order), the ledger rows with running balances,
--      and the key claims;
--   3. every other event is applied one by one through the API function of its op, each in
--      its own subtransaction, so that one bad event is dead-lettered alone.
-- Fast-path events are applied before the others; within each group, in array order.
-- A key claimed concurrently by another transaction raises 40001 for the whole batch, and
-- transient errors (deadlock, serialization, lost connection) propagate: the caller retries
-- the batch, and idempotency keys make that safe.

CREATE TABLE meter.dead_letters (
    namespace       text        NOT NULL,
    dead_letter_id  bigint      GENERATED ALWAYS AS IDENTITY,
    op              text        NOT NULL,
    payload         jsonb       NOT NULL,
    error_sqlstate  text,
    error_message   text,
    attempts        integer     NOT NULL DEFAULT 1,
    first_failed_at timestamptz NOT NULL DEFAULT now(),
    last_failed_at  timestamptz NOT NULL DEFAULT now(),
    status          text        NOT NULL DEFAULT 'dead'
                    CHECK (status IN ('dead', 'retried', 'discarded')),
    resolved_at     timestamptz,
    source          text,
    PRIMARY KEY (namespace, dead_letter_id)
);
-- A redelivered failure (same source) counts an attempt instead of adding a row.
CREATE UNIQUE INDEX dead_letters_source ON meter.dead_letters (namespace, source)
    WHERE source IS NOT NULL AND status = 'dead';
ALTER TABLE meter.dead_letters ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_rows ON meter.dead_letters USING (meter._row_visible(namespace));

-- One event's fields, parsed and validated (meter.apply_events).
CREATE TYPE meter._event AS (
    idx        integer,
    namespace  text,
    op         text,
    user_id    text,
    event_type text,
    resource   text,
    unit       text,
    amount     numeric,
    key        text,
    event_time timestamptz,
    explicit_time boolean,
    metadata   jsonb,
    hash       text
);

-- Record an event that can never succeed. Returns its dead_letter_id.
CREATE FUNCTION meter.record_dead_letter(p_op text, p_payload jsonb, p_error_sqlstate text,
                                         p_error_message text, p_source text DEFAULT NULL,
                                         p_namespace text DEFAULT 'default')
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_id bigint;
    v_namespace text := coalesce(p_namespace, '');
BEGIN
    IF v_namespace <> '' AND NOT meter._tenant_ok(v_namespace) THEN
        PERFORM meter._guard(v_namespace);
    END IF;
    IF p_source IS NOT NULL THEN
        UPDATE meter.dead_letters d
        SET attempts = d.attempts + 1, last_failed_at = now(),
            error_sqlstate = p_error_sqlstate, error_message = p_error_message
        WHERE d.namespace = v_namespace AND d.source = p_source AND d.status = 'dead'
        RETURNING d.dead_letter_id INTO v_id;
        IF FOUND THEN
            RETURN v_id;
        END IF;
    END IF;
    INSERT INTO meter.dead_letters (namespace, op, payload, error_sqlstate, error_message, source)
    VALUES (v_namespace, coalesce(p_op, '?'), coalesce(p_payload, 'null'::jsonb),
            p_error_sqlstate, p_error_message, p_source)
    RETURNING dead_letter_id INTO v_id;
    RETURN v_id;
END
$$;

-- Dead letters, newest first. p_status NULL or 'all' lists every status; p_namespace NULL
-- lists every namespace (privileged callers).
CREATE FUNCTION meter.list_dead_letters(p_status text DEFAULT 'dead', p_limit integer DEFAULT 100,
                                        p_namespace text DEFAULT NULL)
RETURNS SETOF meter.dead_letters
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF p_namespace IS NULL THEN
        IF nullif(current_setting('meter.tenant', true), '') IS NOT NULL
           OR NOT meter._is_privileged(session_user) THEN
            RAISE EXCEPTION 'namespace: listing every namespace needs a privileged role and no tenant'
                USING ERRCODE = 'MT004', COLUMN = 'namespace';
        END IF;
    ELSE
        PERFORM meter._guard(p_namespace);
    END IF;
    RETURN QUERY
    SELECT * FROM meter.dead_letters d
    WHERE (p_namespace IS NULL OR d.namespace = p_namespace)
      AND (p_status IS NULL OR p_status = 'all' OR d.status = p_status)
    ORDER BY d.last_failed_at DESC, d.dead_letter_id DESC
    LIMIT meter._limit('limit', p_limit, 100, 10000);
END
$$;

------------------------------------------------------------------------------------------
-- Parsing helpers for events: text to typed values, refusing with MT001 and the name.

CREATE FUNCTION meter._num(p_param text, p_value text) RETURNS numeric
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF p_value IS NULL THEN
        RETURN NULL;
    END IF;
    IF NOT pg_input_is_valid(p_value, 'numeric') THEN
        PERFORM meter._fail('MT001', p_param, format('is not a number: %s', left(p_value, 64)));
    END IF;
    RETURN p_value::numeric;
END
$$;

CREATE FUNCTION meter._time(p_param text, p_value text) RETURNS timestamptz
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF p_value IS NULL THEN
        RETURN NULL;
    END IF;
    IF NOT pg_input_is_valid(p_value, 'timestamptz') THEN
        PERFORM meter._fail('MT001', p_param,
                            format('is not a timestamp: %s', left(p_value, 64)));
    END IF;
    RETURN p_value::timestamptz;
END
$$;

CREATE FUNCTION meter._int(p_param text, p_value text) RETURNS bigint
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF p_value IS NULL THEN
        RETURN NULL;
    END IF;
    IF NOT pg_input_is_valid(p_value, 'bigint') THEN
        PERFORM meter._fail('MT001', p_param, format('is not an integer: %s', left(p_value, 64)));
    END IF;
    RETURN p_value::bigint;
END
$$;

CREATE FUNCTION meter._bool(p_param text, p_value jsonb) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF p_value IS NULL OR jsonb_typeof(p_value) = 'null' THEN
        RETURN NULL;
    END IF;
    IF jsonb_typeof(p_value) <> 'boolean' THEN
        PERFORM meter._fail('MT001', p_param, format('must be true or false, got %s', p_value));
    END IF;
    RETURN p_value::boolean;
END
$$;

-- The arguments each op accepts in an event's "args".
CREATE FUNCTION meter._event_args(p_op text) RETURNS text[]
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
        WHEN 'release'  THEN ARRAY['reservation_id']
    END
$$;

-- Apply one event through its op's API function. Returns {status, result}: status
-- 'applied', 'replayed', 'refused' or 'not_found'. Raises what the function raises.
CREATE FUNCTION meter._apply_one(p_event jsonb) RETURNS jsonb
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
    IF a->>'idempotency_key' IS NOT NULL THEN
        v_seen := EXISTS (SELECT 1 FROM meter.idempotency_keys k
                          WHERE k.namespace = v_ns AND k.key = a->>'idempotency_key');
    END IF;

    CASE v_op
    WHEN 'consume' THEN
        SELECT to_jsonb(r) INTO v_result
        FROM meter.consume(a->>'user_id', a->>'event_type', meter._num('amount', a->>'amount'),
                           a->>'unit', a->>'resource',
                           coalesce(meter._bool('check_balance', a->'check_balance'), false),
                           a->>'idempotency_key', meter._time('event_time', a->>'event_time'),
                           v_meta, v_ns) r;
        v_status := CASE WHEN NOT (v_result->>'success')::boolean THEN 'refused'
                         WHEN v_seen THEN 'replayed' ELSE 'applied' END;
    WHEN 'allocate' THEN
        SELECT to_jsonb(r) INTO v_result
        FROM meter.allocate(a->>'user_id', a->>'event_type', meter._num('amount', a->>'amount'),
                            a->>'unit', a->>'resource', a->>'idempotency_key',
                            meter._time('event_time', a->>'event_time'), v_meta, v_ns) r;
        v_status := CASE WHEN v_seen THEN 'replayed' ELSE 'applied' END;
    WHEN 'adjust' THEN
        SELECT to_jsonb(r) INTO v_result
        FROM meter.adjust(a->>'user_id', a->>'event_type', meter._num('amount', a->>'amount'),
                          a->>'unit', a->>'resource',
                          meter._int('reference_id', a->>'reference_id'),
                          a->>'idempotency_key', v_meta, v_ns) r;
        v_status := CASE WHEN v_seen THEN 'replayed' ELSE 'applied' END;
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
                         WHEN v_seen THEN 'replayed' ELSE 'applied' END;
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

-- The stored idempotency keys among p_keys (in p_namespaces), through the primary key.
-- Its own function so that it can forbid sequential scans: apply_events' plans are cached
-- per session, and a generic plan made while the key table was small (or its statistics
-- stale) would otherwise scan the whole table for every batch as it grows (measured: a
-- 1000-event batch spent 200-430 ms here instead of ~6 ms once the table held 50k keys).
CREATE FUNCTION meter._seen_keys(p_namespaces text[], p_keys text[])
RETURNS SETOF meter.idempotency_keys
LANGUAGE sql STABLE SET enable_seqscan = off AS $$
    SELECT * FROM meter.idempotency_keys k
    WHERE k.namespace = ANY (p_namespaces) AND k.key = ANY (p_keys)
$$;

------------------------------------------------------------------------------------------
CREATE FUNCTION meter.apply_events(p_events jsonb, p_source text DEFAULT NULL)
RETURNS TABLE (idx integer, ok boolean, status text, result jsonb, error_sqlstate text,
               error_message text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_fast meter._event[];
    v_slow integer[];
    v_out jsonb[];
    v_replays jsonb[];
    v_month timestamptz;
    v_claimed bigint;
    v_expected bigint;
    v_i integer;
    v_event jsonb;
    v_one jsonb;
    v_state text;
    v_message text;
    v_allowed text[];
    v_fast_ns text[];
    v_keys text[];
BEGIN
    IF p_events IS NULL OR jsonb_typeof(p_events) <> 'array' THEN
        PERFORM meter._fail('MT001', 'events', 'must be a JSON array');
    END IF;
    IF jsonb_array_length(p_events) > 100000 THEN
        PERFORM meter._fail('MT001', 'events', 'at most 100000 events per call');
    END IF;

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

    -- namespaces the caller may write, checked once each (materialized: a qual pushed down
    -- into the scan would run the privilege look-up once per event)
    WITH d AS MATERIALIZED (
        SELECT DISTINCT e->>'namespace' AS ns FROM jsonb_array_elements(p_events) e
        WHERE jsonb_typeof(e) = 'object'
    )
    SELECT coalesce(array_agg(d.ns), '{}') INTO v_allowed
    FROM d WHERE meter._ident_ok(d.ns, 1024) AND meter._tenant_ok(d.ns);

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
          AND (p.a->>'event_time' IS NULL
               OR p.event_time BETWEEN '1900-01-01 00:00:00+00' AND now() + interval '24 hours')
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
               'result', CASE WHEN s.operation = s.op AND s.request_hash = s.hash THEN
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
        --     with running balances, claim the keys, and build the results
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
                   nullif(current_setting('meter.actor_id', true), ''),
                   nullif(current_setting('meter.on_behalf_of', true), ''),
                   nullif(current_setting('meter.reason', true), ''),
                   nullif(current_setting('meter.request_id', true), ''),
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
            ON CONFLICT DO NOTHING
            RETURNING 1
        )
        SELECT array_agg(jsonb_build_object(
                   'idx', p.idx, 'ok', true, 'status', 'applied',
                   'result', CASE WHEN p.op = 'consume' THEN
                                 jsonb_build_object('success', true, 'balance', p.balance_after,
                                                    'available', p.balance_after - p.reserved,
                                                    'entry_id', p.entry_id)
                             ELSE jsonb_build_object('balance', p.balance_after,
                                                     'entry_id', p.entry_id) END)),
               (SELECT count(*) FROM claim),
               count(p.key)
        INTO v_out, v_claimed, v_expected
        FROM posted p;

        IF v_claimed < v_expected THEN
            RAISE EXCEPTION 'events: an idempotency key of this batch was claimed concurrently; retry the batch to replay it'
                USING ERRCODE = '40001';
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
                'status', v_one->>'status', 'result', v_one->'result');
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
    SELECT (o->>'idx')::integer, (o->>'ok')::boolean, o->>'status', o->'result',
           o->>'error_sqlstate', o->>'error_message'
    FROM unnest(v_out) o
    ORDER BY 1;
END
$$;

-- Re-apply a dead letter's payload. On success it is marked 'retried'; otherwise its
-- attempts grow and it stays 'dead'.
CREATE FUNCTION meter.retry_dead_letter(p_dead_letter_id bigint)
RETURNS TABLE (ok boolean, status text, result jsonb, error_sqlstate text, error_message text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v meter.dead_letters;
    v_one jsonb;
BEGIN
    SELECT * INTO v FROM meter.dead_letters d
    WHERE d.dead_letter_id = p_dead_letter_id AND d.status = 'dead'
      AND meter._row_visible(d.namespace)
    FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM meter._fail('MT003', 'dead_letter_id',
                            format('no dead letter %s waiting to be retried', p_dead_letter_id));
    END IF;
    BEGIN
        v_one := meter._apply_one(v.payload);
        ok := v_one->>'status' <> 'not_found';
        status := v_one->>'status';
        result := v_one->'result';
    EXCEPTION WHEN OTHERS THEN
        GET STACKED DIAGNOSTICS error_sqlstate = RETURNED_SQLSTATE,
                                error_message = MESSAGE_TEXT;
        ok := false;
        status := 'error';
    END;
    IF ok THEN
        UPDATE meter.dead_letters d SET status = 'retried', resolved_at = now()
        WHERE d.namespace = v.namespace AND d.dead_letter_id = v.dead_letter_id;
    ELSE
        UPDATE meter.dead_letters d
        SET attempts = d.attempts + 1, last_failed_at = now(),
            error_sqlstate = coalesce(retry_dead_letter.error_sqlstate, 'MT003'),
            error_message = coalesce(retry_dead_letter.error_message, 'reservation not found')
        WHERE d.namespace = v.namespace AND d.dead_letter_id = v.dead_letter_id;
    END IF;
    RETURN NEXT;
END
$$;

CREATE FUNCTION meter.discard_dead_letter(p_dead_letter_id bigint) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    UPDATE meter.dead_letters d SET status = 'discarded', resolved_at = now()
    WHERE d.dead_letter_id = p_dead_letter_id AND d.status = 'dead'
      AND meter._row_visible(d.namespace);
    RETURN FOUND;
END
$$;

REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA meter FROM PUBLIC;
