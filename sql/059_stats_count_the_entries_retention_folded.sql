-- get_stats' total_ledger_entries counts the entries retention folded into checkpoints.
--
-- Why (found by a review of the reads, left open by the last session): it counted the
-- ledger rows present, so drop_old_partitions, which folds a month's rows into
-- meter.ledger_checkpoints (their sum and their number, `entries`) and drops them, made
-- the namespace's total fall, though no entry was undone: a total that a dashboard plots
-- went down at every retention run, and `meter up`'s progress count with it. It now adds
-- the checkpoints' `entries`, as reconcile() adds their balances: the number of entries
-- ever recorded in the namespace, before and after retention alike.
--
-- Lock order: unchanged (it reads; no lock beyond a read's).
--
-- Migrations once applied are never edited: 023's get_stats is replaced whole; only the
-- lines marked 059 are new.

CREATE OR REPLACE FUNCTION meter.get_stats(p_namespace text DEFAULT 'default')
RETURNS TABLE (total_accounts bigint, total_ledger_entries bigint,
               active_reservations bigint, total_balance numeric, total_reserved numeric)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM meter._guard(p_namespace);
    RETURN QUERY
    SELECT a.n, (SELECT count(*) FROM meter.ledger l WHERE l.namespace = p_namespace)
                -- 059: and those retention folded into the namespace's checkpoints
                + (SELECT coalesce(sum(c.entries), 0) FROM meter.ledger_checkpoints c  -- 059
                   WHERE c.namespace = p_namespace)::bigint,                          -- 059
           (SELECT count(*) FROM meter.reservations r
            WHERE r.namespace = p_namespace AND r.status = 'active' AND r.expires_at > now()),
           a.total_balance,
           a.total_reserved - (SELECT coalesce(sum(r.amount), 0) FROM meter.reservations r
                               WHERE r.namespace = p_namespace AND r.status = 'active'
                                 AND r.expires_at <= now())
    FROM (SELECT count(*) AS n, coalesce(sum(x.balance), 0) AS total_balance,
                 coalesce(sum(x.reserved), 0) AS total_reserved
          FROM meter.accounts x WHERE x.namespace = p_namespace) a;
END
$$;
