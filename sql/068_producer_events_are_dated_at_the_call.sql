-- A consume or allocate sent through the producer without an event_time is dated when its
-- call was made, not when a worker applies it; the call's time counts in no fingerprint.
--
-- Why (found by a review, checked with a stopped worker): such an event was dated by
-- now() in the worker's transaction. After a backlog, an outage's retries or a dead
-- letter retried later, usage queued at 23:59 on Jan 31 counted in February (get_usage)
-- and against the next billing period (the roll reads the rows' dates). Filling
-- event_time at the producer is not the fix: an explicit event_time counts in the
-- idempotency fingerprint (SPEC, Appendix C), so the caller's own resend with the same key
-- a second later, stamped anew, would be a conflict (MT002, a dead letter) instead of a
-- replay.
--
-- Now the producer stamps every consume and allocate it enqueues without an event_time
-- with the call's time, in UTC, in the event object's own field `occurred_at` (beside op,
-- namespace and args: not an argument of the call). Only the time the row is dated by
-- changes:
--   - apply_events' fast path dates such an event by it (coalesce(event_time,
--     occurred_at, now())); `explicit_time` and the fingerprint still see only
--     event_time. Its month is made in step 1 like a backdated event's, for the one-by-one
--     events too (v_dated), before any lock.
--   - _apply_one (the one-by-one path, single-event tasks, dead-letter retries) sets the
--     transaction-local setting meter.occurred_at to it for the one call of consume or
--     allocate, and '' otherwise and after it, so no event inherits another's.
--   - consume and allocate read meter.occurred_at only when p_event_time is NULL and the
--     setting is not empty: the direct SDK, which never sets it, pays one
--     current_setting() per undated call and keeps now(). The hash is computed from
--     p_event_time as before: a resend with the same key at a later call time replays the
--     first application's row and result.
-- A set stamp is held to event_time's rules (meter._occurred_at): ISO 8601 with its
-- offset, from 1900 to 24 hours after the database's now(). One that breaks them is
-- ignored: the event is dated by now(), as before 068, and applied. Refusing it would
-- dead-letter a valid call (the caller gave no time) for a producer's clock or a crafted
-- field, and a retry could never pass; the stamp is a hint about when, and the worst a
-- wrong one within the bounds does is what a caller's own event_time may do. Other ops
-- ignore the field: reserve, commit (whose lateness the database clock judges, SPEC),
-- release and adjust keep apply-time dating.
--
-- A caller of consume/allocate who sets meter.occurred_at itself gets the same: a default
-- time, validated, counted in no fingerprint (no more than an explicit event_time allows).
--
-- Lock order: unchanged. A stamped event of a batch makes its month in step 1, as a dated
-- one does; a single event makes it where a dated one does (036's _ledger_time: the ledger
-- for a past month, then the month, before the key and the account; 047's subtransaction
-- for a checked consume in a month with no partition).
--
-- Migrations once applied are never edited: 047's consume, 004's allocate (with 017's
-- DateStyle), 067's _apply_one (032's with 067's release key) and 054's apply_events are
-- replaced whole; only the lines marked 068 changed.

-- The time a producer stamped on an event (its `occurred_at`), when it keeps event_time's
-- rules; NULL otherwise (the caller then dates the event by now()). Inlinable; the casts
-- are reached only for a valid text.
CREATE FUNCTION meter._occurred_at(p_value text) RETURNS timestamptz
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN NOT coalesce(meter._time_text_ok(p_value)
                                  AND pg_input_is_valid(p_value, 'timestamptz'), false)
                    THEN NULL
                WHEN p_value::timestamptz BETWEEN timestamptz '1900-01-01 00:00:00+00'
                                              AND now() + interval '24 hours'
                    THEN p_value::timestamptz
           END
$$;
REVOKE EXECUTE ON FUNCTION meter._occurred_at(text) FROM PUBLIC;

