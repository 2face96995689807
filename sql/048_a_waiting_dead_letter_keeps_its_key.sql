-- A waiting dead letter keeps its event's idempotency key, and the CLI retries every
-- waiting dead letter, reserves first.
--
-- Why (found by a review of the dead-letter lifecycle, each reproduced):
-- 1. Dead letters wait until an operator acts; idempotency keys are pruned after 35 days
--    (prune_idempotency_keys). A dead letter whose event was in fact applied (MTW01: a
--    worker killed after the commit, before the ack) and retried after its key was pruned
--    applied the event a second time (a consume of 10: balance 80 where 90 is right).
--    Now a key named by a waiting dead letter (its payload's args.idempotency_key, in its
--    namespace) is not pruned; the partial index dead_letters_waiting_key serves the test.
--    Once the letter is retried or discarded, the key is pruned at its next turn.
-- 2. `meter dead-letters retry --all` read the newest 10,000 waiting letters only, and
--    newest first: older letters beyond them were never tried, and an orphaned commit
--    tried before the reserve whose retry settles it was reported still failing (or, the
--    other way round, raised "no dead letter waiting" and stopped the run).
--    meter.dead_letters_to_retry lists every waiting letter's id, reserves first, then
--    oldest first, in the caller's scope (meter._dead_letter_scope: its tenant, or every
--    namespace for a privileged role with none).
--
-- Locks: dead_letters_to_retry reads only. prune_idempotency_keys: unchanged (the keys it
-- claims, FOR UPDATE SKIP LOCKED). Migrations once applied are never edited: 009's
-- prune_idempotency_keys is replaced whole; only the lines marked 048 changed.

-- The key's md5, not the key: an event's key may be longer than an index entry holds (a
-- worker keys a single event by its task id), and its dead letter must still be stored.
CREATE INDEX dead_letters_waiting_key ON meter.dead_letters
    (namespace, md5((payload -> 'args') ->> 'idempotency_key'))
    WHERE status = 'dead';

CREATE OR REPLACE FUNCTION meter.prune_idempotency_keys(p_older_than_days integer DEFAULT 35,
                                             p_batch_size integer DEFAULT 10000,
                                             p_now timestamptz DEFAULT now())
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_now timestamptz;
    v_window interval;
    v_cutoff timestamptz;
    v_count integer;
BEGIN
    PERFORM meter._require_maintenance('pruning idempotency keys');
    IF p_older_than_days IS NULL OR p_older_than_days < 1 OR p_older_than_days > 36500 THEN
        PERFORM meter._fail('MT001', 'older_than_days',
            format('must be between 1 and 36500, got %s', coalesce(p_older_than_days::text, 'NULL')));
    END IF;
    IF p_batch_size IS NULL OR p_batch_size < 1 OR p_batch_size > 100000 THEN
        PERFORM meter._fail('MT001', 'batch_size', format('must be between 1 and 100000, got %s',
                                                          coalesce(p_batch_size::text, 'NULL')));
    END IF;
    v_now := meter._now(p_now);
    v_window := make_interval(days => p_older_than_days);
    v_cutoff := v_now - v_window;

    -- No index on created_at (it would cost every write): the scan stops at the first
    -- batch of old keys, which sit early in the table.
    WITH doomed AS (
        SELECT k.namespace, k.key FROM meter.idempotency_keys k
        WHERE k.created_at < v_cutoff
          AND NOT EXISTS (SELECT 1 FROM meter.reservations r
                          WHERE r.namespace = k.namespace AND r.reservation_id = k.reservation_id
                            AND r.status = 'active')
          AND NOT EXISTS (SELECT 1 FROM meter.ledger_checkpoints c
                          WHERE c.namespace = k.namespace AND c.account_id = k.account_id
                            AND c.updated_at >= v_cutoff
                            AND k.created_at >= c.updated_at - v_window)
          -- 048: the key of an event a dead letter still waits to retry
          AND NOT EXISTS (SELECT 1 FROM meter.dead_letters d
                          WHERE d.namespace = k.namespace AND d.status = 'dead'
                            AND md5((d.payload -> 'args') ->> 'idempotency_key') = md5(k.key)
                            AND (d.payload -> 'args') ->> 'idempotency_key' = k.key)
        LIMIT p_batch_size
        FOR UPDATE OF k SKIP LOCKED
    ), gone AS (
        DELETE FROM meter.idempotency_keys k USING doomed d
        WHERE k.namespace = d.namespace AND k.key = d.key
        RETURNING 1
    )
    SELECT count(*) INTO v_count FROM gone;
    RETURN v_count;
END
$$;

CREATE FUNCTION meter.dead_letters_to_retry()
RETURNS SETOF bigint
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_scope text := meter._dead_letter_scope();
BEGIN
    RETURN QUERY
    SELECT d.dead_letter_id FROM meter.dead_letters d
    WHERE d.status = 'dead' AND (v_scope IS NULL OR d.namespace = v_scope)
    -- a reserve's retry settles the commits and releases waiting for it (013's trigger)
    ORDER BY d.op <> 'reserve', d.dead_letter_id;
END
$$;
