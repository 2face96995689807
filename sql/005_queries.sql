-- Queries: balances, accounts, ledger, usage, stats, reconcile, audit events.
-- All read-only; none takes a row lock. Every one validates its identifiers and guards the
-- tenant like the writes do.

-- Current balance; zeros for an unknown account.
CREATE FUNCTION meter.get_balance(p_user_id text, p_event_type text, p_unit text,
                                  p_resource text DEFAULT NULL,
                                  p_namespace text DEFAULT 'default')
RETURNS TABLE (balance numeric, reserved numeric, available numeric)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    -- Fast path: tenant and key checked in one expression; otherwise one by one, for the
    -- refusal. Then one probe of accounts_key.
    IF meter._fast_ok(p_namespace, p_user_id, true, p_event_type, p_unit, p_resource) IS NOT TRUE THEN
        PERFORM meter._resource(p_resource);
        PERFORM meter._guard(p_namespace);
        PERFORM meter._ident('user_id', p_user_id, 256, true),
                meter._ident('event_type', p_event_type, 256),
                meter._ident('unit', p_unit, 64);
    END IF;
    SELECT a.balance, a.reserved, a.balance - a.reserved INTO balance, reserved, available
    FROM meter.accounts a
    WHERE a.namespace = p_namespace AND coalesce(a.user_id, '') = coalesce(p_user_id, '')
      AND a.event_type = p_event_type AND a.resource = coalesce(p_resource, '')
      AND a.unit = p_unit;
    IF NOT FOUND THEN
        balance := 0; reserved := 0; available := 0;
    END IF;
    RETURN NEXT;
END
$$;

-- The account row; no row for an unknown account.
CREATE FUNCTION meter.get_account(p_user_id text, p_event_type text, p_unit text,
                                  p_resource text DEFAULT NULL,
                                  p_namespace text DEFAULT 'default')
RETURNS SETOF meter.accounts
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_resource text := meter._resource(p_resource);
BEGIN
    PERFORM meter._guard(p_namespace);
    PERFORM meter._ident('user_id', p_user_id, 256, true),
            meter._ident('event_type', p_event_type, 256),
            meter._ident('unit', p_unit, 64);
    RETURN QUERY
    SELECT * FROM meter.accounts a
    WHERE a.namespace = p_namespace AND coalesce(a.user_id, '') = coalesce(p_user_id, '')
      AND a.event_type = p_event_type AND a.resource = v_resource AND a.unit = p_unit;
END
$$;

