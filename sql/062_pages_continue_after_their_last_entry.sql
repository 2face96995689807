-- get_ledger pages through entries of one event_time without skipping or repeating one.
--
-- Why (found by a review of the reads, reproduced): get_ledger lists newest first, by
-- event_time then id, and its only way to ask for the next page was p_end_time, which is
-- exclusive. A client that passed the last entry's event_time as the next page's end lost
-- every entry of that same time the page had no room for; one that passed a microsecond
-- more got the page's last entries again, and with more entries of one time than p_limit
-- it never got past them. Entries share an event_time often: a period's close writes its
-- expiration and carry-over at one instant (and the next open its allocation at the next),
-- every write of one transaction (a batch of apply_events) is dated at its now(), and a
-- producer may date many events alike. A page of 2 over three allocations of one time and
-- an older one listed three entries of four.
--
-- Now get_ledger takes (+) p_before_id bigint DEFAULT NULL, after p_namespace so that
-- every call made before is the same call. With it, p_end_time is the event_time of the
-- last entry received and p_before_id its id, and the page holds the entries after that
-- one in the listing's order: event_time < p_end_time, or event_time = p_end_time and
-- id < p_before_id. p_before_id without p_end_time is refused (MT001 naming before_id):
-- ids are not in event_time order (a backdated entry has a newer id), so an id alone
-- names no place in the listing. Without p_before_id nothing changed.
--
-- Locks: none (a read under MVCC). Each page is its own snapshot: an entry committed
-- between two pages whose place in the listing falls in the pages already read (dated
-- after the cursor: a write since, a backdated one within that range, or a transaction
-- that began before the last page was read) appears in no page, as it would not with any
-- listing newest first by the time entries are dated at; one dated before the cursor
-- appears in a later page. The same holds for get_audit_events' pages.
--
-- And an audit event keeps its place in the order (found by a review of the above,
-- reproduced: test_queries.py
-- test_audit_pages_go_on_past_an_expiry_committed_late_between_them): a hold the sweep
-- expired was listed as `reservation.expired:<id>` at its completion's place in the order
-- of its time (seq 3); once committed late, the same event (same at, same event_id) is
-- listed by the late-expiry branch at seq 1. A page ending at that event, followed by the
-- late commit, made the next page start from its new place, and the events of its time
-- between the two (other holds the same sweep expired) were in no page. An expiry is now
-- at seq 1 in both branches. The one order that changed: a write that expires its
-- account's due holds before its own row (one transaction, one time) lists that row
-- first and the expiries after it (older), the order they were made in.
--
-- Migrations once applied are never edited: 005's get_ledger is dropped and created again
-- with the new parameter (a parameter cannot be added by CREATE OR REPLACE, and an
-- overload would make every call without it ambiguous); its body is 005's, with the lines
-- marked 062 new. Its grants are given again as 005 and roles.sql gave them.

DROP FUNCTION meter.get_ledger(text, text, text, text, timestamptz, timestamptz, integer, text);

-- Ledger entries of one account, newest first, event_time in [p_start_time, p_end_time)
-- (NULL: unbounded); with p_before_id, those after entry (p_end_time, p_before_id) in that
-- order instead of before p_end_time. p_limit NULL means 100; below 1 is refused; above
-- 10000 is capped.
CREATE FUNCTION meter.get_ledger(p_user_id text, p_event_type text, p_unit text,
                                 p_resource text DEFAULT NULL,
                                 p_start_time timestamptz DEFAULT NULL,
                                 p_end_time timestamptz DEFAULT NULL,
                                 p_limit integer DEFAULT 100,
                                 p_namespace text DEFAULT 'default',
                                 p_before_id bigint DEFAULT NULL)  -- 062
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
    -- 062: an id alone is no place in a listing by event_time
    IF p_before_id IS NOT NULL AND p_end_time IS NULL THEN                              -- 062
        PERFORM meter._fail('MT001', 'before_id',                                       -- 062
                            'needs end_time: the event_time of the entry it names');    -- 062
    END IF;                                                                             -- 062
    SELECT a.account_id INTO v_account FROM meter.accounts a
    WHERE a.namespace = p_namespace AND coalesce(a.user_id, '') = coalesce(p_user_id, '')
      AND a.event_type = p_event_type AND a.resource = v_resource AND a.unit = p_unit;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF p_before_id IS NOT NULL THEN                                                     -- 062
        -- 062: a separate query, so that the one without a cursor keeps its plan; the
        -- row comparison is a range of ledger_account_time (account_id, event_time, id)
        RETURN QUERY                                                                    -- 062
        SELECT l.id, l.entry_type, l.amount, l.balance_after, l.event_time,             -- 062
               l.reservation_id, l.reference_id, l.actor_id, l.reason, l.metadata       -- 062
        FROM meter.ledger l                                                             -- 062
        WHERE l.account_id = v_account AND l.namespace = p_namespace                    -- 062
          AND l.event_time >= coalesce(p_start_time, '-infinity')                       -- 062
          -- 062: implied by the row comparison, which prunes no partition by itself
          AND l.event_time <= p_end_time                                                -- 062
          AND (l.event_time, l.id) < (p_end_time, p_before_id)                          -- 062
        ORDER BY l.event_time DESC, l.id DESC                                           -- 062
        LIMIT v_limit;                                                                  -- 062
        RETURN;                                                                         -- 062
    END IF;                                                                             -- 062
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

