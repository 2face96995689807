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
-- between two pages with an event_time before the cursor (backdated, or a transaction
-- that began before the last page was read) appears in no page, as it would not with any
-- listing newest first by the time entries are dated at.
--
-- Migrations once applied are never edited: 005's get_ledger is dropped and created again
-- with the new parameter (a parameter cannot be added by CREATE OR REPLACE, and an
-- overload would make every call without it ambiguous); its body is 005's, with the lines
-- marked 064 new. Its grants are given again as 005 and roles.sql gave them.

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
                                 p_before_id bigint DEFAULT NULL)  -- 064
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
    -- 064: an id alone is no place in a listing by event_time
    IF p_before_id IS NOT NULL AND p_end_time IS NULL THEN                              -- 064
        PERFORM meter._fail('MT001', 'before_id',                                       -- 064
                            'needs end_time: the event_time of the entry it names');    -- 064
    END IF;                                                                             -- 064
    SELECT a.account_id INTO v_account FROM meter.accounts a
    WHERE a.namespace = p_namespace AND coalesce(a.user_id, '') = coalesce(p_user_id, '')
      AND a.event_type = p_event_type AND a.resource = v_resource AND a.unit = p_unit;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF p_before_id IS NOT NULL THEN                                                     -- 064
        -- 064: a separate query, so that the one without a cursor keeps its plan; the
        -- row comparison is a range of ledger_account_time (account_id, event_time, id)
        RETURN QUERY                                                                    -- 064
        SELECT l.id, l.entry_type, l.amount, l.balance_after, l.event_time,             -- 064
               l.reservation_id, l.reference_id, l.actor_id, l.reason, l.metadata       -- 064
        FROM meter.ledger l                                                             -- 064
        WHERE l.account_id = v_account AND l.namespace = p_namespace                    -- 064
          AND l.event_time >= coalesce(p_start_time, '-infinity')                       -- 064
          -- 064: implied by the row comparison, which prunes no partition by itself
          AND l.event_time <= p_end_time                                                -- 064
          AND (l.event_time, l.id) < (p_end_time, p_before_id)                          -- 064
        ORDER BY l.event_time DESC, l.id DESC                                           -- 064
        LIMIT v_limit;                                                                  -- 064
        RETURN;                                                                         -- 064
    END IF;                                                                             -- 064
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
