-- meter.apply_events, leaner: a third parameter p_results, a plain insert for the key
-- claims, the actor settings read once per call, and one-event calls sent straight to the
-- one-by-one path.
--
-- Why: apply_events is the pipeline's write path, and its backend is most of the
-- pipeline's CPU per event (docs/benchmarks.md). Four costs paid for nothing:
--   * every event's result document was built, sent and (until the worker stopped)
--     parsed although the worker drops them unless someone waits for the task.
--     p_results false (the worker's call when nobody waits) returns result NULL;
--     statuses, errors and dead letters are the same. The default keeps the old calls.
--   * the key claims used INSERT ... ON CONFLICT DO NOTHING and compared the count: a
--     speculative insertion (index probe, insert, confirmation record) per key. Keys seen
--     before are already found by step 3a; a key claimed by a concurrent transaction
--     after that now fails the plain insert with unique_violation on
--     idempotency_keys_pkey, raised as 40001 for the whole batch, as before (the caller
--     retries, and the batch replays).
--   * the four actor settings were read per ledger row (current_setting is STABLE).
--   * a one-event call (a single-event task: the producer's direct mode) paid the
--     set-based classification, replay look-up and partition pass for a set of one before
--     applying it; it now goes to the one-by-one path (step 4), the API function of its
--     op, which creates its partition itself and gives the same statuses.
--
-- Measured (PostgreSQL 18.6, 2 cores, durable; backend CPU from /proc/<pid>/schedstat,
-- this function against 008's as scratch copies on one server, interleaved calls, median
-- of the paired differences): 1000 consume events on distinct accounts -12% with
-- p_results false (-10% with true); one-event calls -36% (1.5 -> 0.9 ms).
--
-- The body is 008's otherwise: a migration, once applied, is never edited (the runner
-- checks its checksum), so changing the function repeats it. The signature changes, so
-- the old function is dropped: an overload beside it would make two-argument calls
-- ambiguous.

DROP FUNCTION meter.apply_events(jsonb, text);

CREATE FUNCTION meter.apply_events(p_events jsonb, p_source text DEFAULT NULL,
                                   p_results boolean DEFAULT true)
RETURNS TABLE (idx integer, ok boolean, status text, result jsonb, error_sqlstate text,
               error_message text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
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
                                                             'entry_id', p.entry_id) END))
                INTO v_out
                FROM posted p;
            EXCEPTION WHEN unique_violation THEN
                GET STACKED DIAGNOSTICS v_constraint = CONSTRAINT_NAME;
                IF v_constraint IS DISTINCT FROM 'idempotency_keys_pkey' THEN
                    RAISE;
                END IF;
                RAISE EXCEPTION 'events: an idempotency key of this batch was claimed concurrently; retry the batch to replay it'
                    USING ERRCODE = '40001';
            END;
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
REVOKE EXECUTE ON FUNCTION meter.apply_events(jsonb, text, boolean) FROM PUBLIC;
-- For databases whose roles exist already (sql/roles.sql grants the same on its next run).
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'meter_maintenance') THEN
        GRANT EXECUTE ON FUNCTION meter.apply_events(jsonb, text, boolean) TO meter_maintenance;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'meter_app') THEN
        GRANT EXECUTE ON FUNCTION meter.apply_events(jsonb, text, boolean) TO meter_app;
    END IF;
END
$$;
