-- A refused checked consume leaves no ledger month behind.
--
-- Why (found by a review of an earlier stop, listed as not built since): a consume with
-- check_balance and an event_time in a month with no partition created the partition
-- (meter._ledger_time) before the balance check refused it. No units moved, but a refusal
-- changed the schema, and a tenant could add empty months back to 1900 without writing a
-- row, each one more partition for every scan of the ledger to pass over.
--
-- Now such a consume checks the time's bounds as before, then creates the month, looks its
-- key up and writes in one subtransaction, which a refusal or a replay rolls back (private
-- SQLSTATE MTX02, caught here only) with the partition and the locks it took. A granted
-- consume is unchanged. Only this case pays for the subtransaction: undated consumes,
-- unchecked ones and those dated in a month that exists take the path they took before. A
-- refused write through apply_events goes through this function (its one-by-one path) in
-- a batch of one; a batch of several makes its dated events' months before its locks (044)
-- and keeps them.
--
-- Not changed: creating the partition gives the transaction an id, so that 040's
-- meter._expire_due, when the consume is short, passes over an account someone else holds
-- instead of waiting for it (as before 047, where _ledger_time created the month first).
--
-- Lock order: unchanged, inside the subtransaction: the month (036), the key (027), the
-- account.
--
-- Migrations once applied are never edited: 028's consume is replaced whole; only the
-- lines marked 047 changed.

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
    IF p_event_time IS NULL AND meter._now_ok() THEN
        v_time := now();
    ELSIF v_check AND p_event_time BETWEEN timestamptz '1900-01-01 00:00:00+00'
                                       AND now() + interval '24 hours'
          AND to_regclass('meter.ledger_'
                          || to_char(p_event_time AT TIME ZONE 'UTC', 'YYYY_MM')) IS NULL THEN
        -- 047: a checked consume dated in a month with no partition yet creates it only
        -- when granted (below); a refusal leaves no month behind
        v_time := p_event_time;
        v_new_month := true;
    ELSE
        v_time := meter._ledger_time('event_time', p_event_time);
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
            PERFORM meter._ledger_time('event_time', p_event_time);
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
