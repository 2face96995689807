-- One lock order for batches, single calls and the sweep (SPEC 3.6: "reservation, then
-- accounts sorted by key ... callers, batches and the sweep never deadlock").
--
-- Why: a batch of apply_events locked the fast path's accounts first (in key order), then
-- took, event by event, the locks of the events that go one by one: a commit's reservation
-- after accounts the batch already held. The sweep holds reservations while it waits for
-- their accounts, so the two deadlocked (found by an audit: a batch ending in a commit and
-- a concurrent sweep, 40P01). Single calls that hold an idempotency key's advisory lock
-- while they wait for an account met the same inversion. And the sweep locked accounts in
-- account_id order where the batches use key order.
--
-- Now, when a batch has events for the one-by-one path, it takes the whole batch's locks
-- before anything else: advisory locks of reservation ids, then of idempotency keys (in
-- hash order), the reservations it commits or releases (in key order), then every existing
-- account of the batch in key order. The sweep locks its accounts in key order too, and so
-- does roll_periods, which holds every account it rolls until it commits (in account_id
-- order, it deadlocked with the key-ordered sweep: found by review). What remains: accounts a batch creates are locked when created; two transactions creating the
-- same new accounts in opposite orders can still meet the deadlock detector (40P01, retried
-- by the SDK and the worker), as before.
-- roll_periods also no longer counts a failed step toward its batch: an account that fails
-- at every call (one tenant's broken configurations) used up the batch of every account
-- after it in key order (found by an audit; see also 022).
-- Migrations once applied are never edited, so the three functions are replaced whole;
-- only step 2b of apply_events, the ORDER BY of the sweep and of roll_periods, and the
-- count of roll_periods' failed steps are new.

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

CREATE OR REPLACE FUNCTION meter.release_expired_reservations(p_namespace text DEFAULT NULL,
                                                   p_batch_size integer DEFAULT 1000)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_namespaces text[];
    v_accounts bigint[];
    v_totals numeric[];
    v_count integer;
BEGIN
    IF p_namespace IS NULL THEN
        IF nullif(current_setting('meter.tenant', true), '') IS NOT NULL
           OR NOT meter._is_privileged(session_user) THEN
            RAISE EXCEPTION 'namespace: sweeping every namespace needs a privileged role and no tenant'
                USING ERRCODE = 'MT004', COLUMN = 'namespace';
        END IF;
    ELSE
        PERFORM meter._guard(p_namespace);
    END IF;
    IF p_batch_size IS NULL OR p_batch_size < 1 OR p_batch_size > 100000 THEN
        PERFORM meter._fail('MT001', 'batch_size', format('must be between 1 and 100000, got %s',
                                                          coalesce(p_batch_size::text, 'NULL')));
    END IF;

    WITH due AS (
        SELECT r.namespace, r.reservation_id
        FROM meter.reservations r
        WHERE r.status = 'active' AND r.expires_at <= now()
          AND (p_namespace IS NULL OR r.namespace = p_namespace)
        ORDER BY r.expires_at
        LIMIT p_batch_size
        FOR UPDATE SKIP LOCKED
    ), expired AS (
        UPDATE meter.reservations r
        SET status = 'expired', completed_at = now(),
            completed_actor = '{"actor_id": "system:expiry"}'::jsonb
        FROM due
        WHERE r.namespace = due.namespace AND r.reservation_id = due.reservation_id
        RETURNING r.namespace, r.account_id, r.amount
    ), per_account AS (
        SELECT e.namespace, e.account_id, sum(e.amount) AS total, count(*) AS n
        FROM expired e GROUP BY e.namespace, e.account_id
    )
    SELECT array_agg(p.namespace ORDER BY p.account_id), array_agg(p.account_id ORDER BY p.account_id),
           array_agg(p.total ORDER BY p.account_id), coalesce(sum(p.n), 0)
    INTO v_namespaces, v_accounts, v_totals, v_count
    FROM per_account p;

    IF v_count = 0 THEN
        RETURN 0;
    END IF;
    PERFORM 1 FROM meter.accounts a
    JOIN unnest(v_namespaces, v_accounts) AS d(namespace, account_id)
      ON a.namespace = d.namespace AND a.account_id = d.account_id
    ORDER BY a.namespace, coalesce(a.user_id, ''), a.event_type, a.resource, a.unit
    FOR UPDATE OF a;
    UPDATE meter.accounts a
    SET reserved = a.reserved - d.total, updated_at = now()
    FROM unnest(v_namespaces, v_accounts, v_totals) AS d(namespace, account_id, total)
    WHERE a.namespace = d.namespace AND a.account_id = d.account_id;
    RETURN v_count;
END
$$;

REVOKE EXECUTE ON FUNCTION meter.apply_events(jsonb, text, boolean) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION meter.release_expired_reservations(text, integer) FROM PUBLIC;

-- roll_periods: its accounts in key order, as everyone else takes them.
CREATE OR REPLACE FUNCTION meter.roll_periods(p_namespace text DEFAULT NULL,
                                   p_now timestamptz DEFAULT now(),
                                   p_batch_size integer DEFAULT 100)
RETURNS TABLE (namespace text, user_id text, event_type text, resource text, unit text,
               status text, closed_period_end date, expired numeric, carried_over numeric,
               opened_period_start date, allocation numeric, balance numeric, error text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_now timestamptz;
    v_today date;
    v_steps integer := 0;
    v_start date;
    v_month date;
    v_cand record;
    v_acc meter.accounts;
    v_next date;
    v_close record;
    v_prior meter.periods;
    v_done boolean;
    v_actor text := current_setting('meter.actor_id', true);
BEGIN
    IF p_namespace IS NULL THEN
        PERFORM meter._require_maintenance('rolling every namespace');
    ELSE
        PERFORM meter._guard(p_namespace);
    END IF;
    v_now := meter._now(p_now);
    IF p_batch_size IS NULL OR p_batch_size < 1 OR p_batch_size > 10000 THEN
        PERFORM meter._fail('MT001', 'batch_size', format('must be between 1 and 10000, got %s',
                                                          coalesce(p_batch_size::text, 'NULL')));
    END IF;
    v_today := (v_now AT TIME ZONE 'UTC')::date;

    PERFORM pg_advisory_xact_lock(19782, 1);

    IF coalesce(v_actor, '') = '' THEN
        PERFORM set_config('meter.actor_id', 'system:periods', true);
    END IF;

    FOR v_cand IN
        SELECT a.namespace, a.account_id, a.user_id, a.event_type, a.resource, a.unit
        FROM meter.accounts a
        WHERE a.period_allocation IS NOT NULL AND a.period_interval IS NOT NULL
          AND a.period_start <= v_today AND (p_namespace IS NULL OR a.namespace = p_namespace)
          AND ((a.period_start + a.period_interval)::date <= v_today
               OR NOT EXISTS (SELECT 1 FROM meter.periods p
                              WHERE p.namespace = a.namespace AND p.account_id = a.account_id
                                AND p.period_start = a.period_start
                                AND p.opened_at IS NOT NULL))
        ORDER BY a.namespace, coalesce(a.user_id, ''), a.event_type, a.resource, a.unit
    LOOP
        EXIT WHEN v_steps >= p_batch_size;
        LOOP
            EXIT WHEN v_steps >= p_batch_size;
            v_done := false;
            namespace := v_cand.namespace; user_id := v_cand.user_id;
            event_type := v_cand.event_type; resource := v_cand.resource; unit := v_cand.unit;
            status := 'rolled'; error := NULL;
            closed_period_end := NULL; expired := NULL; carried_over := NULL;
            opened_period_start := NULL; allocation := NULL; balance := NULL;
            -- One step per subtransaction: a step that fails is undone alone (the account's
            -- earlier steps stand), reported, and the account left for the next call.
            BEGIN
                -- The partitions this step dates rows in, before the account is locked (as
                -- every writer does): the months of its current period's first and last
                -- day and of the next period's first day, as read without the lock. Should
                -- the locked figures differ (a concurrent set_period_config), open/close
                -- create what is missing themselves.
                SELECT a.period_start, (a.period_start + a.period_interval)::date
                INTO v_start, v_next FROM meter.accounts a
                WHERE a.namespace = v_cand.namespace AND a.account_id = v_cand.account_id;
                FOREACH v_month IN ARRAY ARRAY[v_start, v_next - 1, v_next] LOOP
                    IF v_month <= v_today AND to_regclass(
                           format('meter.ledger_%s', to_char(v_month, 'YYYY_MM'))) IS NULL THEN
                        PERFORM meter.create_partition(extract(year FROM v_month)::integer,
                                                       extract(month FROM v_month)::integer);
                    END IF;
                END LOOP;
                SELECT * INTO v_acc FROM meter.accounts a
                WHERE a.namespace = v_cand.namespace AND a.account_id = v_cand.account_id
                FOR UPDATE;
                IF v_acc.period_allocation IS NULL OR v_acc.period_interval IS NULL
                   OR v_acc.period_start > v_today THEN
                    v_done := true;
                ELSIF NOT EXISTS (SELECT 1 FROM meter.periods p
                                  WHERE p.namespace = v_acc.namespace
                                    AND p.account_id = v_acc.account_id
                                    AND p.period_start = v_acc.period_start
                                    AND p.opened_at IS NOT NULL) THEN
                    -- 1. the current period was configured but never opened
                    status := 'opened';
                    opened_period_start := v_acc.period_start;
                    allocation := v_acc.period_allocation;
                    balance := meter.open_period(v_acc.user_id, v_acc.event_type, v_acc.unit,
                                                 v_acc.resource, v_acc.period_start, NULL,
                                                 v_acc.namespace);
                ELSE
                    -- 2. the current period has ended: close it, open the next
                    v_next := (v_acc.period_start + v_acc.period_interval)::date;
                    IF v_next > v_today THEN
                        v_done := true;
                    ELSE
                        SELECT * INTO v_close
                        FROM meter.close_period(v_acc.user_id, v_acc.event_type, v_acc.unit,
                                                v_acc.resource, v_next - 1, v_acc.namespace);
                        closed_period_end := v_next - 1;
                        expired := v_close.expired;
                        carried_over := v_close.carried_over;
                        opened_period_start := v_next;
                        -- The next period opened by hand already: keep it (open_period with
                        -- the configured allocation would conflict with another one) and
                        -- make it the current period.
                        SELECT * INTO v_prior FROM meter.periods p
                        WHERE p.namespace = v_acc.namespace AND p.account_id = v_acc.account_id
                          AND p.period_start = v_next AND p.opened_at IS NOT NULL;
                        IF FOUND THEN
                            allocation := v_prior.allocation;
                            UPDATE meter.accounts a SET period_start = v_next, updated_at = now()
                            WHERE a.namespace = v_acc.namespace
                              AND a.account_id = v_acc.account_id
                            RETURNING a.balance INTO balance;
                        ELSE
                            allocation := v_acc.period_allocation;
                            balance := meter.open_period(v_acc.user_id, v_acc.event_type,
                                                         v_acc.unit, v_acc.resource, v_next,
                                                         NULL, v_acc.namespace);
                        END IF;
                    END IF;
                END IF;
            EXCEPTION WHEN OTHERS THEN
                -- Transient failures (deadlock, serialization, lock timeout, cancel, resources,
                -- connection) abort the call: the caller retries it. Anything else is this
                -- account's.
                IF left(SQLSTATE, 2) IN ('40', '53', '55', '57', '08', '58', 'XX') THEN
                    RAISE;
                END IF;
                status := 'error';
                closed_period_end := NULL; expired := NULL; carried_over := NULL;
                opened_period_start := NULL; allocation := NULL; balance := NULL;
                error := SQLSTATE || ' ' || SQLERRM;
                -- not counted as a step: accounts that fail at every call must not use up
                -- the batch of the ones after them
                RETURN NEXT;
                EXIT;
            END;
            EXIT WHEN v_done;
            v_steps := v_steps + 1;
            RETURN NEXT;
        END LOOP;
    END LOOP;

    IF coalesce(v_actor, '') = '' THEN
        PERFORM set_config('meter.actor_id', coalesce(v_actor, ''), true);
    END IF;
END
$$;
