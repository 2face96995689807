-- Idempotency keys are kept for days of 24 hours, whatever the session's TimeZone.
--
-- Why (found by a review of time handling, reproduced under America/New_York):
-- prune_idempotency_keys took its window as `make_interval(days => n)` and subtracted it
-- from a timestamptz, which PostgreSQL does in calendar days of the session's TimeZone.
-- Nothing sets that zone to UTC (the worker's session takes the server's, database's or
-- role's default). A window spanning a spring-forward change of clocks was an hour short:
-- 35 days back from 2026-03-20 12:00 UTC in New York is 2026-02-13 13:00 UTC, so a key 34
-- days and 23.5 hours old was pruned. The worker's replay bound for signed messages
-- (meter.signing.message_max_age) is the retention in seconds (days of 86400 s) less an
-- hour, that hour being the margin for clocks that disagree: the change of clocks took it
-- all, and a copy of a message whose producer's clock ran ahead of the database's could
-- find its events' keys pruned and apply them again. The window is now n * 24 hours, the
-- unit the worker's bound is measured in (a fall-back change of clocks kept keys an hour
-- longer, which did no harm).
--
-- Locks: unchanged (the keys it claims, FOR UPDATE SKIP LOCKED). Migrations once applied
-- are never edited: 048's prune_idempotency_keys is replaced whole; only the lines marked
-- 057 changed.

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
    -- 057: days of 24 hours, not of the session's TimeZone (see the header)
    v_window := make_interval(hours => p_older_than_days * 24);
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
