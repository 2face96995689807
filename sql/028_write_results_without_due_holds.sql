-- Write results leave out holds past their TTL, as the reads do since 023.
--
-- Why: Appendix C says a hold is expired once now() >= expires_at, swept or not, and
-- `available` is balance - reserved. 023 made the reads report that, but consume, reserve
-- and apply_events still reported `available` from the stored accounts.reserved, which
-- keeps an expired hold's amount until the sweep reaches it. So with 100 allocated and a
-- hold of 30 past its TTL, a consume of 10 returned available 60 while get_balance,
-- called right after, said 90 (for the sweep's interval, or as long as beat is down).
--
-- Now consume, reserve and apply_events' batch path subtract the amount of the account's
-- holds past their TTL from what they report, and restate the stored results a replay
-- returns (the idempotency key's, the hold's reserve_result), so that a replay returns
-- what the first call did. The stored accounts.reserved is unchanged, as for the reads;
-- the sweep still writes it.
--
-- The amount is read in a statement of its own, after the write: the write holds the
-- account's row lock by then, and a fresh snapshot agrees with the row it wrote. Read
-- inside the write's statement it would not: when the write waited for a transaction that
-- changed the account (a sweep, a commit), it sees that transaction's row but not its
-- holds, and could subtract a hold the sweep had already taken out. Every change to a hold
-- that moves `reserved` also updates the account, so none can commit in between.
--
-- consume takes the figure refusals report (019's meter._peek: the account by key, less
-- its holds past their TTL); reserve, which has the account's id, 023's meter._due_held;
-- a batch sums them once per account, _due_held's query inlined.
--
-- Cost: nothing for an account without holds (reserved = 0) or, for reserve, without
-- other holds; otherwise one look-up of 023's partial index per account (per call, or per
-- distinct account of a batch), which sums the account's holds past their TTL as the
-- reads do. Only when there are any: a second version of the key row (and of the hold's
-- row, for reserve) that the restated result writes.
--
-- Migrations once applied are never edited, so 004's consume (with 017's datestyle),
-- 019's reserve and 020's apply_events are replaced whole; only the lines marked 028
-- changed.

-- Set one figure of an idempotency key's stored result, which this transaction claimed:
-- a replay returns what the first call returned. Without a key, nothing.
CREATE FUNCTION meter._restate_claim(p_namespace text, p_key text, p_field text,
                                     p_value numeric)
RETURNS void
LANGUAGE sql AS $$
    UPDATE meter.idempotency_keys k
    SET result = k.result || jsonb_build_object(p_field, p_value)
    WHERE p_key IS NOT NULL AND k.namespace = p_namespace AND k.key = p_key
$$;
REVOKE EXECUTE ON FUNCTION meter._restate_claim(text, text, text, numeric) FROM PUBLIC;

-- apply_events' batch path: p_held lists the consumes written on accounts with holds
-- ({idx, namespace, account_id, key}). For those whose account has holds past their TTL,
-- add their amount to the result's `available` and take it out of the key's stored
-- `reserved`. Returns p_out, restated.
CREATE FUNCTION meter._restate_due_holds(p_out jsonb[], p_held jsonb)
RETURNS jsonb[]
LANGUAGE plpgsql AS $$
DECLARE
    v_due jsonb;  -- {"<idx>": amount} for the events whose account has holds past their TTL
BEGIN
    -- one index probe per account, not per event: a batch's events share accounts, and
    -- while beat is down an account's due holds pile up (materialized: inlined, the
    -- planner probed once per event again)
    WITH h AS (
        SELECT e->>'idx' AS idx, e->>'namespace' AS ns, (e->>'account_id')::bigint AS account_id
        FROM jsonb_array_elements(p_held) e
    ), due AS MATERIALIZED (
        -- 023's meter._due_held, inlined: called per account it cost ~2.5 us more each
        SELECT a.ns, a.account_id, d.due
        FROM (SELECT DISTINCT h.ns, h.account_id FROM h) a
        CROSS JOIN LATERAL (SELECT sum(r.amount) AS due FROM meter.reservations r
                            WHERE r.namespace = a.ns AND r.account_id = a.account_id
                              AND r.status = 'active' AND r.expires_at <= now()) d
    )
    SELECT jsonb_object_agg(h.idx, due.due) INTO v_due
    FROM h JOIN due ON due.ns = h.ns AND due.account_id = h.account_id
    WHERE due.due > 0;
    IF v_due IS NULL THEN
        RETURN p_out;
    END IF;
    UPDATE meter.idempotency_keys k
    SET result = k.result || jsonb_build_object(
                     'reserved', (k.result->>'reserved')::numeric - (v_due->>(h->>'idx'))::numeric)
    FROM jsonb_array_elements(p_held) h
    WHERE h->>'key' IS NOT NULL AND v_due ? (h->>'idx')
      AND k.namespace = h->>'namespace' AND k.key = h->>'key';
    RETURN (SELECT array_agg(
                       CASE WHEN o->'result' ? 'available' AND v_due ? (o->>'idx')
                            THEN jsonb_set(o, '{result,available}', to_jsonb(
                                     (o->'result'->>'available')::numeric
                                     + (v_due->>(o->>'idx'))::numeric))
                            ELSE o END
                       ORDER BY u.n)
            FROM unnest(p_out) WITH ORDINALITY AS u(o, n));
END
$$;
REVOKE EXECUTE ON FUNCTION meter._restate_due_holds(jsonb[], jsonb) FROM PUBLIC;

-- consume (004, with 017's datestyle)
CREATE OR REPLACE FUNCTION meter.consume(p_user_id text, p_event_type text, p_amount numeric,
                              p_unit text, p_resource text DEFAULT NULL,
                              p_check_balance boolean DEFAULT false,
                              p_idempotency_key text DEFAULT NULL,
                              p_event_time timestamptz DEFAULT NULL,
                              p_metadata jsonb DEFAULT NULL,
                              p_namespace text DEFAULT 'default')
RETURNS TABLE (success boolean, balance numeric, available numeric, entry_id bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET datestyle = 'ISO, MDY'  -- as set by 017 (CREATE OR REPLACE resets the settings)
AS $$
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
    IF v_post.reserved > 0 THEN
        -- 028: holds past their TTL reserve nothing; the stored result says the same
        v_peek := meter._peek(p_namespace, p_user_id, p_event_type, v_resource, p_unit);
        IF v_peek.reserved < v_post.reserved THEN
            available := v_post.balance - v_peek.reserved;
            PERFORM meter._restate_claim(p_namespace, p_idempotency_key, 'reserved',
                                         v_peek.reserved);
        END IF;
    END IF;
    RETURN NEXT;
END
$$;

-- reserve (019)
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

-- apply_events (020)
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
