-- Within one transaction, audit events come in the order of the times they are dated at.
--
-- Why (found by a review of this stop, with a reproduction): every step of a period roll
-- that catches up runs in one transaction, so its events share their time (`at`), and
-- get_audit_events ordered such events by kind only: all the closes first, in no
-- particular order (a close has no entry id), then all the opens. A catch-up of four daily
-- periods listed the closes of 11-25, 11-28, 11-27 and 11-26, then the opens.
--
-- Now events of one time are ordered, newest first, by the time they are dated at: a
-- ledger row's event_time, a period's opening at its first instant and its close at the
-- last microsecond of its end (where their rows are dated), the other events at their own
-- time. Events dated alike keep the old order (kind, then entry id). A transaction that
-- dates everything at its own time (nearly all) lists its events as before.
--
-- Also: a kind in p_kinds that names no event (a misspelling) is refused, MT001 naming
-- kinds, as the SDK refuses it; it answered with no events.
--
-- Locks: none (a read). Migrations once applied are never edited: 030's get_audit_events
-- is replaced whole; only the lines marked 039 changed.

CREATE OR REPLACE FUNCTION meter.get_audit_events(p_user_id text DEFAULT NULL,
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
    v_kinds text[] := ARRAY['ledger.allocation', 'ledger.consumption', 'ledger.adjustment',
                            'ledger.expiration', 'ledger.carry_over', 'reservation.active',
                            'reservation.committed', 'reservation.released',
                            'reservation.expired', 'period.open', 'period.close',
                            'period.config'];  -- 039
BEGIN
    PERFORM meter._guard(p_namespace);
    PERFORM meter._ident('user_id', p_user_id, 256, true),
            meter._ident('actor_id', p_actor_id, 256, true);
    -- 039: a kind that names no event is refused, as the SDK refuses it (a misspelt
    -- filter answered with nothing, as if nothing had happened)
    PERFORM meter._fail('MT001', 'kinds',
                        format('unknown kind %s at index %s; one of %s',
                               coalesce(quote_literal(k.kind), 'NULL'), k.i - 1,
                               array_to_string(v_kinds, ', ')))
    FROM unnest(p_kinds) WITH ORDINALITY AS k(kind, i)
    WHERE k.kind IS NULL OR NOT k.kind = ANY (v_kinds)
    ORDER BY k.i LIMIT 1;
    RETURN QUERY
    WITH events AS (
        SELECT 'ledger.' || l.entry_type AS kind, l.created_at AS at, l.user_id, l.event_type,
               l.resource, l.unit, l.amount, l.reservation_id, l.id AS entry_id, l.actor_id,
               l.on_behalf_of, l.reason, l.request_id, l.metadata, 2 AS seq,
               l.event_time AS dated  -- 039
        FROM meter.ledger l
        WHERE l.namespace = p_namespace
        UNION ALL
        SELECT 'reservation.active', r.created_at, r.user_id, r.event_type, r.resource, r.unit,
               r.amount, r.reservation_id, NULL, r.actor->>'actor_id',
               r.actor->>'on_behalf_of', r.actor->>'reason', r.actor->>'request_id',
               r.metadata, 0, r.created_at
        FROM meter.reservations r
        WHERE r.namespace = p_namespace
        UNION ALL
        SELECT 'reservation.' || r.status, r.completed_at, r.user_id, r.event_type, r.resource,
               r.unit, CASE WHEN r.status = 'committed' THEN r.actual_amount ELSE r.amount END,
               r.reservation_id, r.entry_id, r.completed_actor->>'actor_id',
               r.completed_actor->>'on_behalf_of', r.completed_actor->>'reason',
               r.completed_actor->>'request_id', r.metadata, 3, r.completed_at
        FROM meter.reservations r
        WHERE r.namespace = p_namespace AND r.status <> 'active'
        UNION ALL
        -- the sweep's expiry of a hold committed late after it (the row's completion is
        -- the commit's). Its seq puts it after the hold's active and before the commit's
        -- ledger row and completion when they share a time (one transaction).
        SELECT 'reservation.expired', r.expired_at, r.user_id, r.event_type, r.resource,
               r.unit, r.amount, r.reservation_id, NULL, r.expired_actor->>'actor_id',
               r.expired_actor->>'on_behalf_of', r.expired_actor->>'reason',
               r.expired_actor->>'request_id', r.metadata, 1, r.expired_at
        FROM meter.reservations r
        WHERE r.namespace = p_namespace AND r.expired_at IS NOT NULL
        UNION ALL
        SELECT 'period.open', p.opened_at, p.user_id, p.event_type, p.resource, p.unit,
               p.allocation, NULL, p.open_entry_id, p.opened_actor->>'actor_id',
               p.opened_actor->>'on_behalf_of', p.opened_actor->>'reason',
               p.opened_actor->>'request_id',
               jsonb_build_object('period_start', p.period_start), 4,
               p.period_start::timestamp AT TIME ZONE 'UTC'  -- 039: as its allocation
        FROM meter.periods p
        WHERE p.namespace = p_namespace AND p.opened_at IS NOT NULL
        UNION ALL
        SELECT 'period.close', p.closed_at, p.user_id, p.event_type, p.resource, p.unit,
               p.expired, NULL, NULL, p.closed_actor->>'actor_id',
               p.closed_actor->>'on_behalf_of', p.closed_actor->>'reason',
               p.closed_actor->>'request_id',
               jsonb_build_object('period_end', p.period_end, 'expired', p.expired,
                                  'carried_over', p.carried_over,
                                  'new_balance', p.close_balance), 5,
               -- 039: as its rows, at the last microsecond of its end
               (p.period_end + 1)::timestamp AT TIME ZONE 'UTC' - interval '1 microsecond'
        FROM meter.periods p
        WHERE p.namespace = p_namespace AND p.closed_at IS NOT NULL
        UNION ALL
        SELECT 'period.config', c.changed_at, c.user_id, c.event_type, c.resource, c.unit,
               c.period_allocation, NULL, NULL, c.actor->>'actor_id',
               c.actor->>'on_behalf_of', c.actor->>'reason', c.actor->>'request_id',
               jsonb_build_object('period_start', c.period_start,
                                  'period_allocation', c.period_allocation,
                                  'carry_over_limit', c.carry_over_limit,
                                  'period_interval', c.period_interval::text), 6, c.changed_at
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
    ORDER BY e.at DESC, e.dated DESC, e.seq DESC, e.entry_id DESC NULLS LAST  -- 039: dated
    LIMIT v_limit;
END
$$;

REVOKE EXECUTE ON FUNCTION meter.get_audit_events(text, text, text[], timestamptz, timestamptz,
                                                  integer, text) FROM PUBLIC;