-- consume (047's; the lines marked 068 changed): record usage. With p_check_balance,
-- refuses (success=false, nothing written, no account created, no key claimed) when
-- available < amount; without, may drive the balance negative, creating the account if
-- needed. Dated by p_event_time, else (068) by meter.occurred_at when set and valid, else
-- now(); only p_event_time counts in the fingerprint.
-- Locks: the month (a past one: the ledger's ROW EXCLUSIVE first; 047: in a
-- subtransaction for a checked consume in a month with no partition), the key's advisory
-- lock, the account's advisory lock (in a transaction with no row yet, 035), the account.
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
    v_new_month boolean := false;  -- 047
    v_given timestamptz := p_event_time;  -- 068: the time the row is dated by, when given
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
    -- 068: without an event_time, the time the call was made (apply_events' own, set for
    -- this call only, validated here, counted in no fingerprint), when there is one
    IF p_event_time IS NULL AND coalesce(current_setting('meter.occurred_at', true), '') <> '' THEN
        v_given := meter._occurred_at(current_setting('meter.occurred_at', true));  -- 068
    END IF;                                                                          -- 068
    IF v_given IS NULL AND meter._now_ok() THEN  -- 068: v_given (was p_event_time)
        v_time := now();
    ELSIF v_check AND v_given BETWEEN timestamptz '1900-01-01 00:00:00+00'           -- 068
                                  AND now() + interval '24 hours'
          AND to_regclass('meter.ledger_'
                          || to_char(v_given AT TIME ZONE 'UTC', 'YYYY_MM')) IS NULL THEN  -- 068
        -- 047: a checked consume dated in a month with no partition yet creates it only
        -- when granted (below); a refusal leaves no month behind
        v_time := v_given;                                                           -- 068
        v_new_month := true;
    ELSE
        v_time := meter._ledger_time('event_time', v_given);                          -- 068
    END IF;
    IF p_idempotency_key IS NOT NULL THEN
        v_hash := meter._hash('consume', p_user_id, p_event_type, v_resource, p_unit,
                              v_amount::text, v_check::text,
                              (p_event_time AT TIME ZONE 'UTC')::text, p_metadata::text);
    END IF;
    IF v_new_month THEN
        -- 047: the month, the key's look-up and the write, in that order (months before
        -- keys, 036 and 027), in a subtransaction that a refusal or a replay rolls back
        -- with the partition it created and its locks; v_post and v_replay keep what was
        -- returned
        BEGIN
            PERFORM meter._ledger_time('event_time', v_given);                           -- 068
            IF p_idempotency_key IS NOT NULL THEN
                v_replay := meter._replay(p_namespace, p_idempotency_key, 'consume', v_hash);
                IF v_replay IS NOT NULL THEN
                    RAISE EXCEPTION USING ERRCODE = 'MTX02';
                END IF;
            END IF;
            v_post := meter._apply(p_namespace, p_user_id, p_event_type, v_resource, p_unit,
                                   'consumption', -v_amount, v_time, v_amount, NULL,
                                   p_metadata, p_idempotency_key, 'consume', v_hash);
            IF v_post.entry_id IS NULL THEN
                RAISE EXCEPTION USING ERRCODE = 'MTX02';
            END IF;
        EXCEPTION WHEN SQLSTATE 'MTX02' THEN
            -- replayed or refused: reported below. _replay's note for _apply_one's status
            -- (meter.replayed, 027) went with the subtransaction: set again
            IF v_replay IS NOT NULL THEN
                PERFORM set_config('meter.replayed', 'on', true);
            END IF;
        END;
    ELSIF p_idempotency_key IS NOT NULL THEN
        v_replay := meter._replay(p_namespace, p_idempotency_key, 'consume', v_hash);
    END IF;
    IF v_replay IS NOT NULL THEN
        success := true;
        balance := (v_replay->>'balance')::numeric;
        available := balance - (v_replay->>'reserved')::numeric;
        entry_id := (v_replay->>'entry_id')::bigint;
        RETURN NEXT;
        RETURN;
    END IF;
    IF NOT v_new_month THEN
        v_post := meter._apply(p_namespace, p_user_id, p_event_type, v_resource, p_unit,
                               'consumption', -v_amount, v_time,
                               CASE WHEN v_check THEN v_amount END, NULL, p_metadata,
                               p_idempotency_key, 'consume', v_hash);
    END IF;
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

