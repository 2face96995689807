-- A read whose time window ends before it starts is refused, naming start_time.
--
-- Why (found by a review of the reads, reproduced: test_queries.py
-- test_a_window_ending_before_it_starts_is_refused): get_ledger, get_usage,
-- get_namespace_usage and get_audit_events take a window [p_start_time, p_end_time) and,
-- given a start after the end, answered with nothing, as if nothing had happened in it: a
-- report run with its bounds swapped (`meter usage u --from 2026-02-01 --to 2026-01-01`)
-- said that a user consumed nothing. Bad input gets a typed error naming the parameter.
--
-- Now each calls meter._check_window first (after its tenant and identifiers): a start
-- after the end is refused with MT001, COLUMN start_time, and a message that names both
-- (`start_time: <start> is after end_time <end>`), which the SDK raises as a
-- ValidationError with parameter 'start_time'. Only `start > end` is refused, what is
-- certainly a mistake. start = end is not: without a cursor it is the empty window
-- [t, t), which a caller computing its windows may well ask for and is answered with
-- nothing, truly; with a cursor (get_ledger's p_before_id, get_audit_events'
-- p_before_event_id) p_end_time is the cursor's time and the page holds the entries of
-- that very time after the cursor, so start = end is the last page of a listing that
-- starts at the cursor's time, not empty at all. A NULL bound is unbounded, as before,
-- and never refused.
--
-- Locks: none, as before (reads under MVCC); the check runs before anything is read.
--
-- Migrations once applied are never edited: 062's get_ledger and get_audit_events and
-- 005's get_usage and get_namespace_usage are replaced whole (CREATE OR REPLACE: the
-- signatures are unchanged, so their grants stay as they were); only the lines marked
-- 066 are new.

-- Refuses a window [p_start, p_end) whose start is after its end (MT001, COLUMN
-- start_time); a NULL bound is unbounded, and start = end the empty window.
CREATE FUNCTION meter._check_window(p_start timestamptz, p_end timestamptz) RETURNS void
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF p_start > p_end THEN
        PERFORM meter._fail('MT001', 'start_time',
                            format('%s is after end_time %s', p_start, p_end));
    END IF;
END
$$;
REVOKE EXECUTE ON FUNCTION meter._check_window(timestamptz, timestamptz) FROM PUBLIC;

-- Ledger entries of one account, newest first, event_time in [p_start_time, p_end_time)
-- (NULL: unbounded); with p_before_id, those after entry (p_end_time, p_before_id) in that
-- order instead of before p_end_time. p_limit NULL means 100; below 1 is refused; above
-- 10000 is capped. 066: a start after the end is refused (MT001 naming start_time).
CREATE OR REPLACE FUNCTION meter.get_ledger(p_user_id text, p_event_type text, p_unit text,
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
    PERFORM meter._check_window(p_start_time, p_end_time);                              -- 066
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

-- Consumption of one user per event_type/resource/unit in [p_start_time, p_end_time)
-- (NULL: unbounded). 066: a start after the end is refused (MT001 naming start_time).
CREATE OR REPLACE FUNCTION meter.get_usage(p_user_id text, p_start_time timestamptz,
                                p_end_time timestamptz, p_namespace text DEFAULT 'default')
RETURNS TABLE (event_type text, resource text, unit text, total_consumed numeric,
               event_count bigint)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM meter._guard(p_namespace);
    PERFORM meter._ident('user_id', p_user_id, 256, true);
    PERFORM meter._check_window(p_start_time, p_end_time);                              -- 066
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

-- Consumption of the whole namespace per event_type/resource/unit, with distinct users,
-- in [p_start_time, p_end_time) (NULL: unbounded). 066: a start after the end is refused
-- (MT001 naming start_time).
CREATE OR REPLACE FUNCTION meter.get_namespace_usage(p_start_time timestamptz,
                                                     p_end_time timestamptz,
                                                     p_namespace text DEFAULT 'default')
RETURNS TABLE (event_type text, resource text, unit text, total_consumed numeric,
               event_count bigint, unique_users bigint)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM meter._guard(p_namespace);
    PERFORM meter._check_window(p_start_time, p_end_time);                              -- 066
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

-- One time-ordered trail (newest first) of ledger entries, reservation transitions, period
-- openings/closings and period-config changes, with the actor context of each. Filters are
-- ANDed; NULL means "any". p_limit as in get_ledger. With p_before_event_id (and p_end_time
-- the `at` of that event), the events after it in the listing's order. 066: a start after
-- the end is refused (MT001 naming start_time).
CREATE OR REPLACE FUNCTION meter.get_audit_events(p_user_id text DEFAULT NULL,
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
    PERFORM meter._check_window(p_start_time, p_end_time);                              -- 066
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
