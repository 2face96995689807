-- Maintenance: the expiry sweep.

-- Expire active holds whose TTL has passed and return them to `available`: at most
-- p_batch_size per call, oldest first, so a caller (beat, the SDK) loops in short
-- transactions until fewer than a batch come back. Returns how many were expired.
-- p_namespace NULL sweeps every namespace (privileged callers only).
-- Locks: the reservations (SKIP LOCKED: a hold being committed or released right now is left
-- to that call), then their accounts in ascending account_id, so the sweep never deadlocks
-- with writers or with another sweep.
CREATE FUNCTION meter.release_expired_reservations(p_namespace text DEFAULT NULL,
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
    ORDER BY a.account_id
    FOR UPDATE OF a;
    UPDATE meter.accounts a
    SET reserved = a.reserved - d.total, updated_at = now()
    FROM unnest(v_namespaces, v_accounts, v_totals) AS d(namespace, account_id, total)
    WHERE a.namespace = d.namespace AND a.account_id = d.account_id;
    RETURN v_count;
END
$$;

REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA meter FROM PUBLIC;
