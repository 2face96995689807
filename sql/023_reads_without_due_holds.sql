-- Reads leave out holds past their TTL, as every decision already does.
--
-- Why: Appendix C says a hold is expired once now() >= expires_at, swept or not, and 019
-- made checked consume, reserve and close_period act on that. But the reads still reported
-- accounts.reserved, which keeps an expired hold's amount until the sweep reaches it:
-- get_balance could say `available` 0 while a checked consume of 10 then succeeded, for
-- the sweep's interval (5 s) or for as long as beat is down. get_stats counted such a hold
-- out of active_reservations but into total_reserved.
--
-- Now get_balance, get_account, get_user_balances and get_stats report `reserved` (and
-- `available`) without the holds that are past their TTL and not yet swept. The stored
-- accounts.reserved is unchanged: reads change nothing, the sweep still writes it, and
-- reconcile() still compares it with the active holds.
--
-- The look-up of one account's due holds needs an index by account: the only one on
-- active holds was by expires_at across all namespaces, which grows with every hold due
-- while beat is down. The new partial index costs one index entry per reserve; it serves
-- meter._expire_due and meter._peek (019) as well. A read of an account without holds
-- (reserved = 0) does not look.
-- Migrations once applied are never edited, so the four functions are replaced whole;
-- only the `reserved` they report changed.

CREATE INDEX reservations_account_active ON meter.reservations (namespace, account_id, expires_at)
    WHERE status = 'active';

-- The amount held by one account's active holds that are past their TTL (not yet swept).
CREATE FUNCTION meter._due_held(p_namespace text, p_account_id bigint)
RETURNS numeric
LANGUAGE sql STABLE AS $$
    SELECT coalesce(sum(r.amount), 0) FROM meter.reservations r
    WHERE r.namespace = p_namespace AND r.account_id = p_account_id
      AND r.status = 'active' AND r.expires_at <= now()
$$;
REVOKE EXECUTE ON FUNCTION meter._due_held(text, bigint) FROM PUBLIC;

CREATE OR REPLACE FUNCTION meter.get_balance(p_user_id text, p_event_type text, p_unit text,
                                             p_resource text DEFAULT NULL,
                                             p_namespace text DEFAULT 'default')
RETURNS TABLE (balance numeric, reserved numeric, available numeric)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_account bigint;
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
    SELECT a.account_id, a.balance, a.reserved INTO v_account, balance, reserved
    FROM meter.accounts a
    WHERE a.namespace = p_namespace AND coalesce(a.user_id, '') = coalesce(p_user_id, '')
      AND a.event_type = p_event_type AND a.resource = coalesce(p_resource, '')
      AND a.unit = p_unit;
    IF NOT FOUND THEN
        balance := 0; reserved := 0;
    ELSIF reserved > 0 THEN
        reserved := reserved - meter._due_held(p_namespace, v_account);
    END IF;
    available := balance - reserved;
    RETURN NEXT;
END
$$;

-- The account row; no row for an unknown account. `reserved` leaves out holds past their
-- TTL.
CREATE OR REPLACE FUNCTION meter.get_account(p_user_id text, p_event_type text, p_unit text,
                                             p_resource text DEFAULT NULL,
                                             p_namespace text DEFAULT 'default')
RETURNS SETOF meter.accounts
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_resource text := meter._resource(p_resource);
    v_row meter.accounts;
BEGIN
    PERFORM meter._guard(p_namespace);
    PERFORM meter._ident('user_id', p_user_id, 256, true),
            meter._ident('event_type', p_event_type, 256),
            meter._ident('unit', p_unit, 64);
    SELECT * INTO v_row FROM meter.accounts a
    WHERE a.namespace = p_namespace AND coalesce(a.user_id, '') = coalesce(p_user_id, '')
      AND a.event_type = p_event_type AND a.resource = v_resource AND a.unit = p_unit;
    IF FOUND THEN
        IF v_row.reserved > 0 THEN
            v_row.reserved := v_row.reserved - meter._due_held(p_namespace, v_row.account_id);
        END IF;
        RETURN NEXT v_row;
    END IF;
END
$$;

-- Every account of a user (user_id NULL: the namespace's pool accounts). `reserved` leaves
-- out holds past their TTL.
CREATE OR REPLACE FUNCTION meter.get_user_balances(p_user_id text,
                                                   p_namespace text DEFAULT 'default')
RETURNS TABLE (event_type text, resource text, unit text, balance numeric, reserved numeric,
               available numeric)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM meter._guard(p_namespace);
    PERFORM meter._ident('user_id', p_user_id, 256, true);
    RETURN QUERY
    SELECT a.event_type, a.resource, a.unit, a.balance, h.reserved, a.balance - h.reserved
    FROM meter.accounts a
    CROSS JOIN LATERAL (
        SELECT CASE WHEN a.reserved > 0
                    THEN a.reserved - meter._due_held(a.namespace, a.account_id)
                    ELSE a.reserved END AS reserved) h
    WHERE a.namespace = p_namespace AND coalesce(a.user_id, '') = coalesce(p_user_id, '')
    ORDER BY a.event_type, a.resource, a.unit;
END
$$;

-- Namespace totals. Only holds that are active and not past their TTL count, both in
-- active_reservations and in total_reserved.
CREATE OR REPLACE FUNCTION meter.get_stats(p_namespace text DEFAULT 'default')
RETURNS TABLE (total_accounts bigint, total_ledger_entries bigint,
               active_reservations bigint, total_balance numeric, total_reserved numeric)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM meter._guard(p_namespace);
    RETURN QUERY
    SELECT a.n, (SELECT count(*) FROM meter.ledger l WHERE l.namespace = p_namespace),
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