-- Every account of a user (user_id NULL: the namespace's pool accounts).
CREATE FUNCTION meter.get_user_balances(p_user_id text, p_namespace text DEFAULT 'default')
RETURNS TABLE (event_type text, resource text, unit text, balance numeric, reserved numeric,
               available numeric)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM meter._guard(p_namespace);
    PERFORM meter._ident('user_id', p_user_id, 256, true);
    RETURN QUERY
    SELECT a.event_type, a.resource, a.unit, a.balance, a.reserved, a.balance - a.reserved
    FROM meter.accounts a
    WHERE a.namespace = p_namespace AND coalesce(a.user_id, '') = coalesce(p_user_id, '')
    ORDER BY a.event_type, a.resource, a.unit;
END
$$;

-- Ledger entries of one account, newest first, event_time in [p_start_time, p_end_time)
-- (NULL: unbounded). p_limit NULL means 100; below 1 is refused; above 10000 is capped.
CREATE FUNCTION meter.get_ledger(p_user_id text, p_event_type text, p_unit text,
                                 p_resource text DEFAULT NULL,
                                 p_start_time timestamptz DEFAULT NULL,
                                 p_end_time timestamptz DEFAULT NULL,
                                 p_limit integer DEFAULT 100,
                                 p_namespace text DEFAULT 'default')
RETURNS TABLE (id bigint, entry_type text, amount numeric, balance_after numeric,
               event_time timestamptz, reservation_id text, reference_id bigint,
               actor_id text, reason text, metadata jsonb)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_resource text := meter._resource(p_resource);
    v_limit integer := meter._limit('limit', p_limit, 100, 10000);
    v_account bigint;
BEGIN
    PERFORM meter._guard(p_namespace);
    PERFORM meter._ident('user_id', p_user_id, 256, true),
            meter._ident('event_type', p_event_type, 256),
            meter._ident('unit', p_unit, 64);
    SELECT a.account_id INTO v_account FROM meter.accounts a
    WHERE a.namespace = p_namespace AND coalesce(a.user_id, '') = coalesce(p_user_id, '')
      AND a.event_type = p_event_type AND a.resource = v_resource AND a.unit = p_unit;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    RETURN QUERY
    SELECT l.id, l.entry_type, l.amount, l.balance_after, l.event_time, l.reservation_id,
           l.reference_id, l.actor_id, l.reason, l.metadata
    FROM meter.ledger l
    WHERE l.account_id = v_account AND l.namespace = p_namespace
      AND l.event_time >= coalesce(p_start_time, '-infinity')
      AND l.event_time < coalesce(p_end_time, 'infinity')
    ORDER BY l.event_time DESC, l.id DESC
    LIMIT v_limit;
END
$$;

-- Consumption of one user per event_type/resource/unit in [p_start_time, p_end_time).
CREATE FUNCTION meter.get_usage(p_user_id text, p_start_time timestamptz,
                                p_end_time timestamptz, p_namespace text DEFAULT 'default')
RETURNS TABLE (event_type text, resource text, unit text, total_consumed numeric,
               event_count bigint)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM meter._guard(p_namespace);
    PERFORM meter._ident('user_id', p_user_id, 256, true);
    RETURN QUERY
    SELECT a.event_type, a.resource, a.unit, -sum(l.amount), count(*)
    FROM meter.accounts a
    JOIN meter.ledger l ON l.account_id = a.account_id AND l.namespace = a.namespace
    WHERE a.namespace = p_namespace AND coalesce(a.user_id, '') = coalesce(p_user_id, '')
      AND l.entry_type = 'consumption'
      AND l.event_time >= coalesce(p_start_time, '-infinity')
      AND l.event_time < coalesce(p_end_time, 'infinity')
    GROUP BY a.event_type, a.resource, a.unit
    ORDER BY a.event_type, a.resource, a.unit;
END
$$;

-- Consumption of the whole namespace per event_type/resource/unit, with distinct users.
CREATE FUNCTION meter.get_namespace_usage(p_start_time timestamptz, p_end_time timestamptz,
                                          p_namespace text DEFAULT 'default')
RETURNS TABLE (event_type text, resource text, unit text, total_consumed numeric,
               event_count bigint, unique_users bigint)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM meter._guard(p_namespace);
    RETURN QUERY
    SELECT l.event_type, l.resource, l.unit, -sum(l.amount), count(*),
           count(DISTINCT l.user_id)
    FROM meter.ledger l
    WHERE l.namespace = p_namespace AND l.entry_type = 'consumption'
      AND l.event_time >= coalesce(p_start_time, '-infinity')
      AND l.event_time < coalesce(p_end_time, 'infinity')
    GROUP BY l.event_type, l.resource, l.unit
    ORDER BY l.event_type, l.resource, l.unit;
END
$$;

-- Namespace totals. Only holds that are active and not past their TTL count as active.
CREATE FUNCTION meter.get_stats(p_namespace text DEFAULT 'default')
RETURNS TABLE (total_accounts bigint, total_ledger_entries bigint,
               active_reservations bigint, total_balance numeric, total_reserved numeric)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM meter._guard(p_namespace);
    RETURN QUERY
    SELECT a.n, (SELECT count(*) FROM meter.ledger l WHERE l.namespace = p_namespace),
           (SELECT count(*) FROM meter.reservations r
            WHERE r.namespace = p_namespace AND r.status = 'active' AND r.expires_at > now()),
           a.total_balance, a.total_reserved
    FROM (SELECT count(*) AS n, coalesce(sum(x.balance), 0) AS total_balance,
                 coalesce(sum(x.reserved), 0) AS total_reserved
          FROM meter.accounts x WHERE x.namespace = p_namespace) a;
END
$$;

-- Accounts whose stored figures disagree with what they are derived from:
--   balance_mismatch:  balance vs retention checkpoint + sum of ledger amounts;
--   reserved_mismatch: reserved vs sum of active holds.
-- discrepancy = actual - expected. Empty on a healthy ledger.
CREATE FUNCTION meter.reconcile(p_namespace text DEFAULT 'default')
RETURNS TABLE (user_id text, event_type text, resource text, unit text, issue_type text,
               expected numeric, actual numeric, discrepancy numeric)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM meter._guard(p_namespace);
    RETURN QUERY
    WITH ledger_sums AS (
        SELECT l.account_id, sum(l.amount) AS total
        FROM meter.ledger l WHERE l.namespace = p_namespace GROUP BY l.account_id
    ), holds AS (
        SELECT r.account_id, sum(r.amount) AS total
        FROM meter.reservations r
        WHERE r.namespace = p_namespace AND r.status = 'active' GROUP BY r.account_id
    ), derived AS (
        SELECT a.*, coalesce(c.balance, 0) + coalesce(ls.total, 0) AS expected_balance,
               coalesce(h.total, 0) AS expected_reserved
        FROM meter.accounts a
        LEFT JOIN ledger_sums ls ON ls.account_id = a.account_id
        LEFT JOIN holds h ON h.account_id = a.account_id
        LEFT JOIN meter.ledger_checkpoints c
               ON c.namespace = a.namespace AND c.account_id = a.account_id
        WHERE a.namespace = p_namespace
    )
    SELECT d.user_id, d.event_type, d.resource, d.unit, 'balance_mismatch'::text,
           d.expected_balance, d.balance, d.balance - d.expected_balance
    FROM derived d WHERE d.balance <> d.expected_balance
    UNION ALL
    SELECT d.user_id, d.event_type, d.resource, d.unit, 'reserved_mismatch'::text,
           d.expected_reserved, d.reserved, d.reserved - d.expected_reserved
    FROM derived d WHERE d.reserved <> d.expected_reserved
    ORDER BY 1, 2, 3, 4, 5;
END
$$;

-- One time-ordered trail (newest first) of ledger entries, reservation transitions, period
-- openings/closings and period-config changes, with the actor context of each. Filters are
-- ANDed; NULL means "any". p_limit as in get_ledger.
CREATE FUNCTION meter.get_audit_events(p_user_id text DEFAULT NULL,
                                       p_actor_id text DEFAULT NULL,
                                       p_kinds text[] DEFAULT NULL,
                                       p_start_time timestamptz DEFAULT NULL,
                                       p_end_time timestamptz DEFAULT NULL,
                                       p_limit integer DEFAULT 100,
                                       p_namespace text DEFAULT 'default')
RETURNS TABLE (kind text, at timestamptz, user_id text, event_type text, resource text,
               unit text, amount numeric, reservation_id text, entry_id bigint,
               actor_id text, on_behalf_of text, reason text, request_id text,
               metadata jsonb)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_limit integer := meter._limit('limit', p_limit, 100, 10000);
BEGIN
    PERFORM meter._guard(p_namespace);
    PERFORM meter._ident('user_id', p_user_id, 256, true),
            meter._ident('actor_id', p_actor_id, 256, true);
    RETURN QUERY
    WITH events AS (
        SELECT 'ledger.' || l.entry_type AS kind, l.created_at AS at, l.user_id, l.event_type,
               l.resource, l.unit, l.amount, l.reservation_id, l.id AS entry_id, l.actor_id,
               l.on_behalf_of, l.reason, l.request_id, l.metadata, 1 AS seq
        FROM meter.ledger l
        WHERE l.namespace = p_namespace
        UNION ALL
        SELECT 'reservation.active', r.created_at, r.user_id, r.event_type, r.resource, r.unit,
               r.amount, r.reservation_id, NULL, r.actor->>'actor_id',
               r.actor->>'on_behalf_of', r.actor->>'reason', r.actor->>'request_id',
               r.metadata, 0
        FROM meter.reservations r
        WHERE r.namespace = p_namespace
        UNION ALL
        SELECT 'reservation.' || r.status, r.completed_at, r.user_id, r.event_type, r.resource,
               r.unit, CASE WHEN r.status = 'committed' THEN r.actual_amount ELSE r.amount END,
               r.reservation_id, r.entry_id, r.completed_actor->>'actor_id',
               r.completed_actor->>'on_behalf_of', r.completed_actor->>'reason',
               r.completed_actor->>'request_id', r.metadata, 2
        FROM meter.reservations r
        WHERE r.namespace = p_namespace AND r.status <> 'active'
        UNION ALL
        SELECT 'period.open', p.opened_at, p.user_id, p.event_type, p.resource, p.unit,
               p.allocation, NULL, p.open_entry_id, p.opened_actor->>'actor_id',
               p.opened_actor->>'on_behalf_of', p.opened_actor->>'reason',
               p.opened_actor->>'request_id',
               jsonb_build_object('period_start', p.period_start), 3
        FROM meter.periods p
        WHERE p.namespace = p_namespace AND p.opened_at IS NOT NULL
        UNION ALL
        SELECT 'period.close', p.closed_at, p.user_id, p.event_type, p.resource, p.unit,
               p.expired, NULL, NULL, p.closed_actor->>'actor_id',
               p.closed_actor->>'on_behalf_of', p.closed_actor->>'reason',
               p.closed_actor->>'request_id',
               jsonb_build_object('period_end', p.period_end, 'expired', p.expired,
                                  'carried_over', p.carried_over,
                                  'new_balance', p.close_balance), 4
        FROM meter.periods p
        WHERE p.namespace = p_namespace AND p.closed_at IS NOT NULL
        UNION ALL
        SELECT 'period.config', c.changed_at, c.user_id, c.event_type, c.resource, c.unit,
               c.period_allocation, NULL, NULL, c.actor->>'actor_id',
               c.actor->>'on_behalf_of', c.actor->>'reason', c.actor->>'request_id',
               jsonb_build_object('period_start', c.period_start,
                                  'period_allocation', c.period_allocation,
                                  'carry_over_limit', c.carry_over_limit,
                                  'period_interval', c.period_interval::text), 5
        FROM meter.period_config_changes c
        WHERE c.namespace = p_namespace
    )
    SELECT e.kind, e.at, e.user_id, e.event_type, e.resource, e.unit, e.amount,
           e.reservation_id, e.entry_id, e.actor_id, e.on_behalf_of, e.reason, e.request_id,
           e.metadata
    FROM events e
    WHERE (p_user_id IS NULL OR e.user_id = p_user_id)
      AND (p_actor_id IS NULL OR e.actor_id = p_actor_id)
      AND (p_kinds IS NULL OR e.kind = ANY (p_kinds))
      AND e.at >= coalesce(p_start_time, '-infinity')
      AND e.at < coalesce(p_end_time, 'infinity')
    ORDER BY e.at DESC, e.seq DESC, e.entry_id DESC NULLS LAST
    LIMIT v_limit;
END
$$;

REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA meter FROM PUBLIC;
