-- A commit or release settled by its late reserve is recorded with no actor context.
--
-- Why: the trigger of sql/013 applies the dead-lettered event inside the reserve's
-- transaction, so the ledger row of a settled commit took the reserve caller's actor
-- context (meter.actor_id, request_id, on_behalf_of, reason). That caller did not send the
-- commit; a producer did, and the pipeline records no actor. An audit trail that names
-- the wrong person is worse than one that names none.
--
-- Now the trigger clears the four settings (transaction-locally, through meter._set_actor)
-- while it settles, then puts back what the reserve's caller had, for the rest of that
-- caller's transaction. The loop is 013's: a migration, once applied, is never edited (the
-- runner checks its checksum), so replacing the function repeats it.
-- A dead letter retried by hand (`meter dead-letters retry`) still records whoever retried
-- it: that is a deliberate act.

CREATE OR REPLACE FUNCTION meter._settle_orphans() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_id bigint;
    v_actor text[];  -- the reserve caller's context, saved while the trigger settles
BEGIN
    FOR v_id IN
        SELECT d.dead_letter_id FROM meter.dead_letters d
        WHERE d.namespace = NEW.namespace AND d.status = 'dead'
          AND d.op IN ('commit', 'release')
          AND d.payload->'args'->>'reservation_id' = NEW.reservation_id
        ORDER BY d.dead_letter_id
    LOOP
        IF v_actor IS NULL THEN  -- at the first one only: a reserve with none pays nothing
            v_actor := ARRAY[current_setting('meter.actor_id', true),
                             current_setting('meter.request_id', true),
                             current_setting('meter.on_behalf_of', true),
                             current_setting('meter.reason', true)];
            PERFORM meter._set_actor(NULL, NULL, NULL, NULL, true);
        END IF;
        PERFORM * FROM meter.retry_dead_letter(v_id);
    END LOOP;
    IF v_actor IS NOT NULL THEN
        PERFORM meter._set_actor(v_actor[1], v_actor[2], v_actor[3], v_actor[4], true);
    END IF;
    RETURN NULL;
END
$$;
REVOKE EXECUTE ON FUNCTION meter._settle_orphans() FROM PUBLIC;
