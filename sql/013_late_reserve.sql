-- A reserve that arrives after its commit or release was given up settles them.
--
-- Why: a commit (or release) that reaches a worker before its reserve is retried until
-- meter_orphan_horizon (300 s), then dead-lettered (MT003). Its reserve is not necessarily
-- lost: after a run of outages the queue can hold a backlog longer than the horizon, and a
-- reserve that failed transiently waits behind it. Found by the chaos test aimed at
-- PostgreSQL and Redis restarts (METER_CHAOS_WEIGHTS=postgres=1,redis=1, seed 33): retried
-- tasks came back up to 336 s late, a commit was dead-lettered 87 ms before its reserve
-- applied, and its usage stayed in the dead letters while the hold expired by its TTL.
--
-- Now:
--   1. meter.record_orphan files such an event under the reservation id's lock, and applies
--      it instead when the reservation exists by then;
--   2. a reserve that creates its reservation applies, in its own transaction, the commits
--      and releases filed for it (trigger reservations_settle_orphans), and marks their
--      dead letters 'retried'.
-- A reserve with a client-chosen id (the only kind a commit can precede) holds the same
-- lock (meter._lock_key) from its start to its commit, so whichever of the two comes
-- second sees the other: no order of the two leaves the usage behind.

-- The dead letters waiting for a reservation, by namespace and reservation id.
CREATE INDEX dead_letters_orphans
    ON meter.dead_letters (namespace, (payload->'args'->>'reservation_id'))
    WHERE status = 'dead' AND op IN ('commit', 'release');

-- File a commit or release whose reservation was not found after the orphan horizon, or
-- apply it if its reservation exists by now. applied: whether it was applied (status and
-- result as meter.apply_events gives them); else dead_letter_id.
CREATE FUNCTION meter.record_orphan(p_payload jsonb, p_error_message text,
                                    p_source text DEFAULT NULL)
RETURNS TABLE (applied boolean, status text, result jsonb, dead_letter_id bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_ns text := p_payload->>'namespace';
    v_rid text := p_payload->'args'->>'reservation_id';
    v_one jsonb;
BEGIN
    IF jsonb_typeof(p_payload) IS DISTINCT FROM 'object'
       OR p_payload->>'op' IS DISTINCT FROM 'commit' AND p_payload->>'op' IS DISTINCT FROM 'release'
       OR v_ns IS NULL OR v_rid IS NULL THEN
        PERFORM meter._fail('MT001', 'payload',
                            'must be a commit or release event with a namespace and a reservation_id');
    END IF;
    PERFORM meter._guard(v_ns);
    -- held to commit: a reserve of v_rid in flight finishes first, or waits for this
    PERFORM meter._lock_key(v_ns, 'reservation', v_rid);
    v_one := meter._apply_one(p_payload);  -- 'not_found' when there is still no reservation
    applied := v_one->>'status' <> 'not_found';
    IF applied THEN
        status := v_one->>'status';
        result := v_one->'result';
    ELSE
        status := 'error';
        dead_letter_id := meter.record_dead_letter(p_payload->>'op', p_payload, 'MT003',
                                                   p_error_message, p_source, v_ns);
    END IF;
    RETURN NEXT;
END
$$;
REVOKE EXECUTE ON FUNCTION meter.record_orphan(jsonb, text, text) FROM PUBLIC;
-- For databases whose roles exist already (sql/roles.sql grants the same on its next run).
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'meter_maintenance') THEN
        GRANT EXECUTE ON FUNCTION meter.record_orphan(jsonb, text, text) TO meter_maintenance;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'meter_app') THEN
        GRANT EXECUTE ON FUNCTION meter.record_orphan(jsonb, text, text) TO meter_app;
    END IF;
END
$$;

-- AFTER INSERT on meter.reservations: retry (meter.retry_dead_letter) the commits and
-- releases dead-lettered while waiting for this reservation, oldest first. One that still
-- fails stays a dead letter with one more attempt, and the reserve goes through.
CREATE FUNCTION meter._settle_orphans() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_id bigint;
BEGIN
    FOR v_id IN
        SELECT d.dead_letter_id FROM meter.dead_letters d
        WHERE d.namespace = NEW.namespace AND d.status = 'dead'
          AND d.op IN ('commit', 'release')
          AND d.payload->'args'->>'reservation_id' = NEW.reservation_id
        ORDER BY d.dead_letter_id
    LOOP
        PERFORM * FROM meter.retry_dead_letter(v_id);
    END LOOP;
    RETURN NULL;
END
$$;
REVOKE EXECUTE ON FUNCTION meter._settle_orphans() FROM PUBLIC;

CREATE TRIGGER reservations_settle_orphans AFTER INSERT ON meter.reservations
    FOR EACH ROW EXECUTE FUNCTION meter._settle_orphans();
