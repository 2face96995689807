-- An adjust naming an entry holds no lock on the ledger's months to its end.
--
-- Why (the strict xfail of the last note, now passing: test_apply_events.py
-- test_an_adjust_naming_an_entry_holds_locks_bounded_by_its_events): adjust checks that
-- p_reference_id is a ledger entry of the namespace by reading meter.ledger by id, which
-- no partition bound prunes, so the read locks every month's partition and its indexes
-- (about three entries of the server's shared lock table a month), held to the end of the
-- call. Any tenant can date events back to 1900, some 1,500 months: one such call then
-- held some 4,500 entries, and in apply_events (100 events a call, 054) two at once
-- overflowed a default server's table, 53200 "out of shared memory" for every session.
--
-- Now the read runs in a subtransaction that is rolled back once it has its answer, which
-- releases the locks it took (PostgreSQL releases a lock taken after a savepoint when the
-- savepoint is rolled back). Ledger rows are never updated or deleted; retention may drop
-- the entry's month once the read lets it go, which is no different from retention
-- dropping it after the adjust commits: reference_id is a plain number, as before.
-- adjust is otherwise 030's, unchanged, and so is its lock order.

-- Whether ledger entry p_id exists in namespace p_namespace, holding no lock afterwards
-- on the partitions the look-up read (those it held before stay held).
CREATE FUNCTION meter._ledger_entry_exists(p_namespace text, p_id bigint) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_found boolean;
BEGIN
    BEGIN
        v_found := EXISTS (SELECT 1 FROM meter.ledger l
                           WHERE l.namespace = p_namespace AND l.id = p_id);
        -- A plpgsql variable keeps its value when the block's subtransaction rolls back.
        RAISE SQLSTATE 'MTX03';
    EXCEPTION WHEN SQLSTATE 'MTX03' THEN
        NULL;
    END;
    RETURN v_found;
END
$$;
REVOKE EXECUTE ON FUNCTION meter._ledger_entry_exists(text, bigint) FROM PUBLIC;

------------------------------------------------------------------------------------------
-- adjust: a correction or refund, either sign, never 0; may drive the balance negative.
-- p_reference_id, when given, must be a ledger entry of this namespace (MT003 otherwise).
-- Locks: the key's advisory lock, then the account's queue lock (035: when its transaction
-- has locked no row yet), then the account. Reading the referenced entry locks
-- every ledger month for a moment only (063: meter._ledger_entry_exists).
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
    IF p_reference_id IS NOT NULL
       AND NOT meter._ledger_entry_exists(p_namespace, p_reference_id) THEN  -- 063
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

REVOKE EXECUTE ON FUNCTION meter.adjust(text, text, numeric, text, text, bigint, text, jsonb,
                                        text) FROM PUBLIC;
