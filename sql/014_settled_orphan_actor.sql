-- A commit or release settled by its late reserve is recorded with no actor context.
--
-- Why: the trigger of sql/013 applies the dead-lettered event inside the reserve's
-- transaction, so the ledger row of a settled commit took the reserve caller's actor
-- context (meter.actor_id, request_id, on_behalf_of, reason). That caller did not send the
-- commit; a producer did, and the pipeline records no actor. An audit trail that names
-- the wrong person is worse than one that names none.
--
-- Now the trigger clears the four settings (transaction-locally) while it settles, then
-- puts back what the reserve's caller had, for the rest of that caller's transaction.
-- A dead letter retried by hand (`meter dead-letters retry`) still records whoever retried
-- it: that is a deliberate act.

CREATE OR REPLACE FUNCTION meter._settle_orphans() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_id bigint;
    v_names constant text[] := ARRAY['meter.actor_id', 'meter.request_id',
                                     'meter.on_behalf_of', 'meter.reason'];
    v_saved text[];
BEGIN
    FOR v_id IN
        SELECT d.dead_letter_id FROM meter.dead_letters d
        WHERE d.namespace = NEW.namespace AND d.status = 'dead'
          AND d.op IN ('commit', 'release')
          AND d.payload->'args'->>'reservation_id' = NEW.reservation_id
        ORDER BY d.dead_letter_id
    LOOP
        IF v_saved IS NULL THEN  -- at the first one only: a reserve with none pays nothing
            v_saved := ARRAY(SELECT coalesce(current_setting(n, true), '')
                             FROM unnest(v_names) WITH ORDINALITY AS s(n, i) ORDER BY i);
            PERFORM set_config(n, '', true) FROM unnest(v_names) n;
        END IF;
        PERFORM * FROM meter.retry_dead_letter(v_id);
    END LOOP;
    IF v_saved IS NOT NULL THEN
        PERFORM set_config(v_names[i], v_saved[i], true) FROM generate_subscripts(v_names, 1) i;
    END IF;
    RETURN NULL;
END
$$;
REVOKE EXECUTE ON FUNCTION meter._settle_orphans() FROM PUBLIC;