REVOKE EXECUTE ON FUNCTION meter.get_ledger(text, text, text, text, timestamptz, timestamptz,
                                            integer, text, bigint) FROM PUBLIC;
-- As roles.sql grants every API function; given here too, for a database whose roles
-- exist and that is migrated without --with-roles.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'meter_app') THEN
        GRANT EXECUTE ON FUNCTION meter.get_ledger(text, text, text, text, timestamptz,
                                                   timestamptz, integer, text, bigint)
            TO meter_app;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'meter_maintenance') THEN
        GRANT EXECUTE ON FUNCTION meter.get_ledger(text, text, text, text, timestamptz,
                                                   timestamptz, integer, text, bigint)
            TO meter_maintenance;
    END IF;
END
$$;

-- get_audit_events pages the same way, by the last event received.
--
-- Why (same review, reproduced): its listing is newest first by `at`, and events share
-- their `at` whenever one transaction makes several (a commit's ledger row and the hold's
-- completion, a reserve and its consume in one batch, every step of a period roll). Paging
-- by p_end_time (exclusive) skipped the events of the last one's time a page had no room
-- for: allocate, reserve, commit, paged one at a time, listed three events of four (the
-- commit's ledger.consumption was never seen). And events of one time in one kind with no
-- entry id (two holds reserved in one batch) had no order at all, so two calls could page
-- them differently.
--
-- Now each event has (+) `event_id text`, its kind and its source row's key
-- (`ledger.consumption:<entry id>`, `reservation.active:<reservation id>`,
-- `period.open:<period id>`, `period.config:<change id>`...), unique in the namespace and
-- the same at every call; the order ends with it, so it is total. (+) p_before_event_id
-- text DEFAULT NULL, after p_namespace, with p_end_time the `at` of that event, lists the
-- events after it in that order. p_before_event_id without p_end_time, or naming no event
-- at that time (a misspelt id; a ledger row retention dropped since), is refused (MT001
-- naming before_event_id). Without it nothing changed but the order of events that had
-- none, and the new column. The return type changed, so the function is dropped and
-- created again. Its events moved, as 039 listed them, into meter._audit_events, so that
-- the cursor's event is found with the same rules as the events listed; 039's body, with
-- the lines marked 062 new or changed.
--
-- Locks: none (reads under MVCC).

DROP FUNCTION meter.get_audit_events(text, text, text[], timestamptz, timestamptz, integer, text);

-- Every audit event of a namespace, with the keys of its order (`seq`, `dated`) and its
-- `event_id`: 039's events, unfiltered. Run with the rights of get_audit_events.
CREATE FUNCTION meter._audit_events(p_namespace text)
RETURNS TABLE (kind text, at timestamptz, user_id text, event_type text, resource text,
               unit text, amount numeric, reservation_id text, entry_id bigint,
               actor_id text, on_behalf_of text, reason text, request_id text,
               metadata jsonb, seq integer, dated timestamptz, event_id text)
LANGUAGE sql STABLE AS $$
    SELECT 'ledger.' || l.entry_type AS kind, l.created_at AS at, l.user_id, l.event_type,
           l.resource, l.unit, l.amount, l.reservation_id, l.id AS entry_id, l.actor_id,
           l.on_behalf_of, l.reason, l.request_id, l.metadata, 2 AS seq,
           l.event_time AS dated,  -- 039
           'ledger.' || l.entry_type || ':' || l.id AS event_id  -- 062
    FROM meter.ledger l
    WHERE l.namespace = p_namespace
    UNION ALL
    SELECT 'reservation.active', r.created_at, r.user_id, r.event_type, r.resource, r.unit,
           r.amount, r.reservation_id, NULL, r.actor->>'actor_id',
           r.actor->>'on_behalf_of', r.actor->>'reason', r.actor->>'request_id',
           r.metadata, 0, r.created_at,
           'reservation.active:' || r.reservation_id  -- 062
    FROM meter.reservations r
    WHERE r.namespace = p_namespace
    UNION ALL
    SELECT 'reservation.' || r.status, r.completed_at, r.user_id, r.event_type, r.resource,
           r.unit, CASE WHEN r.status = 'committed' THEN r.actual_amount ELSE r.amount END,
           r.reservation_id, r.entry_id, r.completed_actor->>'actor_id',
           r.completed_actor->>'on_behalf_of', r.completed_actor->>'reason',
           r.completed_actor->>'request_id', r.metadata,
           -- 062: an expiry in the expiry's place (seq 1), where it stays if the hold is
           -- then committed late (the branch below), so that it is the same place in the
           -- order for a cursor naming it before and after that commit
           CASE WHEN r.status = 'expired' THEN 1 ELSE 3 END, r.completed_at,  -- 062
           'reservation.' || r.status || ':' || r.reservation_id  -- 062
    FROM meter.reservations r
    WHERE r.namespace = p_namespace AND r.status <> 'active'
    UNION ALL
    -- the sweep's expiry of a hold committed late after it (the row's completion is
    -- the commit's). Its seq puts it after the hold's active and before the commit's
    -- ledger row and completion when they share a time (one transaction).
    -- 062: the hold's status is then 'committed': this is its only expiry event
    SELECT 'reservation.expired', r.expired_at, r.user_id, r.event_type, r.resource,
           r.unit, r.amount, r.reservation_id, NULL, r.expired_actor->>'actor_id',
           r.expired_actor->>'on_behalf_of', r.expired_actor->>'reason',
           r.expired_actor->>'request_id', r.metadata, 1, r.expired_at,
           'reservation.expired:' || r.reservation_id  -- 062
    FROM meter.reservations r
    WHERE r.namespace = p_namespace AND r.expired_at IS NOT NULL
    UNION ALL
    SELECT 'period.open', p.opened_at, p.user_id, p.event_type, p.resource, p.unit,
           p.allocation, NULL, p.open_entry_id, p.opened_actor->>'actor_id',
           p.opened_actor->>'on_behalf_of', p.opened_actor->>'reason',
           p.opened_actor->>'request_id',
           jsonb_build_object('period_start', p.period_start), 4,
           p.period_start::timestamp AT TIME ZONE 'UTC',  -- 039: as its allocation
           'period.open:' || p.period_id  -- 062
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
           (p.period_end + 1)::timestamp AT TIME ZONE 'UTC' - interval '1 microsecond',
           'period.close:' || p.period_id  -- 062
    FROM meter.periods p
    WHERE p.namespace = p_namespace AND p.closed_at IS NOT NULL
    UNION ALL
    SELECT 'period.config', c.changed_at, c.user_id, c.event_type, c.resource, c.unit,
           c.period_allocation, NULL, NULL, c.actor->>'actor_id',
           c.actor->>'on_behalf_of', c.actor->>'reason', c.actor->>'request_id',
           jsonb_build_object('period_start', c.period_start,
                              'period_allocation', c.period_allocation,
                              'carry_over_limit', c.carry_over_limit,
                              'period_interval', c.period_interval::text), 6, c.changed_at,
           'period.config:' || c.change_id  -- 062
    FROM meter.period_config_changes c
    WHERE c.namespace = p_namespace
$$;
REVOKE EXECUTE ON FUNCTION meter._audit_events(text) FROM PUBLIC;

-- One time-ordered trail (newest first) of ledger entries, reservation transitions, period
-- openings/closings and period-config changes, with the actor context of each. Filters are
-- ANDed; NULL means "any". p_limit as in get_ledger. With p_before_event_id (and p_end_time
-- the `at` of that event), the events after it in the listing's order.
CREATE FUNCTION meter.get_audit_events(p_user_id text DEFAULT NULL,
                                       p_actor_id text DEFAULT NULL,
                                       p_kinds text[] DEFAULT NULL,
                                       p_start_time timestamptz DEFAULT NULL,
                                       p_end_time timestamptz DEFAULT NULL,
                                       p_limit integer DEFAULT 100,
                                       p_namespace text DEFAULT 'default',
                                       p_before_event_id text DEFAULT NULL)  -- 062
RETURNS TABLE (kind text, at timestamptz, user_id text, event_type text, resource text,
               unit text, amount numeric, reservation_id text, entry_id bigint,
               actor_id text, on_behalf_of text, reason text, request_id text,
               metadata jsonb, event_id text)  -- 062: event_id
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_limit integer := meter._limit('limit', p_limit, 100, 10000);
    v_kinds text[] := ARRAY['ledger.allocation', 'ledger.consumption', 'ledger.adjustment',
                            'ledger.expiration', 'ledger.carry_over', 'reservation.active',
                            'reservation.committed', 'reservation.released',
                            'reservation.expired', 'period.open', 'period.close',
                            'period.config'];  -- 039
    -- 062: the cursor's event's place in the order
    v_after_dated timestamptz;
    v_after_seq integer;
    v_after_entry bigint;
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
    IF p_before_event_id IS NOT NULL THEN                                               -- 062
        -- 062: an event is a place in the listing only with the time it was listed at
        IF p_end_time IS NULL THEN                                                      -- 062
            PERFORM meter._fail('MT001', 'before_event_id',                             -- 062
                                'needs end_time: the at of the event it names');        -- 062
        END IF;                                                                         -- 062
        SELECT e.dated, e.seq, coalesce(e.entry_id, 0)                                  -- 062
        INTO v_after_dated, v_after_seq, v_after_entry                                  -- 062
        FROM meter._audit_events(p_namespace) e                                         -- 062
        WHERE e.event_id = p_before_event_id AND e.at = p_end_time;                     -- 062
        IF NOT FOUND THEN                                                               -- 062
            PERFORM meter._fail('MT001', 'before_event_id',                             -- 062
                                format('no event %s at end_time %s',                    -- 062
                                       quote_literal(p_before_event_id), p_end_time));  -- 062
        END IF;                                                                         -- 062
    END IF;                                                                             -- 062
    RETURN QUERY
    SELECT e.kind, e.at, e.user_id, e.event_type, e.resource, e.unit, e.amount,
           e.reservation_id, e.entry_id, e.actor_id, e.on_behalf_of, e.reason, e.request_id,
           e.metadata, e.event_id  -- 062
    FROM meter._audit_events(p_namespace) e  -- 062: 039's events
    WHERE (p_user_id IS NULL OR e.user_id = p_user_id)
      AND (p_actor_id IS NULL OR e.actor_id = p_actor_id)
      AND (p_kinds IS NULL OR e.kind = ANY (p_kinds))
      AND e.at >= coalesce(p_start_time, '-infinity')
      AND (e.at < coalesce(p_end_time, 'infinity')
           -- 062: with a cursor, the events of its time that come after it
           OR p_before_event_id IS NOT NULL AND e.at = p_end_time                       -- 062
              AND (e.dated, e.seq, coalesce(e.entry_id, 0), e.event_id)                 -- 062
                  < (v_after_dated, v_after_seq, v_after_entry, p_before_event_id))     -- 062
    -- 039: dated; 062: a missing entry id as 0 (where NULLS LAST put it: ids are >= 1),
    -- then event_id, which makes the order total
    ORDER BY e.at DESC, e.dated DESC, e.seq DESC, coalesce(e.entry_id, 0) DESC,         -- 062
             e.event_id DESC                                                            -- 062
    LIMIT v_limit;
END
$$;

REVOKE EXECUTE ON FUNCTION meter.get_audit_events(text, text, text[], timestamptz, timestamptz,
                                                  integer, text, text) FROM PUBLIC;
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'meter_app') THEN
        GRANT EXECUTE ON FUNCTION meter.get_audit_events(text, text, text[], timestamptz,
                                                         timestamptz, integer, text, text)
            TO meter_app;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'meter_maintenance') THEN
        GRANT EXECUTE ON FUNCTION meter.get_audit_events(text, text, text[], timestamptz,
                                                         timestamptz, integer, text, text)
            TO meter_maintenance;
    END IF;
END
$$;