-- allocate (004's, with 017's DateStyle; the lines marked 068 changed): add quota or
-- credits. Pools (user_id NULL) allowed. Creates the account. Dated as consume (068).
-- Locks (as 055 states them): the month (a past one: the ledger's ROW EXCLUSIVE first),
-- the key's advisory lock, the account's advisory lock (in a transaction with no row yet),
-- the account.
CREATE OR REPLACE FUNCTION meter.allocate(p_user_id text, p_event_type text, p_amount numeric,
                               p_unit text, p_resource text DEFAULT NULL,
                               p_idempotency_key text DEFAULT NULL,
                               p_event_time timestamptz DEFAULT NULL,
                               p_metadata jsonb DEFAULT NULL,
                               p_namespace text DEFAULT 'default')
RETURNS TABLE (balance numeric, entry_id bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET datestyle = 'ISO, MDY'  -- as set by 017 (CREATE OR REPLACE resets the settings)
AS $$
DECLARE
    v_resource text;
    v_amount numeric;
    v_time timestamptz;
    v_hash text;
    v_replay jsonb;
    v_post record;
    v_given timestamptz := p_event_time;  -- 068: as consume's
BEGIN
    -- Fast path: every check in one expression. Otherwise one by one, for the refusal.
    IF meter._fast_ok(p_namespace, p_user_id, true, p_event_type, p_unit, p_resource)
       AND (p_idempotency_key IS NULL OR meter._plain_ok(p_idempotency_key, 256))
       AND meter._metadata_ok(p_metadata) AND meter._amount_plain(p_amount, 'positive') THEN
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
        v_amount := meter._amount('amount', p_amount, 'positive');
    END IF;
    -- 068: without an event_time, the call's own time (as consume)
    IF p_event_time IS NULL AND coalesce(current_setting('meter.occurred_at', true), '') <> '' THEN
        v_given := meter._occurred_at(current_setting('meter.occurred_at', true));  -- 068
    END IF;                                                                          -- 068
    v_time := CASE WHEN v_given IS NULL AND meter._now_ok() THEN now()             -- 068
                   ELSE meter._ledger_time('event_time', v_given) END;             -- 068
    IF p_idempotency_key IS NOT NULL THEN
        v_hash := meter._hash('allocate', p_user_id, p_event_type, v_resource, p_unit,
                              v_amount::text, (p_event_time AT TIME ZONE 'UTC')::text,
                              p_metadata::text);
        v_replay := meter._replay(p_namespace, p_idempotency_key, 'allocate', v_hash);
        IF v_replay IS NOT NULL THEN
            balance := (v_replay->>'balance')::numeric;
            entry_id := (v_replay->>'entry_id')::bigint;
            RETURN NEXT;
            RETURN;
        END IF;
    END IF;

    v_post := meter._apply(p_namespace, p_user_id, p_event_type, v_resource, p_unit,
                           'allocation', v_amount, v_time, NULL, NULL, p_metadata,
                           p_idempotency_key, 'allocate', v_hash);
    balance := v_post.balance;
    entry_id := v_post.entry_id;
    RETURN NEXT;
END
$$;

-- Apply one event through its op's API function (067's; the lines marked 068 are new).
-- Returns {status, result}: status 'applied', 'replayed', 'refused' or 'not_found'. Raises
-- what the function raises.
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
    -- 068: the time the producer's call was made, for consume and allocate without an
    -- event_time (they read it only then, and validate it); '' for every other event, so
    -- that no event of a batch or of a retry inherits another's
    PERFORM set_config('meter.occurred_at',
                       CASE WHEN v_op IN ('consume', 'allocate')
                                 AND jsonb_typeof(p_event->'occurred_at') = 'string'
                            THEN p_event->>'occurred_at' ELSE '' END, true);         -- 068

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
    PERFORM set_config('meter.occurred_at', '', true);                               -- 068
    RETURN jsonb_build_object('status', v_status, 'result', v_result);
END
$$;

-- apply_events (054's; the lines marked 068 are new)
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
    v_dated meter._event[];  -- 044
    -- 044: whether the transaction held no row before the batch (see 2b, and 054)
    v_fresh boolean := pg_current_xact_id_if_assigned() IS NULL;
    v_held jsonb;
    v_months timestamptz[];  -- 050
    v_new_months integer;    -- 050
    v_new_ns text[];         -- 054: the accounts a fast batch creates, in key order
    v_new_users text[];      -- 054
    v_new_types text[];      -- 054
    v_new_resources text[];  -- 054
    v_new_units text[];      -- 054
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
        -- 044: step 1 (partitions) comes after the classification and 3a, for the events
        -- that passed them only

        -- 2. classify: the fast path takes valid unchecked consume/allocate/adjust events (the
        --    first of each key in the batch); everything else goes one by one. Identifiers
        --    shared by many events (event_type, unit, resource, user_id) are checked once per
        --    distinct value; an event with any bad one goes to the slow path, which names it.
        --    044: and an event whose account an earlier one-by-one event touches goes one by
        --    one too (behind it, in array order); a key's first use in the array, whatever
        --    its path, is the one that claims it.
        WITH raw AS (
            SELECT (e.ord - 1)::integer AS idx, e.value AS ev, e.value->>'op' AS op,
                   e.value->>'namespace' AS ns, e.value->'args' AS a
            FROM jsonb_array_elements(p_events) WITH ORDINALITY AS e(value, ord)
        ), parsed AS MATERIALIZED (
            -- 044: every event of the batch, `shaped` when it may take the fast path by its
            -- form (it was the filter), `key_rank` among every event of the batch
            SELECT r.idx, r.op, r.ns, r.a,
                   r.a->>'user_id' AS user_id, r.a->>'event_type' AS event_type,
                   coalesce(r.a->>'resource', '') AS resource, r.a->>'unit' AS unit,
                   CASE WHEN pg_input_is_valid(r.a->>'amount', 'numeric')
                        THEN trim_scale((r.a->>'amount')::numeric) END AS amount,
                   r.a->>'idempotency_key' AS key,
                   CASE WHEN pg_input_is_valid(r.a->>'event_time', 'timestamptz')
                        THEN (r.a->>'event_time')::timestamptz END AS event_time,
                   CASE WHEN jsonb_typeof(r.a->'metadata') = 'null' THEN NULL
                        ELSE r.a->'metadata' END AS metadata,
                   -- 068: the producer's call time, the default of consume and allocate
                   -- (NULL when absent or not valid: then now(), as before)
                   CASE WHEN r.op IN ('consume', 'allocate')
                             AND jsonb_typeof(r.ev->'occurred_at') = 'string'
                        THEN meter._occurred_at(r.ev->>'occurred_at') END AS occurred_at,  -- 068
                   CASE WHEN jsonb_typeof(r.ev) = 'object' AND jsonb_typeof(r.a) = 'object'  -- 044
                             AND r.op IN ('consume', 'allocate', 'adjust')
                             AND r.ns = ANY (v_allowed)
                        -- no argument the op does not take (jsonb minus the allowed names
                        -- leaves none)
                        THEN r.a - meter._event_args(r.op) = '{}'::jsonb
                             -- 044: a checked consume is shaped (its month is made in step 1)
                             AND coalesce(jsonb_typeof(r.a->'check_balance'), 'null')
                                 IN ('boolean', 'null')
                             AND r.a->'reference_id' IS NULL
                        ELSE false END AS shaped,                                        -- 044
                   coalesce(r.a->'check_balance' = 'true'::jsonb, false) AS checked,     -- 044
                   row_number() OVER (PARTITION BY r.ns, r.a->>'idempotency_key'         -- 044
                                      ORDER BY r.idx) AS key_rank
            FROM raw r
        ), bad_ident AS MATERIALIZED (
            SELECT v.kind, v.value
            FROM (SELECT DISTINCT 'u' AS kind, p.user_id AS value FROM parsed p WHERE p.shaped
                  UNION ALL SELECT DISTINCT 'e', p.event_type FROM parsed p WHERE p.shaped
                  UNION ALL SELECT DISTINCT 'n', p.unit FROM parsed p WHERE p.shaped
                  UNION ALL SELECT DISTINCT 'r', p.resource FROM parsed p WHERE p.shaped) v  -- 044
            WHERE NOT coalesce(CASE v.kind WHEN 'u' THEN meter._ident_ok(v.value, 256)
                                           WHEN 'e' THEN meter._ident_ok(v.value, 256)
                                           WHEN 'n' THEN meter._ident_ok(v.value, 64)
                                           ELSE v.value = '' OR meter._ident_ok(v.value, 256) END,
                               v.kind = 'u')
        ), classed AS MATERIALIZED (
            -- 044: `valid` (it was the filter of `eligible`), and `first` (the key's first use)
            SELECT p.*,
                   CASE WHEN p.shaped THEN
                       (p.op <> 'consume' OR p.user_id IS NOT NULL)
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
                   ELSE false END AS valid,                                              -- 044
                   p.key IS NULL OR p.key_rank = 1 AS first                              -- 044
            FROM parsed p
        ), touched AS (
            -- 044: the accounts the events that go one by one in any case touch: their own,
            -- or for a commit or release its stored reservation's (an unknown one touches
            -- none). One made by an earlier reserve of the batch needs no row here: that
            -- reserve goes one by one and touches the same account, earlier.
            SELECT c.idx, c.ns, c.user_id, c.event_type, c.resource, c.unit
            FROM classed c
            WHERE NOT (c.valid AND NOT c.checked AND c.first)
              AND c.op IN ('consume', 'allocate', 'adjust', 'reserve')
            UNION ALL
            SELECT c.idx, r.namespace, r.user_id, r.event_type, r.resource, r.unit
            FROM classed c
            JOIN meter.reservations r ON r.namespace = c.ns
                                     AND r.reservation_id = c.a->>'reservation_id'
            WHERE c.op IN ('commit', 'release')
        ), first_touch AS (
            -- 044: per account, the first event of the batch to touch it one by one
            SELECT t.ns, coalesce(t.user_id, '') AS user_key, t.event_type, t.resource, t.unit,
                   min(t.idx) AS idx
            FROM touched t
            GROUP BY 1, 2, 3, 4, 5
        ), decided AS (
            -- 044: fast when valid, unchecked, the key's first use, and before any event that
            -- touches its account one by one
            SELECT c.*,
                   c.valid AND NOT c.checked AND c.first
                   AND (s.idx IS NULL OR s.idx > c.idx)
                   -- and before any adjust that refers to an entry: one after it could
                   -- write (on the fast path, first) the entry it refers to
                   AND c.idx < coalesce((SELECT min(r.idx) FROM classed r
                                         WHERE r.op = 'adjust'
                                           AND jsonb_typeof(r.a->'reference_id') <> 'null'),
                                        2147483647) AS fast
            FROM classed c
            LEFT JOIN first_touch s ON s.ns = c.ns AND s.user_key = coalesce(c.user_id, '')
                                   AND s.event_type = c.event_type AND s.resource = c.resource
                                   AND s.unit = c.unit
        )
        SELECT array_agg(ROW(e.idx, e.ns, e.op, e.user_id, e.event_type, e.resource, e.unit,
                             CASE WHEN e.op = 'consume' THEN -e.amount ELSE e.amount END,
                             e.key, coalesce(e.event_time, e.occurred_at, now()),       -- 068
                             e.event_time IS NOT NULL,
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
                             END)::meter._event ORDER BY e.idx) FILTER (WHERE e.fast),  -- 044
               array_agg(DISTINCT e.ns) FILTER (WHERE e.fast),                            -- 044
               array_agg(e.key) FILTER (WHERE e.fast AND e.key IS NOT NULL),              -- 044
               -- 044: the valid dated events that go one by one, for their months (step 1)
               -- 068: and those dated by their call time
               array_agg(ROW(e.idx, e.ns, e.op, NULL, NULL, NULL, NULL, NULL, e.key,
                             coalesce(e.event_time, e.occurred_at), true, NULL,
                             NULL)::meter._event)                                        -- 068
                   FILTER (WHERE NOT e.fast AND e.valid
                             AND coalesce(e.event_time, e.occurred_at) IS NOT NULL)      -- 068
        INTO v_fast, v_fast_ns, v_keys, v_dated                                          -- 044
        FROM decided e;

        SELECT array_agg(i ORDER BY i) INTO v_slow
        FROM generate_series(0, jsonb_array_length(p_events) - 1) i
        WHERE i NOT IN (SELECT f.idx FROM unnest(v_fast) f);
        -- 050: step 2b takes a lock per one-by-one key and reservation id and per account of
        -- the batch, in the server's shared lock table: bound them before anything is done
        IF v_slow IS NOT NULL AND jsonb_array_length(p_events) > 100 THEN                -- 054
            PERFORM meter._fail('MT001', 'events', format(                              -- 050
                'at most 100 events per call when any goes one by one (a checked consume, '  -- 054
                || 'reserve, commit, release, invalid event or one after those on its account '
                || 'or key); got %s events, %s of them one by one: send smaller batches', -- 050
                jsonb_array_length(p_events), cardinality(v_slow)));                    -- 050
        END IF;                                                                          -- 050

        -- 3a. keys seen before: replay the same request, refuse a different one. The look-up
        --     goes through the key's index (meter._seen_keys: never a scan of the whole,
        --     ever-growing, key table, whatever plan is cached). 044: before step 1, so that
        --     an event refused here dates no partition; it reads, and locks nothing (the
        --     batch never locks a fast event's key: 2b locks those of the slow ones).
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

        -- 1. partitions, before any lock (044: moved here): this month's, and the months of
        --    the events the fast path writes and of the valid dated events that go one by
        --    one (consume and allocate: their month is made here, not under the accounts'
        --    locks in step 4), less those of a key stored already (replayed or refused
        --    there, after their own look-up). An invalid event, or one of a namespace the
        --    caller may not write, dates none: the one-by-one path refuses it before its
        --    month, or rolls its month back with it. In month order: two batches making the
        --    same months take their locks in one order.
        --    050: the months first, and a call that would create more than 100 of them
        --    refused before the first (each new month takes some twelve locks in the
        --    server's shared lock table, held to the end of the transaction)
        SELECT array_agg(x.month ORDER BY x.month) INTO v_months                                 -- 050
        FROM (
            SELECT DISTINCT date_trunc('month', m.t AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS month  -- 044
            FROM (SELECT now() AS t
                  UNION ALL
                  SELECT f.event_time FROM unnest(v_fast) f                                      -- 044
                  UNION ALL
                  SELECT d.event_time FROM unnest(v_dated) d                                     -- 044
                  WHERE d.key IS NULL
                     OR NOT EXISTS (SELECT 1 FROM meter._seen_keys(ARRAY[d.namespace], ARRAY[d.key]))) m
        ) x;                                                                                     -- 050
        SELECT count(*) INTO v_new_months FROM unnest(v_months) m(month)                         -- 050
        WHERE to_regclass('meter.ledger_' || to_char(m.month AT TIME ZONE 'UTC', 'YYYY_MM')) IS NULL;  -- 050
        IF v_new_months > 100 THEN                                                               -- 050
            PERFORM meter._fail('MT001', 'events', format(                                      -- 050
                'at most 100 ledger months without a partition per call (each new month '
                || 'takes about 12 locks in the server''s shared lock table); got %s events '
                || 'dated in %s such months: send smaller batches, or fewer months each',       -- 050
                jsonb_array_length(p_events), v_new_months));                                   -- 050
        END IF;                                                                                  -- 050
        FOREACH v_month IN ARRAY v_months                                                        -- 050
        LOOP
            PERFORM meter._ledger_time('event_time', v_month);
        END LOOP;

        -- 2b. With events for the one-by-one path, take the whole batch's locks first, in the
        --     one order single calls and the sweep use: the advisory locks of reservation
        --     ids, then of idempotency keys, then (044) of every account of the batch; the
        --     reservations committed or released; then every existing account of the batch
        --     in key order. Taken event by event after the fast path's accounts, they
        --     deadlocked with the sweep (which holds a reservation while it waits for its
        --     account) and with single calls (which hold a key's lock while they wait for
        --     its account). 044: accounts the batch creates are not new to it alone: two
        --     such batches creating the same accounts in crossed orders deadlocked. Each now
        --     queues for every account of the batch, new or existing, on the account's
        --     advisory lock (035's, meter._queue_for_account) in key order, before any row
        --     lock; only in a transaction that held no row before the batch (no transaction
        --     id: 035's rule, a holder of a row must not wait for an account's advisory lock).
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
            IF v_fresh THEN                                                              -- 044
                FOR v_lock IN
                    SELECT DISTINCT x.ns, x.user_id, x.user_key, x.event_type, x.resource, x.unit
                    FROM (SELECT e->>'namespace' AS ns, e->'args'->>'user_id' AS user_id,
                                 coalesce(e->'args'->>'user_id', '') AS user_key,
                                 e->'args'->>'event_type' AS event_type,
                                 coalesce(e->'args'->>'resource', '') AS resource,
                                 e->'args'->>'unit' AS unit
                          FROM jsonb_array_elements(p_events) e
                          WHERE e->>'op' IN ('consume', 'allocate', 'adjust', 'reserve')
                            AND e->>'namespace' = ANY (v_allowed)
                          UNION ALL
                          SELECT r.namespace, r.user_id, coalesce(r.user_id, ''), r.event_type,
                                 r.resource, r.unit
                          FROM meter.reservations r
                          WHERE (r.namespace, r.reservation_id) IN (
                              SELECT e->>'namespace', e->'args'->>'reservation_id'
                              FROM unnest(v_locking) e
                              WHERE e->>'op' IN ('commit', 'release'))) x
                    WHERE x.event_type IS NOT NULL AND x.unit IS NOT NULL
                    ORDER BY x.ns, x.user_key, x.event_type, x.resource, x.unit
                LOOP
                    PERFORM meter._queue_for_account(v_lock.ns, v_lock.user_id,
                                                     v_lock.event_type, v_lock.resource,
                                                     v_lock.unit);
                END LOOP;
            END IF;                                                                      -- 044
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
        -- 054: a batch whose events all take the fast path queues, as a mixed one does
        --      in 2b, for every account it will create, on the account's advisory lock in
        --      key order, before its upsert takes the first row: otherwise it created a
        --      new account N, then waited for an existing Z that a mixed batch held since
        --      its 2b, whose event on N then waited for that insert (40P01). Only in a
        --      transaction that held no row before the batch (035's rule), and for at
        --      most 300 new accounts (at 1000 they filled it; entries of the shared lock table,
        --      no more than a call going one by one holds, below); existing accounts
        --      take none (see the header).
        IF v_slow IS NULL AND v_fast IS NOT NULL AND v_fresh THEN                        -- 054
            SELECT array_agg(n.ns ORDER BY n.ns, n.user_key, n.event_type, n.resource, n.unit),
                   array_agg(n.user_id ORDER BY n.ns, n.user_key, n.event_type, n.resource,
                                                n.unit),
                   array_agg(n.event_type ORDER BY n.ns, n.user_key, n.event_type, n.resource,
                                                   n.unit),
                   array_agg(n.resource ORDER BY n.ns, n.user_key, n.event_type, n.resource,
                                                 n.unit),
                   array_agg(n.unit ORDER BY n.ns, n.user_key, n.event_type, n.resource, n.unit)
            INTO v_new_ns, v_new_users, v_new_types, v_new_resources, v_new_units        -- 054
            FROM (SELECT DISTINCT f.namespace AS ns, f.user_id,
                         coalesce(f.user_id, '') AS user_key, f.event_type, f.resource, f.unit
                  FROM unnest(v_fast) f
                  WHERE NOT EXISTS (
                      SELECT 1 FROM meter.accounts a
                      WHERE a.namespace = f.namespace
                        AND coalesce(a.user_id, '') = coalesce(f.user_id, '')
                        AND a.event_type = f.event_type AND a.resource = f.resource
                        AND a.unit = f.unit)) n;                                          -- 054
            IF cardinality(v_new_ns) <= 300 THEN                                          -- 054
                FOR v_i IN 1 .. cardinality(v_new_ns) LOOP                                -- 054
                    PERFORM meter._queue_for_account(v_new_ns[v_i], v_new_users[v_i],
                                                     v_new_types[v_i], v_new_resources[v_i],
                                                     v_new_units[v_i]);                  -- 054
                END LOOP;                                                                 -- 054
            END IF;                                                                       -- 054
        END IF;                                                                           -- 054
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
            -- 054: and a session ended by a timeout (25P03, 25P04: FATAL, never caught
            -- here; listed so that this list stays the worker's, worker/retry.py)
            IF v_state IN ('40001', '40P01', '55P03', '57014', '25P03', '25P04')  -- 054
               OR v_state LIKE '08%'
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
    WHERE o->>'status' = 'error'
    ORDER BY (o->>'idx')::integer;  -- in array order, as the calls one by one file them

    RETURN QUERY
    SELECT (o->>'idx')::integer, (o->>'ok')::boolean, o->>'status',
           -- SQL NULL, not a JSON null the client would parse, when no results were asked
           CASE WHEN p_results THEN o->'result' END,
           o->>'error_sqlstate', o->>'error_message'
    FROM unnest(v_out) o
    ORDER BY 1;
END
$$;
